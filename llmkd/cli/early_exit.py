"""Recipes with ``trainer: early_exit``: the classifier that gets exits is its own teacher, so it is loaded once.

`llmkd.cli.pipeline.distill_stage` calls `own_models` instead of building a teacher and a student: the model named
by ``student`` is passed as both (the scheme accepts its own model as teacher, llmkd.schemes.early_exit), and
``teacher`` (which every recipe names) must name that same model.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoTokenizer

from llmkd.modeling import SEQ_CLS
from llmkd.students.loading import detect_task, load_model, resolve_path

logger = logging.getLogger(__name__)


def check_run(run) -> None:
    """Refuses, before any model is loaded, what a self-distilled exit run cannot use (naming the fix)."""
    if run.student is None:
        raise ValueError(
            "trainer: early_exit adds exits to a trained classifier: set student: PATH (the classifier itself) "
            "instead of student_layers / student_config"
        )
    if _same_path(run.teacher) != _same_path(run.student):
        raise ValueError(
            f"trainer: early_exit distils a model into its own exits, so teacher must name the student "
            f"(teacher={run.teacher!r}, student={run.student!r}); set teacher: {run.student}"
        )
    options = [name for name in ("lora", "qlora", "qat") if getattr(run, name)]
    if options:
        raise ValueError(f"{options} cannot be combined with trainer: early_exit; remove them")


def _same_path(name: str) -> str:
    path = resolve_path(name)
    return os.path.realpath(path) if os.path.isdir(path) else path


def own_models(run, args) -> tuple:
    """(task, model, tokenizer, model, tokenizer): the classifier as teacher and as student, as
    `llmkd.cli.pipeline.build_models` returns them."""
    check_run(run)
    run.student = run.teacher = resolve_path(run.student)
    common = {"revision": run.teacher_revision, "trust_remote_code": run.trust_remote_code}
    task = run.task or detect_task(run.student, **common)
    if task != SEQ_CLS:
        raise ValueError(
            f"trainer: early_exit needs a sequence classifier, but {run.student!r} is a {task} model"
        )
    model = load_model(run.student, task, attn_implementation=run.attn_implementation, **common)
    tokenizer = AutoTokenizer.from_pretrained(run.student, **common)
    if run.student_dtype == "float32" and model.dtype != torch.float32:
        logger.info("weights %s -> float32 for training (student_dtype: auto keeps them)", model.dtype)
        model.float()
    if run.freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    return task, model, tokenizer, model, tokenizer
