"""Training from a teacher-logit cache: `CachedDistillationTrainer` and what a pipeline passes to it.

The normalisation contract is the parent's: per-position values reduced once by a masked sum over the number of
supervised items of the whole accumulation window. Only where the teacher's distribution comes from changes.
"""

from __future__ import annotations

import os

from datasets import Dataset

from llmkd import alignment as A
from llmkd.losses.bucketed import RAW_LOGIT_LOSSES, bucketed_logit_loss
from llmkd.teachers.cached import fingerprint as F
from llmkd.teachers.cached.reader import CachedTeacher
from llmkd.trainer import DistillationTrainer

CACHE_COLUMN = "cache_index"


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
    """Opens and checks a cache for this run; returns the kwargs `CachedDistillationTrainer` needs.

    `cache` is a folder or a `CachedTeacher`; `run` (a recipe's RunConfig) adds the teacher, max_length and,
    when present, cache_top_k/cache_dtype to the check. Usage::

        kwargs = cached_trainer_kwargs(run.teacher_cache, args=args, train_dataset=train, eval_dataset=evaluation,
                                       processing_class=student_tok, run=run)
        trainer = CachedDistillationTrainer(model=student, data_collator=collator, processing_class=student_tok,
                                            **kwargs)
    """
    teacher = cache if isinstance(cache, CachedTeacher) else CachedTeacher(cache)
    splits = named_splits(train_dataset, eval_dataset)
    expected = expected_components(args, processing_class, splits, run)
    if teacher.task == A.SEQ_CLS:  # raw logits are cached: any temperature works
        expected["temperature"] = expected["k"] = expected["value_dtype"] = None
    teacher.check(expected)
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


class CachedDistillationTrainer(DistillationTrainer):
    """A `DistillationTrainer` whose teacher is a `CachedTeacher` (or a cache folder): the teacher is never loaded.

    Causal LMs: each logit term is ``bucketed_logit_loss`` on the teacher's top-k + rest buckets (exact for the
    buckets, a lower bound of the full divergence; equal to it when k = V). Classifiers: all logits are cached,
    so every term equals the live-teacher one. Hidden, attention and relation terms are refused.
    """

    def __init__(self, model=None, teacher=None, args=None, **kwargs):
        if isinstance(teacher, (str, os.PathLike)):
            teacher = CachedTeacher(teacher)
        if not isinstance(teacher, CachedTeacher):
            raise TypeError(
                f"CachedDistillationTrainer takes teacher=CachedTeacher(folder) or a cache folder, got "
                f"{type(teacher).__name__}; use DistillationTrainer for a live teacher"
            )
        self._last_cached = None
        super().__init__(model=model, teacher=teacher, args=args, **kwargs)

    def _place_teacher(self, teacher):
        return teacher  # no weights: nothing to freeze, move, shard or wrap

    def _validate_pair(self, student, teacher, args, student_tok, teacher_tok) -> None:
        features = sorted({t.knowledge for t in self.terms} - {"logits"})
        if features:
            raise ValueError(
                f"{features} terms need the teacher's hidden states or attention maps, which a logit cache does not "
                "hold; drop them, or distil with the live teacher (no teacher_cache)"
            )
        self._set_task(student, teacher.task, "cached teacher")
        if self.task == A.SEQ_CLS:
            A.check_labels(student, teacher)
        else:
            self._check_causal(student, teacher, args)
        key = teacher.components.get("tokenizer")
        if student_tok is not None and key is not None and F.tokenizer_key(student_tok) != key:
            raise F.CacheMismatchError(
                f"the student's tokenizer differs from the one the teacher cache {teacher.path} was built with; "
                f"the cached token ids would mean other tokens. {F.FIX}"
            )
        self.vocab_rows, self.layer_maps = None, {}
        self.need_hidden = self.need_attentions = self.fused = False

    def _check_causal(self, student, teacher, args) -> None:
        rows = A.output_rows(student)
        if rows != teacher.vocab_size:
            raise ValueError(
                f"vocabulary mismatch: the student has {rows} logit rows, the cached teacher {teacher.vocab_size}; "
                "a cache serves students of the teacher's vocabulary only"
            )
        raw = sorted({t.loss for t in self.terms} & RAW_LOGIT_LOSSES)
        if raw:
            raise ValueError(
                f"logit loss {raw} compares raw logits, which a top-k cache does not keep; use a KL/JSD"
            )
        if float(args.temperature) != teacher.temperature:
            raise F.CacheMismatchError(
                f"temperature {args.temperature} differs from the teacher cache's {teacher.temperature} (the cached "
                f"log-probabilities are softmax(z / {teacher.temperature})); set temperature: {teacher.temperature} "
                f"or {F.FIX}"
            )

    def _check_datasets(self, args, train_dataset, eval_dataset) -> None:
        super()._check_datasets(args, train_dataset, eval_dataset)
        for split, data in (("train", train_dataset), ("eval", eval_dataset)):
            datasets = data.values() if isinstance(data, dict) else [data]
            for dataset in datasets:
                columns = getattr(dataset, "column_names", None)
                if columns is not None and CACHE_COLUMN not in columns:
                    raise ValueError(
                        f"the {split} dataset has no {CACHE_COLUMN!r} column, so its rows cannot find their cached "
                        "teacher outputs; build the datasets with llmkd.logit_cache.cached_trainer_kwargs"
                    )

    def _teacher_forward(self, inputs, flags):
        self._last_cached = super()._teacher_forward(inputs, flags)
        return self._last_cached

    def _term_values(self, index, term, student_out, teacher_out, inputs):
        if self.task == A.SEQ_CLS:
            return super()._term_values(index, term, student_out, teacher_out, inputs)
        values = bucketed_logit_loss(
            student_out.logits,  # unsliced (see CachedTeacherOutput); the causal shift is applied to the values
            teacher_out.topk_ids,
            teacher_out.topk_logprobs,
            teacher_out.rest_logmass,
            loss=term.loss,
            temperature=self.args.temperature,
            **term.params,
        )
        return values[:, :-1], self._target_mask(inputs), "targets"

    def _accumulate_agreement(self, student_logits, teacher_logits, inputs) -> None:
        if self.task == A.SEQ_CLS:
            return super()._accumulate_agreement(student_logits, teacher_logits, inputs)
        mask = self._target_mask(inputs)
        agree = (student_logits[:, :-1].argmax(-1) == self._last_cached.topk_ids[:, :-1, 0]) & mask
        self._accumulate("eval", {"agreement": agree.sum().float() / mask.sum().clamp(min=1)})
