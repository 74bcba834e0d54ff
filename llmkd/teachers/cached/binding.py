"""Binding a run's datasets to a teacher-logit cache: each row gets the `cache_index` of its cached outputs.

`cached_trainer_kwargs` opens and checks a cache for a run (tokenizer, data, temperature, teacher, …: every
component the run can vouch for) and returns what a trainer takes: ``teacher=`` the `CachedTeacher` source and the
datasets with their `cache_index` column.
"""

from __future__ import annotations

from datasets import Dataset

from llmkd import modeling as A
from llmkd.teachers.cached import fingerprint as F
from llmkd.teachers.cached.reader import CACHE_COLUMN, CachedTeacher


def named_splits(train_dataset, eval_dataset=None) -> dict:
    """{'train': …, 'eval': …} or the eval dict's own names (MNLI): the split names a cache is keyed by."""
    splits = {"train": train_dataset} if train_dataset is not None else {}
    if isinstance(eval_dataset, dict):
        splits.update(eval_dataset)
    elif eval_dataset is not None:
        splits["eval"] = eval_dataset
    return splits


def attach_cache_index(dataset: Dataset, cache: CachedTeacher, split: str) -> Dataset:
    """The dataset with a `cache_index` column: the global cache row of each row of `split`."""
    if split not in cache.splits:
        raise F.CacheMismatchError(
            f"the teacher cache {cache.path} has no split {split!r} (it has {sorted(cache.splits)}); {F.FIX}"
        )
    start, stop = cache.splits[split]
    if len(dataset) != stop - start:
        raise F.CacheMismatchError(
            f"the {split} data has {len(dataset)} rows but the teacher cache {cache.path} holds {stop - start}; "
            f"{F.FIX}"
        )
    if CACHE_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(CACHE_COLUMN)
    return dataset.add_column(CACHE_COLUMN, list(range(start, stop)))


def expected_components(args=None, processing_class=None, splits=None, run=None) -> dict:
    """The components a training run can vouch for; None leaves a component unchecked."""
    expected = {
        "tokenizer": F.tokenizer_key(processing_class) if processing_class is not None else None,
        "data": {name: F.data_key(data) for name, data in (splits or {}).items()},
    }
    if args is not None:
        expected["temperature"] = float(args.temperature)
        expected["teacher_dtype"] = None if args.teacher_dtype == "auto" else args.teacher_dtype
    if run is not None:
        expected["teacher"] = F.teacher_key(run.teacher, run.teacher_revision)
        expected["max_length"] = run.max_length
        expected["k"] = getattr(run, "cache_top_k", None)
        expected["value_dtype"] = getattr(run, "cache_dtype", None)
    return expected


def cached_trainer_kwargs(
    cache, *, args, train_dataset, eval_dataset=None, processing_class=None, run=None
) -> dict:
    """Opens and checks a cache for this run; returns the kwargs a trainer needs (``teacher`` is the cache).

    `cache` is a folder or a `CachedTeacher`; `run` (a recipe's RunConfig) adds the teacher, max_length and,
    when present, cache_top_k/cache_dtype to the check. Usage::

        kwargs = cached_trainer_kwargs(run.teacher_cache, args=args, train_dataset=train, eval_dataset=evaluation,
                                       processing_class=student_tok, run=run)
        trainer = DistillationTrainer(model=student, data_collator=collator, processing_class=student_tok, **kwargs)
    """
    teacher = cache if isinstance(cache, CachedTeacher) else CachedTeacher(cache)
    splits = named_splits(train_dataset, eval_dataset)
    expected = expected_components(args, processing_class, splits, run)
    if teacher.task == A.SEQ_CLS:  # raw logits are cached: any temperature works
        expected["temperature"] = expected["k"] = expected["value_dtype"] = None
    teacher.check_components(expected)
    indexed = {name: attach_cache_index(data, teacher, name) for name, data in splits.items()}
    evaluation = None
    if isinstance(eval_dataset, dict):
        evaluation = {name: indexed[name] for name in eval_dataset}
    elif eval_dataset is not None:
        evaluation = indexed["eval"]
    return {
        "teacher": teacher,
        "args": args,
        "train_dataset": indexed.get("train"),
        "eval_dataset": evaluation,
    }
