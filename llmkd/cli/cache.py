"""`llmkd cache-teacher RECIPE.yaml`: the recipe's teacher, run once over the recipe's tokenised data."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from transformers import AutoTokenizer

from llmkd.cli.recipe import RunConfig, load_stages
from llmkd.modeling import SEQ_CLS
from llmkd.schemes.config import DistillationConfig
from llmkd.teachers.cached.binding import named_splits
from llmkd.teachers.cached.fingerprint import teacher_key
from llmkd.teachers.cached.writer import VALUE_DTYPES, write_cache
from llmkd.teachers.live import DTYPES

logger = logging.getLogger(__name__)


def _help(text: str, default=None):
    return field(default=default, metadata={"help": text})


@dataclass
class CacheRunConfig(RunConfig):
    """A distillation recipe plus where and how to cache the teacher's outputs."""

    teacher_cache: str | None = _help(
        "Teacher-logit cache folder: written by `llmkd cache-teacher`, read by the distillation run, which then "
        "never loads the teacher."
    )
    cache_top_k: int = _help(
        "Causal LMs: top-k log-probabilities kept per position (+ the rest's log-mass); classifiers keep all.",
        64,
    )
    cache_dtype: str = _help(
        "Stored log-probability dtype: float16 (faithful, default), bfloat16 or float32.", "float16"
    )
    cache_batch_size: int = _help("Rows per teacher forward while caching (> 0).", 8)
    cache_rows_per_shard: int = _help("Rows per safetensors shard, the unit of resume (> 0).", 1024)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.cache_top_k, int) or self.cache_top_k < 1:
            raise ValueError(f"cache_top_k must be a positive integer, got {self.cache_top_k!r}")
        if self.cache_dtype not in VALUE_DTYPES:
            raise ValueError(f"cache_dtype={self.cache_dtype!r}: choose one of {sorted(VALUE_DTYPES)}")
        for name in ("cache_batch_size", "cache_rows_per_shard"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def cache_teacher(config_path: str, overrides: list[str] = ()) -> dict:
    """Writes (or finishes) the cache of a recipe's last stage; returns the manifest.

    Same models and tokenisation as `llmkd distill` (llmkd.cli.pipeline.build_data with the tokenizer the student
    uses), so the distillation run finds every row. The teacher runs on `args.device` (a GPU when there is one).
    """
    from llmkd.cli.pipeline import build_data
    from llmkd.students.loading import detect_task, load_model, resolve_path

    stages = load_stages(config_path, list(overrides), CacheRunConfig, DistillationConfig)
    if (
        len(stages) > 1
    ):  # a later stage's student (and its tokenizer) exists only after the earlier stages ran
        raise ValueError(
            f"{config_path} has {len(stages)} stages; cache the teacher for a one-stage recipe (e.g. the last "
            "stage's keys with student: set to the previous stage's output)"
        )
    run, args = stages[0]
    run.teacher, run.student = resolve_path(run.teacher), resolve_path(run.student)
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
