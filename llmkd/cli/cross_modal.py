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
import os

import torch

from llmkd.modeling import SEQ_CLS

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
    if run.max_seconds is not None and not (
        isinstance(run.max_seconds, (int, float)) and run.max_seconds > 0
    ):
        raise ValueError(f"max_seconds must be a number > 0 or null, got {run.max_seconds!r}")


def classifier_class(config):
    """The transformers Auto class that loads this classifier config (from its architectures, else its type)."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        for suffix, auto in CLASSIFIER_SUFFIXES.items():
            if name.endswith(suffix):
                return getattr(transformers, auto)
    for (
        auto
    ) in CLASSIFIER_SUFFIXES.values():  # no architectures saved: the first Auto class that knows the type
        cls = getattr(transformers, auto)
        if type(config) in cls._model_mapping:
            return cls
    raise ValueError(
        f"{type(config).__name__} is not a sequence, audio or image classifier config; save a "
        "*ForSequenceClassification, *ForAudioClassification or *ForImageClassification model"
    )


def load_classifier(path: str, run, seed: int):
    """A saved classifier; a folder without weights: a fresh one from its config, seeded (a student to train)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=run.trust_remote_code)
    cls = classifier_class(config)
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
        torch.manual_seed(seed)
        return cls.from_config(config)
    return cls.from_pretrained(path, trust_remote_code=run.trust_remote_code)


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


def paired_data(run, teacher, student_processor, teacher_processor) -> tuple:
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


def distill_cross_modal(run, args, train_and_report) -> dict:
    """One cross-modal distillation stage from parsed configs; returns (and writes) its report."""
    from llmkd.cli.pipeline import metrics_for
    from llmkd.data.collate import DistillationCollator
    from llmkd.schemes import CrossModalTrainer
    from llmkd.students.from_teacher import describe
    from llmkd.students.loading import resolve_path

    run.teacher, run.student = resolve_path(run.teacher), resolve_path(run.student)
    teacher = load_classifier(run.teacher, run, args.seed)
    student = load_classifier(run.student, run, args.seed)
    student_processor, teacher_processor = load_processor(run.student, run), load_processor(run.teacher, run)
    train, validation = paired_data(run, teacher, student_processor, teacher_processor)
    trainer = CrossModalTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=DistillationCollator(student_processor, teacher_tokenizer=teacher_processor),
        processing_class=student_processor,
        teacher_processing_class=teacher_processor,
        compute_metrics=metrics_for(run, SEQ_CLS, teacher.config),
    )
    report = {"teacher": run.teacher, "trainer": type(trainer).__name__, "task": SEQ_CLS}
    report |= {"student": describe(student), "teacher_size": describe(teacher)}
    return train_and_report(trainer, args, report, run)
