"""`trainer: cross_modal` from a recipe: teacher and student each read their own column through their own processor.

    llmkd distill recipe.yaml     # trainer: cross_modal, student_column: audio, teacher_column: text

The student is a saved classifier folder (``student:``) with its processor (a feature extractor, an image processor
or a tokenizer); a folder with a config and a processor but no weights gives a fresh student built from the config
(seeded). Audio cells of the data files are WAV paths relative to the file's folder (or arrays); text cells are
read by the teacher's tokenizer. Rows are encoded by `llmkd.data.paired.encode_pairs`, trained by
`llmkd.schemes.CrossModalTrainer`, and reported like every distillation (llmkd_report.json, model card).
"""

from __future__ import annotations

import json
import logging
import os

import torch

from llmkd.modeling import SEQ_CLS

logger = logging.getLogger(__name__)

# Auto classes of classifiers by the suffix of the checkpoint's architecture name.
CLASSIFIER_SUFFIXES = {
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForAudioClassification": "AutoModelForAudioClassification",
    "ForImageClassification": "AutoModelForImageClassification",
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def check_recipe(run) -> None:
    """trainer: cross_modal takes a student folder, files and its columns; its keys do nothing elsewhere."""
    keys = ("student_column", "teacher_column", "max_seconds")
    if run.trainer != "cross_modal":
        given = [k for k in keys if getattr(run, k) is not None]
        if given:
            raise ValueError(f"{given} are for trainer: cross_modal (this recipe has trainer: {run.trainer})")
        return
    if run.student is None or not run.student_column:
        raise ValueError(
            "trainer: cross_modal needs student: FOLDER (a saved classifier and its processor; a config without "
            "weights gives a fresh student) and student_column: the column it reads (e.g. audio)"
        )
    unsupported = ("lora", "qat", "teachers", "teacher_cache", "mean_teacher", "born_again", "glue_task")
    given = [k for k in unsupported if getattr(run, k, None) not in (None, False)]
    if given or run.qlora or run.dataset_name:
        raise ValueError(
            f"trainer: cross_modal does not combine with {given or ['qlora/dataset_name']}; give train_file "
            "(and validation_file) with both columns, one teacher and a student folder"
        )
    seconds = run.max_seconds
    if seconds is not None and (
        isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0
    ):
        raise ValueError(f"max_seconds must be a number > 0 or null, got {run.max_seconds!r}")


def _generic_names(config) -> bool:
    names = config.id2label or {}
    return all(str(names.get(i, f"LABEL_{i}")) == f"LABEL_{i}" for i in range(config.num_labels))


def classifier_class(config):
    """The transformers Auto class that loads this classifier config (from its architectures, else its type)."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        for suffix, auto in CLASSIFIER_SUFFIXES.items():
            if name.endswith(suffix):
                return getattr(transformers, auto)
    # No architectures saved (a bare config): the first Auto class that knows the config's type.
    for auto in CLASSIFIER_SUFFIXES.values():
        cls = getattr(transformers, auto)
        if type(config) in cls._model_mapping:
            return cls
    raise ValueError(
        f"{type(config).__name__} is not a sequence, audio or image classifier config; save a "
        "*ForSequenceClassification, *ForAudioClassification or *ForImageClassification model"
    )


def load_classifier(path: str, run, seed: int, role: str):
    """A saved classifier (safetensors weights); a folder with a config and no weights at all: a fresh one from
    the config, seeded (a student to train; said in the log). Raises ValueError for pickled weights only."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=run.trust_remote_code)
    cls = classifier_class(config)
    if os.path.isdir(path):
        files = os.listdir(path)
        if not any(f in WEIGHT_FILES for f in files):
            pickled = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
            if pickled:
                raise ValueError(
                    f"the {role} {path!r} holds only pickled weights {pickled}, which llmkd does not unpickle; "
                    "save it again with save_pretrained(FOLDER) (safetensors, the default)"
                )
            if role == "teacher":
                raise ValueError(f"the teacher {path!r} has no model.safetensors: a teacher must be trained")
            logger.info("student %s has a config and no weights: a fresh student, seeded with %d", path, seed)
            torch.manual_seed(seed)
            return cls.from_config(config), True
    return cls.from_pretrained(path, trust_remote_code=run.trust_remote_code, use_safetensors=True), False


def load_processor(path: str, run):
    """The folder's tokenizer, else its feature extractor or image processor (preprocessor_config.json says
    which). Only the part that prepares a classifier's input: a speech model's folder may also describe a CTC
    tokenizer it does not hold."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer

    from llmkd.content import has_tokenizer

    trust = {"trust_remote_code": run.trust_remote_code}
    settings = os.path.join(path, "preprocessor_config.json")
    if os.path.isdir(path) and not has_tokenizer(path) and os.path.isfile(settings):
        with open(settings, encoding="utf-8") as handle:
            images = "image_processor_type" in json.load(handle)
        return (AutoImageProcessor if images else AutoFeatureExtractor).from_pretrained(path, **trust)
    return AutoTokenizer.from_pretrained(path, **trust)


def paired_data(run, teacher, student_processor, teacher_processor, hard_labels: bool) -> tuple:
    """(train, validation) encoded for both sides; labels checked against the teacher's classes."""
    from llmkd.data.loading import check_labels, load_raw
    from llmkd.data.paired import encode_pairs

    raw = load_raw(run.train_file, run.validation_file)
    names = [teacher.config.id2label[i] for i in range(teacher.config.num_labels)]
    out = {}
    for split, data in raw.items():
        limit = run.max_train_samples if split == "train" else run.max_eval_samples
        if limit:
            data = data.select(range(min(limit, len(data))))
        if run.label_column and run.label_column in data.column_names:
            data = check_labels(data, run.label_column, teacher.config.num_labels, names, f"{split} data")
        elif run.label_column and (split != "train" or hard_labels):
            raise ValueError(
                f"the {split} data has no label column {run.label_column!r} (columns: {data.column_names}); "
                "set label_column to the gold labels' column, or label_column: null to train and evaluate "
                "without labels (hard_label_weight: 0; no accuracy is reported)"
            )
        source = getattr(run, f"{split}_file", None)
        out[split] = encode_pairs(
            data,
            student_processor,
            teacher_processor,
            student_column=run.student_column,
            teacher_column=run.teacher_column or run.text_columns,
            label_column=run.label_column,
            label_names=names,
            max_length=run.max_length,
            max_seconds=run.max_seconds,
            base_dir=os.path.dirname(os.path.abspath(source)) if source else None,
        )
    return out["train"], out.get("validation")


def distill_cross_modal(run, args, train_and_report, metrics_for) -> dict:
    """One cross-modal distillation stage from parsed configs; returns (and writes) its report. The two steps it
    shares with every distillation come from llmkd.cli.pipeline (passed in: no import cycle)."""
    from llmkd.schemes import CrossModalTrainer
    from llmkd.students.from_teacher import describe
    from llmkd.students.loading import resolve_path

    run.teacher, run.student = resolve_path(run.teacher), resolve_path(run.student)
    if run.max_seconds is not None and any(t.knowledge == "aligned" for t in args.terms):
        raise ValueError(
            f"max_seconds={run.max_seconds} cuts the audio but not the transcript, so an aligned term would stretch "
            "the whole transcript over the kept frames; drop max_seconds or the aligned term"
        )
    teacher, _ = load_classifier(run.teacher, run, args.seed, "teacher")
    student, fresh = load_classifier(run.student, run, args.seed, "student")
    if fresh and _generic_names(student.config):  # the teacher's class names, as in every other distillation
        student.config.id2label, student.config.label2id = teacher.config.id2label, teacher.config.label2id
    student_processor, teacher_processor = load_processor(run.student, run), load_processor(run.teacher, run)
    train, validation = paired_data(
        run, teacher, student_processor, teacher_processor, args.hard_label_weight > 0
    )
    trainer = CrossModalTrainer(  # the default collator pads each stream with its own model's pad id
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=student_processor,
        teacher_processing_class=teacher_processor,
        compute_metrics=metrics_for(run, SEQ_CLS, teacher.config) if run.label_column else None,
    )
    report = {"teacher": run.teacher, "trainer": type(trainer).__name__, "task": SEQ_CLS}
    report |= {"student": describe(student), "teacher_size": describe(teacher), "fresh_student": fresh}
    return train_and_report(trainer, args, report, run)
