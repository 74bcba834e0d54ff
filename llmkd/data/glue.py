"""The GLUE benchmark (Wang et al., 2019): task table, metrics, data loading and label alignment.

Columns, label orders and split names follow the Hub dataset `nyu-mll/glue`, so local files in the same layout
and the Hub copy are interchangeable. Metrics come from scikit-learn / scipy: the `evaluate` library fetches its
metric scripts from the Hub.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from datasets import Dataset, DatasetDict, load_dataset

from llmkd.data.loading import FORMATS, read_files

logger = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"
LABEL = "label"


@dataclass(frozen=True)
class GlueTask:
    name: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]  # empty for the regression task (stsb)
    metrics: tuple[str, ...]
    main_metric: str  # the one to select checkpoints on; the task's score averages all `metrics` (or:)
    validation_splits: tuple[str, ...] = ("validation",)
    # The metrics the task's score averages (empty: all of `metrics`). A user's data (llmkd.evaluation.any_data)
    # is scored on accuracy, with macro-F1 reported beside it.
    score_metrics: tuple[str, ...] = ()

    @property
    def num_labels(self) -> int:
        return len(self.label_names) or 1

    @property
    def is_regression(self) -> bool:
        return not self.label_names


_ENTAIL = ("entailment", "not_entailment")
GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(
        "cola",
        ("sentence",),
        ("unacceptable", "acceptable"),
        ("matthews_correlation",),
        "matthews_correlation",
    ),
    "sst2": GlueTask("sst2", ("sentence",), ("negative", "positive"), ("accuracy",), "accuracy"),
    "mrpc": GlueTask(
        "mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy"), "f1"
    ),
    "stsb": GlueTask("stsb", ("sentence1", "sentence2"), (), ("pearson", "spearmanr"), "pearson"),
    "qqp": GlueTask(
        "qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy"), "f1"
    ),
    "mnli": GlueTask(
        "mnli",
        ("premise", "hypothesis"),
        ("entailment", "neutral", "contradiction"),
        ("accuracy",),
        "accuracy",
        ("validation_matched", "validation_mismatched"),
    ),
    "qnli": GlueTask("qnli", ("question", "sentence"), _ENTAIL, ("accuracy",), "accuracy"),
    "rte": GlueTask("rte", ("sentence1", "sentence2"), _ENTAIL, ("accuracy",), "accuracy"),
    # WNLI's Hub order is the reverse of RTE/QNLI's: a shared table would silently invert it.
    "wnli": GlueTask(
        "wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",), "accuracy"
    ),
}


def get_task(task: str | GlueTask) -> GlueTask:
    if isinstance(task, GlueTask):
        return task
    if task not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; choose one of {sorted(GLUE_TASKS)}")
    return GLUE_TASKS[task]


# ------------------------------------------------------------------------------------------------- data


def find_split_files(data_dir: str, splits: Sequence[str]) -> dict[str, str]:
    """`<data_dir>/<split>.<ext>` for each split, in any one supported format."""
    files = {}
    for split in splits:
        found = [os.path.join(data_dir, split + ext) for ext in FORMATS]
        found = [path for path in found if os.path.isfile(path)]
        if not found:
            raise FileNotFoundError(
                f"no {split} file in {data_dir!r}: expected {split}.<ext> with ext one of {sorted(FORMATS)}"
            )
        files[split] = found[0]
    return files


def _label_key(name) -> str:
    # "NOT ENTAILMENT", "not-entailment" and "not_entailment" name one class.
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


def label_ids(task: GlueTask, values) -> list:
    """Label names (in any case) to the task's ids; ids and stsb scores pass through."""
    if task.is_regression:
        return [float(v) for v in values]
    index = {_label_key(name): i for i, name in enumerate(task.label_names)}
    out = []
    for value in values:
        if isinstance(value, str) and not value.lstrip("-").isdigit():
            if _label_key(value) not in index:
                raise ValueError(f"{task.name}: label {value!r} is not one of {list(task.label_names)}")
            value = index[_label_key(value)]
        out.append(int(value))
    return out


def prepare_split(task: str | GlueTask, dataset: Dataset, split: str = "data") -> Dataset:
    """Checks the task's columns and turns label names into ids in the task's order."""
    task = get_task(task)
    needed = [*task.text_columns, LABEL]
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{task.name} {split}: columns {missing} are missing; the data has {dataset.column_names}, "
            f"the task needs {needed} (the column names of the Hub dataset {HUB_DATASET})"
        )
    if dataset.features[LABEL].dtype in ("string", "large_string"):
        ids = label_ids(task, dataset[LABEL])
        dataset = dataset.remove_columns(LABEL).add_column(LABEL, ids)
    return dataset


def load_glue(
    task: str | GlueTask,
    data_dir: str | None = None,
    data_files: Mapping[str, str] | None = None,
    splits: Sequence[str] | None = None,
) -> DatasetDict:
    """Train and validation split(s) of a GLUE task: from the Hub, or local files in the Hub's column layout.

    `data_dir` holds `<split>.<ext>` (csv, tsv, json, jsonl or parquet), e.g. train.csv and validation.csv
    (mnli: validation_matched / validation_mismatched); `data_files` maps split names to paths instead.
    `splits` picks the splits (default: train and the validation split(s)).
    """
    task = get_task(task)
    splits = list(splits or ("train", *task.validation_splits))
    if data_files is not None:
        missing = [s for s in splits if s not in data_files]
        if missing:
            raise ValueError(f"data_files has {sorted(data_files)} but not the splits {missing}")
        raw = read_files({s: data_files[s] for s in splits})
    elif data_dir is not None:
        raw = read_files(find_split_files(data_dir, splits))
    else:
        hub = load_dataset(HUB_DATASET, task.name)
        raw = DatasetDict({s: hub[s] for s in splits})
    return DatasetDict({s: prepare_split(task, raw[s], s) for s in splits})


DataSource = DatasetDict | Mapping[str, DatasetDict] | Callable[[str], DatasetDict] | None


def resolve_tasks(task: str | Sequence[str]) -> list[str]:
    """'all', one name, 'sst2,mrpc' or a list -> task names (each checked)."""
    names = task.split(",") if isinstance(task, str) else list(task)
    names = list(GLUE_TASKS) if names == ["all"] else [n.strip() for n in names]
    return [get_task(n).name for n in names]


def load_validation(
    task: str | GlueTask,
    data: DataSource = None,
    data_dir: str | None = None,
    max_eval_samples: int | None = None,
) -> dict[str, Dataset]:
    """{split: Dataset} for the task's validation split(s), checked, label names mapped to ids, first N kept.

    `data`: a DatasetDict, {task: DatasetDict} or a callable task -> DatasetDict; None reads `data_dir`
    (one task's files, or a `<task>/` folder per task) or the Hub.
    """
    spec = get_task(task)
    if data is None:
        nested = data_dir and os.path.isdir(os.path.join(data_dir, spec.name))
        folder = os.path.join(data_dir, spec.name) if nested else data_dir
        splits = load_glue(spec, data_dir=folder, splits=spec.validation_splits)
    else:
        splits = (
            data(spec.name) if callable(data) else data if isinstance(data, DatasetDict) else data[spec.name]
        )
    missing = [s for s in spec.validation_splits if s not in splits]
    if missing:
        raise ValueError(f"{spec.name}: the data has splits {sorted(splits)} but not {missing}")
    out = {}
    for split in spec.validation_splits:
        dataset = prepare_split(spec, splits[split], split)
        if max_eval_samples is not None:
            dataset = dataset.select(range(min(max_eval_samples, len(dataset))))
        if len(dataset) == 0:
            raise ValueError(f"{spec.name} {split} is empty; check the data files")
        out[split] = dataset
    return out


# ---------------------------------------------------------------------------------------- label alignment


def model_label_names(config) -> list[str]:
    """The class name of each logit, in the model's order (from `id2label`, which is what names its outputs)."""
    id2label = {int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}
    names = [str(id2label.get(i, f"LABEL_{i}")) for i in range(config.num_labels)]
    label2id = getattr(config, "label2id", None) or {}
    if label2id and {str(k): int(v) for k, v in label2id.items()} != {n: i for i, n in enumerate(names)}:
        logger.warning("config.label2id %s disagrees with id2label %s; using id2label", label2id, id2label)
    return names


def _is_generic(names: Sequence[str]) -> bool:
    return all(re.fullmatch(r"LABEL_\d+", n, flags=re.IGNORECASE) for n in names)


def align_labels(task_or_names, model_config) -> dict[int, int] | None:
    """Dataset label id -> model logit index, or None when they already agree (or cannot be checked).

    A checkpoint trained with another class order is silently wrong without this: an MNLI model with
    contradiction and entailment swapped scores near 0% instead of 84%. Generic `LABEL_k` names are taken to
    be in the dataset's order (with a warning); the same names in another order give a remapping; other names
    or another number of labels are an error.
    """
    if isinstance(task_or_names, (str, GlueTask)):
        task = get_task(task_or_names)
        data_names, expected = list(task.label_names), task.num_labels
    else:
        data_names = [str(n) for n in task_or_names]
        expected = len(data_names) or 1
    model_names = model_label_names(model_config)
    if len(model_names) != expected:
        raise ValueError(
            f"label mismatch: the model has num_labels={len(model_names)} ({dict(enumerate(model_names))}) but "
            f"the data has {expected} ({dict(enumerate(data_names))}); use a checkpoint fine-tuned for this task"
        )
    if not data_names:  # one regression score: nothing to order
        return None
    if _is_generic(model_names):
        logger.warning(
            "the model's labels are generic (%s): assuming they follow the data's order %s, which cannot be "
            "checked; set config.id2label/label2id to the class names to have it checked",
            model_names,
            data_names,
        )
        return None
    model_keys, data_keys = [_label_key(n) for n in model_names], [_label_key(n) for n in data_names]
    if model_keys == data_keys:
        return None
    if sorted(model_keys) == sorted(data_keys) and len(set(model_keys)) == len(model_keys):
        return {d: model_keys.index(key) for d, key in enumerate(data_keys)}
    raise ValueError(
        f"label mismatch: the model's labels are {dict(enumerate(model_names))} but the data's are "
        f"{dict(enumerate(data_names))}; use a checkpoint fine-tuned on this task, or, if the classes are the "
        "same under other names, set the model's config.id2label/label2id to the data's names"
    )


def remap_dataset_labels(dataset: Dataset, mapping: Mapping[int, int] | None) -> Dataset:
    """Rewrites the "label" column into the model's ids (from `align_labels`); -1 (unlabelled) is kept."""
    if not mapping:
        return dataset
    return dataset.map(
        lambda batch: {LABEL: [mapping.get(int(y), int(y)) if y >= 0 else y for y in batch[LABEL]]},
        batched=True,
        desc="aligning labels",
    )


def to_dataset_order(logits, mapping: Mapping[int, int] | None) -> np.ndarray:
    """Reorders logit columns so that column d is the dataset's label d (the inverse view of the remap)."""
    logits = np.asarray(logits)
    if not mapping:
        return logits
    return logits[:, [mapping[d] for d in range(len(mapping))]]
