"""`llmkd cache-teacher RECIPE.yaml`: the recipe's teacher, run once over the recipe's tokenised data."""

from __future__ import annotations

import logging

from transformers import AutoTokenizer

from llmkd.cli.preflight import check_model_folder
from llmkd.cli.recipe import RunConfig, load_stages
from llmkd.modeling import SEQ_CLS
from llmkd.schemes.config import DistillationConfig
from llmkd.teachers.cached.binding import named_splits
from llmkd.teachers.cached.fingerprint import teacher_key
from llmkd.teachers.cached.writer import write_cache
from llmkd.teachers.live import DTYPES

logger = logging.getLogger(__name__)


def cache_teacher(config_path: str, overrides: list[str] = ()) -> dict:
    """Writes (or finishes) the cache of a recipe's last stage; returns the manifest.

    Same models and tokenisation as `llmkd distill` (llmkd.cli.pipeline.build_data with the tokenizer the student
    uses), so the distillation run finds every row. The teacher runs on `args.device` (a GPU when there is one).
    """
    from llmkd.cli.pipeline import build_data
    from llmkd.students.loading import detect_task, load_model, resolve_path

    stages = load_stages(config_path, list(overrides), RunConfig, DistillationConfig)
    if (
        len(stages) > 1
    ):  # a later stage's student (and its tokenizer) exists only after the earlier stages ran
        raise ValueError(
            f"{config_path} has {len(stages)} stages; cache the teacher for a one-stage recipe (e.g. the last "
            "stage's keys with student: set to the previous stage's output)"
        )
    run, args = stages[0]
    run.teacher, run.student = resolve_path(run.teacher), resolve_path(run.student)
    check_model_folder("teacher", run.teacher)  # llmkd.cli.preflight: a missing path, no tokenizer
    check_model_folder("student", run.student)
    if not run.teacher_cache:
        raise ValueError(
            "no cache folder: set teacher_cache: FOLDER in the recipe or pass --teacher_cache FOLDER"
        )
    common = {"revision": run.teacher_revision, "trust_remote_code": run.trust_remote_code}
    task = run.task or detect_task(run.teacher, **common)
    teacher = load_model(run.teacher, task, attn_implementation=run.attn_implementation, **common)
    if args.teacher_dtype in DTYPES:
        teacher.to(DTYPES[args.teacher_dtype])
    teacher.to(args.device).requires_grad_(False)
    if run.student is not None:  # the distillation run tokenises with the student's tokenizer
        tokenizer = AutoTokenizer.from_pretrained(run.student, trust_remote_code=run.trust_remote_code)
    else:
        tokenizer = AutoTokenizer.from_pretrained(run.teacher, **common)
    train, evaluation = build_data(run, task, tokenizer, teacher.config if task == SEQ_CLS else None)
    return write_cache(
        teacher,
        tokenizer,
        named_splits(train, evaluation),
        run.teacher_cache,
        k=run.cache_top_k,
        temperature=args.temperature,
        value_dtype=run.cache_dtype,
        max_length=run.max_length,
        batch_size=run.cache_batch_size,
        rows_per_shard=run.cache_rows_per_shard,
        teacher_key=teacher_key(run.teacher, run.teacher_revision),
    )


def summary(manifest: dict) -> dict:
    """The manifest's headline numbers, for the command line."""
    keys = ("fingerprint", "task", "k", "temperature", "value_dtype", "id_dtype", "num_rows", "num_positions")
    return {k: manifest[k] for k in (*keys, "bytes", "bytes_per_position", "splits")}
