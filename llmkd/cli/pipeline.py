"""End-to-end jobs behind the command line, callable from Python: `distill(...)` and `finetune(...)`."""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

from llmkd.atomic import write_json
from llmkd.cli import preflight
from llmkd.cli.early_exit import own_models
from llmkd.cli.ensemble import ensemble_source
from llmkd.cli.recipe import (
    FINETUNE,
    RunConfig,
    load_config,
    load_stages,
    parse_overrides,
    read_yaml,
    trainer_classes,
)
from llmkd.cli.self_distill import GenerationSteps, born_again, mean_teacher_source
from llmkd.data import glue
from llmkd.data.collate import DistillationCollator
from llmkd.data.loading import load_raw, tokenize, tokenize_pairs, tokenize_prompt_completion
from llmkd.evaluation.curves import CURVES, write_training_curves
from llmkd.evaluation.metrics import accuracy, make_compute_metrics
from llmkd.modeling import CAUSAL_LM, SEQ_CLS
from llmkd.publish.card import recipe_context, write_model_card
from llmkd.publish.trainer import FinetuneTrainer
from llmkd.students.from_teacher import describe, student_from_config, student_from_teacher
from llmkd.students.loading import detect_task, load_model, resolve_path

logger = logging.getLogger(__name__)
REPORT = "llmkd_report.json"


def build_models(run, args):
    """Teacher, student and their tokenizers, as the recipe says."""
    common = {"revision": run.teacher_revision, "trust_remote_code": run.trust_remote_code}
    run.teacher, run.student = resolve_path(run.teacher), resolve_path(run.student)
    task = run.task or detect_task(run.teacher, **common)
    teacher = load_model(run.teacher, task, attn_implementation=run.attn_implementation, **common)
    teacher_tok = AutoTokenizer.from_pretrained(run.teacher, **common)
    student, student_tok = build_student(run, args, task, teacher, teacher_tok)
    return task, teacher, teacher_tok, student, student_tok


def build_student(run, args, task: str, teacher, teacher_tok=None):
    """The student: a checkpoint (`teacher` may then be just its config), the teacher's layers, or a config."""
    config = getattr(teacher, "config", teacher)
    if run.qlora:
        from llmkd.students.lora import qlora_student

        student = qlora_student(run.student, task, **_options(run.lora, "merge"), **_labels(task, config))
        return student, AutoTokenizer.from_pretrained(run.student, trust_remote_code=run.trust_remote_code)
    if run.student is not None:
        student = load_model(
            run.student,
            task,
            trust_remote_code=run.trust_remote_code,
            attn_implementation=run.attn_implementation,
            **_labels(task, config),
        )
        student_tok = AutoTokenizer.from_pretrained(run.student, trust_remote_code=run.trust_remote_code)
    elif run.student_layers is not None:
        student, student_tok = student_from_teacher(teacher, run.student_layers), teacher_tok
    else:
        student, student_tok = student_from_config(teacher, run.student_config, seed=args.seed), teacher_tok
    if (
        run.student is None
    ):  # a student made from the teacher is not the teacher: no adapter may name it as base
        student.config._name_or_path = ""
    if run.student_dtype == "float32" and student.dtype != torch.float32:
        logger.info(
            "student weights %s -> float32 for training (student_dtype: auto keeps them)", student.dtype
        )
        student.float()
    if run.freeze_embeddings:
        student.get_input_embeddings().requires_grad_(False)
    if run.qat is not None:
        from llmkd.students.quantize import quantize_student

        quantize_student(student, **_options(run.qat, "export"))
    if run.lora is not None:
        from llmkd.students.lora import lora_student

        student = lora_student(student, **_options(run.lora, "merge"))
    return student, student_tok


def _labels(task: str, config) -> dict:
    if task != SEQ_CLS:
        return {}
    return {"num_labels": config.num_labels, "label2id": config.label2id, "id2label": config.id2label}


def _options(values: dict, *drop: str) -> dict:
    return {k: v for k, v in values.items() if k not in drop}


def export_student(run, trainer, args) -> dict:
    """After training: the int model (qat: export) and the merged LoRA model (lora: merge), on the main process."""
    out = {}
    if not trainer.is_world_process_zero():
        return out
    if run.qat is not None and run.qat.get("export", True):
        from llmkd.students.quantize import export_quantized

        out["quantized"] = os.path.join(args.output_dir, "quantized")
        export_quantized(trainer.model, out["quantized"])
    if run.lora is not None and run.lora.get("merge"):
        from llmkd.students.lora import merge_and_save

        out["merged"] = os.path.join(args.output_dir, "merged")
        merge_and_save(trainer.model, out["merged"], trainer.processing_class)
    return out


def build_data(run, task: str, tokenizer, model_config=None, teacher_tokenizer=None) -> tuple:
    """(train, eval) tokenised; eval is a Dataset, a {split: Dataset} dict (MNLI) or None.

    With `glue_task`, columns and classes come from the GLUE table and the data from the Hub or `data_dir`;
    the labels are checked against the model's id2label (and remapped when only the order differs).
    """
    if run.glue_task:
        glue_task = glue.get_task(run.glue_task)
        raw = glue.load_glue(glue_task, data_dir=run.data_dir)
        mapping = glue.align_labels(glue_task, model_config) if model_config is not None else None
        raw = {split: glue.remap_dataset_labels(data, mapping) for split, data in raw.items()}
        columns, names = list(glue_task.text_columns), None
    else:
        raw = load_raw(run.train_file, run.validation_file, run.dataset_name, run.dataset_config)
        columns, names = run.text_columns, _label_names(model_config) if model_config is not None else None
    encoded = {}
    for split, data in raw.items():
        limit = run.max_train_samples if split == "train" else run.max_eval_samples
        if limit:
            data = data.select(range(min(limit, len(data))))
        data = preflight.check_split(run, split, data, task, model_config, columns, names)  # texts, labels
        encoded[split] = _encode(run, data, task, (tokenizer, teacher_tokenizer), columns, names)
        if task == CAUSAL_LM:  # blank lines (wikitext has many) leave nothing to predict
            encoded[split] = encoded[split].filter(
                lambda row: len(row["input_ids"]) > 1, desc="dropping empty"
            )
    train = encoded.pop("train")
    if len(encoded) > 1:
        return train, encoded
    return train, next(iter(encoded.values()), None)


def prompt_column(run) -> str | None:
    """The prompt column when the recipe has prompt/completion data (on-policy needs it), else None."""
    return getattr(run, "prompt_column", None) or (
        "prompt" if getattr(run, "trainer", None) == "on_policy" else None
    )


def _encode(run, data, task: str, tokenizers, columns, names):
    tokenizer, teacher_tokenizer = tokenizers
    if teacher_tokenizer is not None:
        return tokenize_pairs(
            data,
            tokenizer,
            teacher_tokenizer,
            text_column=columns if isinstance(columns, str) else columns[0],
            prompt_column=prompt_column(run),
            completion_column=run.completion_column if prompt_column(run) else None,
            max_length=run.max_length,
        )
    if task == CAUSAL_LM and prompt_column(run):
        return tokenize_prompt_completion(
            data,
            tokenizer,
            prompt_column=prompt_column(run),
            completion_column=run.completion_column,
            max_length=run.max_length,
            max_prompt_length=run.max_prompt_length,
        )
    return tokenize(data, tokenizer, task, columns, run.label_column, run.max_length, names)


def collator_of(run, task: str, tokenizer):
    if prompt_column(run) and task != CAUSAL_LM:
        raise ValueError(f"prompt_column is for causal LMs (prompt/completion data); this is a {task} run")
    return DistillationCollator(tokenizer, causal_lm=task == CAUSAL_LM)


def metrics_for(run, task: str, model_config):
    """GLUE metrics for a GLUE task, accuracy for other classifiers, nothing for LMs and regression."""
    if run.glue_task:
        mapping = glue.align_labels(run.glue_task, model_config) if model_config is not None else None
        return make_compute_metrics(run.glue_task, mapping)
    return accuracy if task == SEQ_CLS and model_config.num_labels > 1 else None


def distill(config_path: str, overrides: list[str] = ()) -> dict:
    """Runs a distillation recipe end to end, stage by stage; returns the last stage's report."""
    stages = load_stages(config_path, list(overrides), RunConfig)
    with recipe_context("distill", config_path, recipe_values(config_path, overrides)):  # for model cards
        if any(run.born_again for run, _ in stages):  # born-again generations (llmkd.cli.self_distill)
            return born_again(stages, GenerationSteps(distill_stage, build_data, metrics_for, REPORT))
        reports = [distill_stage(run, args) for run, args in stages]
    return reports[-1] | ({"stages": reports[:-1]} if len(reports) > 1 else {})


def distill_stage(run, args) -> dict:
    """One distillation from parsed configs; the report is also written to args.output_dir."""
    set_seed(args.seed)
    preflight.check_distill(run, args)  # output folder, counts, model folders: before anything is loaded
    if getattr(run, "teacher_cache", None):
        return distill_from_cache(run, args)
    if run.trainer == "mutual":  # peers teach each other (llmkd.cli.mutual), built with this module's steps
        from llmkd.cli.mutual import Steps, distill_mutual

        steps = Steps(build_models, build_student, build_data, collator_of, metrics_for, train_and_report)
        return distill_mutual(run, args, steps)
    if run.trainer == "cross_modal":  # each side reads its own column (llmkd.cli.cross_modal)
        from llmkd.cli.cross_modal import distill_cross_modal

        return distill_cross_modal(run, args, train_and_report, metrics_for)
    if run.trainer == "early_exit":  # the classifier teaches its own exits: loaded once, as both
        task, teacher, teacher_tok, student, student_tok = own_models(run, args)
    else:
        task, teacher, teacher_tok, student, student_tok = build_models(run, args)
    both = teacher_tok if run.trainer == "cross_tokenizer" else None  # ULD: every row in both tokenizations
    train, evaluation = build_data(run, task, student_tok, teacher.config if task == SEQ_CLS else None, both)
    source, extra = teacher, {}
    if getattr(run, "teachers", None):  # several teachers (llmkd.cli.ensemble); `teacher:` built the student
        source, train, evaluation, extra = ensemble_source(run, args, teacher, student_tok, train, evaluation)
        teacher_tok = None  # each teacher's tokenizer was compared with the student's there
    if run.mean_teacher is not None:  # the student's own moving average teaches it (llmkd.cli.self_distill)
        source, extra = mean_teacher_source(run, student)
    trainer_cls = trainer_classes(run.trainer)[0]
    collator = None if both is not None else collator_of(run, task, student_tok)  # ULD: the trainer's own
    trainer = trainer_cls(
        model=student,
        teacher=source,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=collator,
        processing_class=student_tok,
        teacher_processing_class=teacher_tok,
        compute_metrics=metrics_for(run, task, teacher.config),
    )
    report = {
        "teacher": run.teacher,
        "trainer": type(trainer).__name__,
        "task": task,
        "student": describe(student),
        "teacher_size": describe(teacher),
    } | extra
    return train_and_report(trainer, args, report, run)


def distill_from_cache(run, args) -> dict:
    """Distillation from `llmkd cache-teacher`'s folder: the teacher is loaded only to build a student from it."""
    from llmkd.schemes import DistillationTrainer
    from llmkd.teachers.cached.binding import cached_trainer_kwargs
    from llmkd.teachers.cached.reader import CachedTeacher

    if run.trainer != "distill":
        raise ValueError(
            f"teacher_cache works with trainer: distill, not {run.trainer!r}: sampled completions and other "
            "tokenizations need the live teacher; remove teacher_cache"
        )
    cached = CachedTeacher(run.teacher_cache)
    # Resolved as `llmkd cache-teacher` resolved them, so that the teacher's fingerprint key matches.
    run.teacher, run.student = resolve_path(run.teacher), resolve_path(run.student)
    if run.student is not None:
        student, student_tok = build_student(run, args, cached.task, cached.config)
    else:  # student_layers / student_config copy the teacher's weights once; the teacher is freed before training
        _, teacher, teacher_tok, student, student_tok = build_models(run, args)
        del teacher
    task = cached.task
    train, evaluation = build_data(run, task, student_tok, cached.config if task == SEQ_CLS else None)
    kwargs = cached_trainer_kwargs(
        cached, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=student_tok, run=run
    )
    trainer = DistillationTrainer(
        model=student,
        data_collator=collator_of(run, task, student_tok),
        processing_class=student_tok,
        compute_metrics=metrics_for(run, task, cached.config),
        **kwargs,
    )
    report = {"teacher": run.teacher, "teacher_cache": run.teacher_cache, "trainer": type(trainer).__name__}
    report |= {"task": task, "student": describe(student)}
    return train_and_report(trainer, args, report, run)


def finetune(config_path: str, overrides: list[str] = ()) -> dict:
    """Fine-tunes a sequence classifier (e.g. a teacher) with `transformers.Trainer` (as FinetuneTrainer)."""
    run, args = load_config(config_path, list(overrides), *FINETUNE)
    run.model = resolve_path(run.model)
    preflight.check_finetune(run, args)
    set_seed(args.seed)
    names = list(run.class_names or glue.get_task(run.glue_task).label_names)
    labels = (
        {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}} if names else {}
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        run.model,
        revision=run.revision,
        trust_remote_code=run.trust_remote_code,
        num_labels=max(len(names), 1),  # no class names: one regression score (STS-B)
        ignore_mismatched_sizes=True,  # a classifier of other classes: its head is replaced by a fresh one
        **labels,
        **({"attn_implementation": run.attn_implementation} if run.attn_implementation else {}),
    )
    tokenizer = AutoTokenizer.from_pretrained(
        run.model, revision=run.revision, trust_remote_code=run.trust_remote_code
    )
    train, evaluation = build_data(run, SEQ_CLS, tokenizer, model.config)
    trainer = FinetuneTrainer(  # transformers' Trainer with llmkd's checkpoints (llmkd.publish.trainer)
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=DistillationCollator(tokenizer),
        processing_class=tokenizer,
        compute_metrics=metrics_for(run, SEQ_CLS, model.config),
    )
    tokenizer.model_max_length = run.max_length  # saved with the checkpoint: `llmkd eval` cuts inputs alike
    with recipe_context("finetune", config_path, recipe_values(config_path, overrides)):
        return train_and_report(trainer, args, {"model": run.model, "size": describe(model)}, card_run=run)


def recipe_values(config_path: str, overrides) -> dict:
    """The recipe a model card shows: the YAML file's keys with the command-line flags merged in."""
    return read_yaml(config_path) | parse_overrides(list(overrides))


def train_and_report(trainer, args, report: dict, run=None, card_run=None) -> dict:
    """Train (resuming if asked), save the plain model, evaluate, write llmkd_report.json and the model card
    (about `card_run`, default `run`) atomically, then push the folder when push_to_hub is set."""
    if hasattr(trainer.processing_class, "model_max_length") and run is not None:  # tokenizers only
        # Saved with the checkpoint: `llmkd eval` then cuts inputs as training did.
        trainer.processing_class.model_max_length = run.max_length
    preflight.refuse_finished_run(args)  # last of the checks: never overwrite a finished run silently
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(_internal_call=True)  # transformers' save without a push: the push waits for the card
    report["train"] = result.metrics | {"world_size": args.world_size}
    if trainer.eval_dataset is not None:
        report["eval"] = trainer.evaluate()
    if run is not None:  # exports last: merging LoRA consumes the adapted model
        report |= export_student(run, trainer, args)
    report |= data_record(card_run or run)  # `llmkd export` checks the ONNX model on the same validation data
    if trainer.is_world_process_zero():
        write_model_card(trainer, report, card_run or run)  # adds the measured comparison to the report
        write_json(os.path.join(args.output_dir, REPORT), report)
        write_training_curves(trainer.state.log_history, os.path.join(args.output_dir, CURVES))
    trainer.push_output_dir()  # push_to_hub: the finished folder, card and report included
    return report


def data_record(run) -> dict:
    """{"data": the validation file (absolute), its text and label columns, max_length} when the run has one."""
    if run is None or not getattr(run, "validation_file", None):
        return {}
    keep = {"text_columns": run.text_columns, "label_column": run.label_column, "max_length": run.max_length}
    return {"data": {"validation_file": os.path.abspath(run.validation_file)} | keep}


def _label_names(config) -> list[str] | None:
    names = [config.id2label[i] for i in range(config.num_labels)] if config.id2label else None
    return None if names is None or all(n == f"LABEL_{i}" for i, n in enumerate(names)) else names
