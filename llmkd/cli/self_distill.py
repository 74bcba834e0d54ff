"""Self-distillation in recipes: a mean teacher (`mean_teacher:`) and born-again generations (`born_again:`).

- ``mean_teacher: {decay: 0.999, warmup: false}`` — Tarvainen & Valpola (2017), arXiv 1703.01780: the teacher is
  the exponential moving average of the student (`llmkd.teachers.ema.MeanTeacher`), so it starts as the student
  itself; ``teacher:`` is only where the student comes from (student_layers / student_config).
- ``born_again: {generations: N, ensemble: false, student_init: null}`` — Furlanello et al. (2018), "Born-Again
  Neural Networks", ICML, arXiv 1805.04770: generation 1 learns from ``teacher:`` (generation 0), generation k
  from generation k − 1. Every generation's student starts from the same weights: built once from the recipe's
  student keys, the layers taken from ``student_init`` (default: the teacher), and kept in
  ``output_dir/student-init``. Generation k trains into ``output_dir/generation-k`` (a plain checkpoint and its
  report); ``output_dir`` then receives a copy of the last generation's files and the final report, which lists
  every generation and, with ``ensemble: true``, the metrics of the BAN ensemble (the mean of the generations'
  class probabilities, Furlanello §3.2; the original teacher is not a member). A rerun skips every generation
  whose report exists and was made from the same inputs (settings, data files, teacher and student weights),
  and resumes an unfinished one from its last checkpoint.

`llmkd.cli.pipeline` imports this module, so the pipeline steps that born-again repeats are passed in
(`GenerationSteps`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, EvalPrediction

from llmkd.atomic import write_json
from llmkd.content import checkpoint_key, file_sha256, teacher_key
from llmkd.data.collate import DistillationCollator
from llmkd.modeling import CAUSAL_LM, forward_keys, select_inputs
from llmkd.publish.checkpoints import last_complete_checkpoint
from llmkd.students.from_teacher import student_from_config, student_from_teacher
from llmkd.students.loading import detect_task, load_model, resolve_path
from llmkd.teachers.ema import MeanTeacher

logger = logging.getLogger(__name__)

MEAN_TEACHER_KEYS = {"decay", "warmup"}
BORN_AGAIN_KEYS = {"generations", "ensemble", "student_init"}
INIT_DIR, STAMP = "student-init", "llmkd_inputs.json"
# TrainingArguments fields that differ between processes, only say where to write or what to log, or how fast to
# evaluate: not a generation's inputs (changing them must not retrain a finished generation).
NOT_INPUTS = {"output_dir", "local_rank", "resume_from_checkpoint", "logging_dir", "hub_token"} | {
    "logging_steps", "logging_strategy", "logging_first_step", "report_to", "disable_tqdm", "run_name",
    "per_device_eval_batch_size", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class GenerationSteps:
    """The pipeline's steps: distil a stage (run, args) -> report, build the data, the metric, the report file."""

    distill: Callable
    data: Callable
    metrics: Callable
    report: str


# ---- recipe checks (RunConfig.__post_init__) ---------------------------------------------------------------


def check_recipe(run) -> None:
    """`mean_teacher` / `born_again` values and what they combine with; a ValueError names the fix."""
    for name, keys in (("mean_teacher", MEAN_TEACHER_KEYS), ("born_again", BORN_AGAIN_KEYS)):
        value = getattr(run, name)
        if value is not None and (not isinstance(value, dict) or set(value) - keys):
            raise ValueError(f"{name} must be a mapping with keys from {sorted(keys)}, got {value!r}")
        if value is not None:
            _refuse_with(run, name)
    if run.mean_teacher is not None:
        decay = run.mean_teacher.get("decay", 0.999)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(f"mean_teacher decay must be a number in [0, 1) (e.g. 0.999), got {decay!r}")
        if not isinstance(run.mean_teacher.get("warmup", False), bool):
            raise ValueError(f"mean_teacher warmup must be true or false, got {run.mean_teacher['warmup']!r}")
    if run.born_again is not None:
        _check_born_again(run, run.born_again)


def _refuse_with(run, name: str) -> None:
    other = "born_again" if name == "mean_teacher" else "mean_teacher"
    values = {"teacher_cache": run.teacher_cache, "lora": run.lora, "qlora": run.qlora, "qat": run.qat}
    values |= {other: getattr(run, other), "teachers": getattr(run, "teachers", None)}
    clash = sorted(k for k, v in values.items() if v)
    if clash:
        raise ValueError(f"{name} cannot be combined with {clash}: remove one of them")
    # Schemes that learn from `teacher:`; the others (mutual, early exits, ULD) have no teacher to replace.
    allowed = ("distill",) if name == "mean_teacher" else ("distill", "on_policy")
    if run.trainer not in allowed:
        raise ValueError(f"{name} works with trainer: {' or '.join(allowed)}, not {run.trainer!r}")


def _check_born_again(run, options: dict) -> None:
    generations = options.get("generations")
    if isinstance(generations, bool) or not isinstance(generations, int) or generations < 1:
        raise ValueError(f"born_again needs generations: N, a positive integer, got {generations!r}")
    ensemble = options.get("ensemble", False)
    if not isinstance(ensemble, bool):
        raise ValueError(f"born_again ensemble must be true or false, got {ensemble!r}")
    if ensemble and generations < 2:
        raise ValueError(
            "born_again ensemble: true needs generations >= 2 (one generation is its own ensemble)"
        )
    init = options.get("student_init")
    if init is not None and (not isinstance(init, str) or run.student is not None):
        raise ValueError(
            f"born_again student_init={init!r}: a model path whose layers student_layers / student_config "
            "take; with student: PATH every generation starts from PATH, so drop student_init"
        )


# ---- mean teacher ------------------------------------------------------------------------------------------


def mean_teacher_source(run, student) -> tuple[MeanTeacher, dict]:
    """The source of a `mean_teacher:` recipe (the student's average) and what the report says of it."""
    options = {"decay": 0.999, "warmup": False} | run.mean_teacher
    entries = {"teacher_source": "mean_teacher (EMA of the student)", "mean_teacher": options}
    return MeanTeacher(student, **options), entries


# ---- born-again generations --------------------------------------------------------------------------------


def born_again(stages: list[tuple], steps: GenerationSteps) -> dict:
    """Runs the generations of a born-again recipe (see the module docstring); returns the final report."""
    if len(stages) != 1:
        raise ValueError("born_again runs one recipe in generations; it cannot be combined with stages:")
    run, args = stages[0]
    if args.resume_from_checkpoint:
        raise ValueError(
            "born_again resumes each unfinished generation from its own last checkpoint; drop "
            "resume_from_checkpoint"
        )
    options = {"ensemble": False, "student_init": None} | run.born_again
    run.teacher = resolve_path(run.teacher)
    task = run.task or detect_task(run.teacher, run.teacher_revision, run.trust_remote_code)
    student = _initial_student(run, args, task, resolve_path(options["student_init"]) or run.teacher)
    check_same_architecture(run, student)
    reports, teacher = [], run.teacher
    for k in range(1, options["generations"] + 1):
        reports.append(_generation(run, args, k, teacher, student, steps))
        teacher = reports[-1]["folder"]
    final = _final_report(run, args, task, reports, options, steps)
    if args.process_index == 0:
        _publish(teacher, args.output_dir, steps.report, final)
    _barrier()
    return final


def _initial_student(run, args, task: str, source: str) -> str:
    """The folder every generation's student is loaded from (built once, on the main process)."""
    if run.student is not None:
        return resolve_path(run.student)
    folder = os.path.join(args.output_dir, INIT_DIR)
    inputs = {"from": teacher_key(source), "layers": run.student_layers, "config": run.student_config}
    inputs |= {"seed": args.seed, "task": task}
    if args.process_index == 0 and _stamp(folder) != inputs:
        model = load_model(source, task, trust_remote_code=run.trust_remote_code)
        if run.student_layers is not None:
            student = student_from_teacher(model, run.student_layers)
        else:
            student = student_from_config(model, run.student_config, seed=args.seed)
        student.save_pretrained(folder)
        AutoTokenizer.from_pretrained(source, trust_remote_code=run.trust_remote_code).save_pretrained(folder)
        write_json(os.path.join(folder, STAMP), inputs)
    _barrier()
    return folder


def check_same_architecture(run, student: str) -> None:
    """Born-again distils a model into its own architecture: same model type, layer count and width."""
    common = {"trust_remote_code": run.trust_remote_code}
    configs = [
        AutoConfig.from_pretrained(run.teacher, revision=run.teacher_revision, **common),
        AutoConfig.from_pretrained(student, **common),
    ]
    shapes = []
    for config in configs:
        text = config.get_text_config()
        shapes.append((config.model_type, text.num_hidden_layers, text.hidden_size))
    if shapes[0] != shapes[1]:
        raise ValueError(
            f"born-again networks have the teacher's architecture, but the teacher {run.teacher} is (model "
            f"type, layers, width) = {shapes[0]} and the student {student} is {shapes[1]}; give student_init the "
            "model the teacher was made from (e.g. the 6-layer model a 2-layer teacher took its layers from) and "
            "the same student_layers, or student_config matching the teacher"
        )


def _generation(run, args, k: int, teacher: str, student: str, steps: GenerationSteps) -> dict:
    folder = os.path.join(args.output_dir, f"generation-{k}")
    revision = run.teacher_revision if k == 1 else None
    inputs = _inputs(run, args, k, teacher_key(teacher, revision), student)
    report_path = os.path.join(folder, steps.report)
    done = _stamp(folder) == inputs and os.path.isfile(report_path)
    _barrier()  # every process decided from the same files before the main one changes them
    if not done and args.process_index == 0:
        if _stamp(folder) != inputs and os.path.isdir(folder):
            logger.info(
                "born-again generation %d: %s was made from other inputs; training it again", k, folder
            )
            shutil.rmtree(folder)
        write_json(os.path.join(folder, STAMP), inputs)
    _barrier()
    if done:
        logger.info("born-again generation %d: %s is done, reusing it", k, folder)
        with open(report_path, encoding="utf-8") as handle:
            return json.load(handle) | {"folder": folder, "generation": k}
    gen_run = dataclasses.replace(
        run, teacher=teacher, teacher_revision=revision, born_again=None, student=student,
        student_layers=None, student_config=None,
    )  # fmt: skip
    last = last_complete_checkpoint(folder)  # a checkpoint a kill left half-written is skipped
    gen_args = dataclasses.replace(args, output_dir=folder, resume_from_checkpoint=last)
    report = steps.distill(gen_run, gen_args)
    _barrier()  # the next generation loads this one's weights
    return report | {"folder": folder, "generation": k}


def _inputs(run, args, k: int, teacher: str, student: str) -> dict:
    """What generation k is made from: a rerun reuses it only when all of these are equal."""
    settings = dataclasses.asdict(run) | {"born_again": None}
    settings |= {k: v for k, v in args.to_dict().items() if k not in NOT_INPUTS}
    data = {
        name: file_sha256(path)
        for name in ("train_file", "validation_file")
        if (path := getattr(run, name)) and os.path.isfile(path)
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    student_key = checkpoint_key(student) if os.path.isdir(student) else teacher_key(student)
    return {"generation": k, "teacher": teacher, "student": student_key, "data": data, "settings": digest}


def _stamp(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, STAMP), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ---- the final report and the ensemble ---------------------------------------------------------------------


def _final_report(run, args, task: str, reports: list[dict], options: dict, steps: GenerationSteps) -> dict:
    entries = [
        {"generation": r["generation"], "folder": r["folder"], "teacher": r["teacher"], "eval": r.get("eval")}
        for r in reports
    ]
    section = {"generations": entries, "student_init": options["student_init"], "ensemble": None}
    if options["ensemble"] and args.process_index == 0:
        folders = [r["folder"] for r in reports]
        section["ensemble"] = ensemble_metrics(run, args, task, folders, steps)
    last = {k: v for k, v in reports[-1].items() if k not in ("folder", "generation")}
    return last | {"born_again": section}


def ensemble_metrics(run, args, task: str, folders: list[str], steps: GenerationSteps) -> dict:
    """{"eval": metrics of the mean of the members' probabilities, "members": each member's folder and
    metrics} on the recipe's validation data, scored as training scores it (same data, collator and metric)."""
    if task == CAUSAL_LM:
        raise ValueError(
            "born_again ensemble is evaluated for classifiers; set ensemble: false for causal LMs"
        )
    tokenizer = AutoTokenizer.from_pretrained(folders[0], trust_remote_code=run.trust_remote_code)
    models = [load_model(f, task, trust_remote_code=run.trust_remote_code).eval() for f in folders]
    config = models[0].config
    _, evaluation = steps.data(run, task, tokenizer, config)
    if evaluation is None:
        raise ValueError("born_again ensemble: true needs validation data (validation_file or a GLUE task)")
    metric = steps.metrics(run, task, config)
    splits = evaluation if isinstance(evaluation, dict) else {None: evaluation}
    out = {"eval": {}, "members": [{"folder": folder} for folder in folders]}
    for split, data in splits.items():
        prefix = "eval_" if split is None else f"eval_{split}_"
        logits = [predict(model, tokenizer, data, args.per_device_eval_batch_size) for model in models]
        labels = np.asarray(data["label"])
        out["eval"] |= _scored(metric, ensemble_prediction(logits), labels, prefix)
        for member, member_logits in zip(out["members"], logits):
            member |= _scored(metric, member_logits, labels, prefix)
    return out


def ensemble_prediction(logits: list[np.ndarray]) -> np.ndarray:
    """The BAN ensemble: log of the mean of the members' softmax probabilities (N, C); a regression score
    (N, 1) is the mean score. The log keeps the argmax and hands metrics logits-like values."""
    stacked = torch.as_tensor(np.stack(logits), dtype=torch.float64)
    if stacked.shape[-1] == 1:
        return stacked.mean(0).numpy()
    return stacked.softmax(-1).mean(0).log().numpy()


def _scored(metric, predictions: np.ndarray, labels: np.ndarray, prefix: str) -> dict:
    if metric is None:
        return {}
    values = metric(EvalPrediction(predictions=predictions, label_ids=labels))
    return {prefix + k: float(v) for k, v in values.items()}


@torch.no_grad()
def predict(model, tokenizer, data, batch_size: int) -> np.ndarray:
    """(N, C) float32 logits of a tokenised dataset, in its order, with training's right-padding collator."""
    collate = DistillationCollator(tokenizer, config=model.config)
    keys = forward_keys(model)
    chunks = []
    for start in range(0, len(data), batch_size):
        rows = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        batch = collate(rows)
        chunks.append(model(**select_inputs(batch, keys)).logits.float())
    return torch.cat(chunks).numpy()


def _publish(last: str, output_dir: str, report_name: str, report: dict) -> None:
    """output_dir becomes the last generation: its model, tokenizer and card files, and the final report."""
    for name in os.listdir(last):
        path = os.path.join(last, name)
        if os.path.isfile(path) and name not in (report_name, STAMP):
            shutil.copy2(path, os.path.join(output_dir, name))
    write_json(os.path.join(output_dir, report_name), report)
