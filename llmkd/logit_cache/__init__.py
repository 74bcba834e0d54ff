"""Teacher-logit cache: run the teacher once, store its top-k log-probabilities, train without it.

- :func:`write_cache` (Python) / ``llmkd cache-teacher RECIPE.yaml`` (CLI) write a cache folder;
- :class:`CachedTeacher` reads it, :func:`cached_trainer_kwargs` checks it against a run and adds the
  ``cache_index`` column, :class:`CachedDistillationTrainer` trains from it;
- :func:`bucketed_logit_loss` is the (k + 1)-bucket loss (see :mod:`llmkd.logit_cache.loss`).

Format and numbers: docs/logit_cache.md.
"""

from llmkd.logit_cache.trainer import (
    CACHE_COLUMN,
    CachedDistillationTrainer,
    attach_cache_index,
    cached_trainer_kwargs,
    named_splits,
)
from llmkd.losses.bucketed import bucketed_logit_loss, student_buckets
from llmkd.teachers.cached.fingerprint import CacheMismatchError
from llmkd.teachers.cached.reader import CachedTeacher, CachedTeacherOutput
from llmkd.teachers.cached.writer import topk_targets, write_cache

__all__ = [
    "CACHE_COLUMN",
    "CacheMismatchError",
    "CachedDistillationTrainer",
    "CachedTeacher",
    "CachedTeacherOutput",
    "attach_cache_index",
    "bucketed_logit_loss",
    "cached_trainer_kwargs",
    "named_splits",
    "student_buckets",
    "topk_targets",
    "write_cache",
]
