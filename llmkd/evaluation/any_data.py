"""`llmkd eval --validation_file FILE`: checkpoints scored on a user's own classification (or regression) data.

The columns come from the flags, else from what a checkpoint recorded when llmkd trained it (its
llmkd_report.json "data" or "recipe": text_columns, label_column), else from the data: a column named label or
labels, and the one text column left (or a GLUE sentence pair such as sentence1/sentence2). Labels written as
names are matched to each checkpoint's id2label by name (case, spaces and hyphens ignored), so their order in the
file does not matter; integer labels are class ids in the reference checkpoint's order (other checkpoints are
aligned to it by name, as for GLUE). Every checkpoint's label set is checked against the data before any is
evaluated. Metrics: accuracy and macro-F1, the score (and % of / Δ to the reference) being accuracy; regression
checkpoints (num_labels = 1): Pearson and Spearman, the score their mean. Each comes with a bootstrap interval
(llmkd.evaluation.intervals).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence

from datasets import Dataset, DatasetDict, Value
from torch import nn

from llmkd.data.glue import (
    GLUE_TASKS,
    LABEL,
    GlueTask,
    _is_generic,
    _label_key,
    align_labels,
    model_label_names,
    prepare_split,
)
from llmkd.data.loading import check_labels, check_texts, missing_columns, read_files
from llmkd.evaluation.checkpoints import _config, evaluate_checkpoints
from llmkd.modeling import SEQ_CLS

CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
REGRESSION_METRICS = ("pearson", "spearmanr")
LABEL_COLUMNS = ("label", "labels")  # guessed as the label column, in any case
# Two text columns are taken as a sentence pair without --text_columns only when they are a GLUE pair.
TEXT_PAIRS = sorted({t.text_columns for t in GLUE_TASKS.values() if len(t.text_columns) == 2})
TEXT_TYPES = ("string", "large_string")


def _types(dataset: Dataset) -> str:
    """ "review (text), stars (int64)": the columns and what they hold, for error messages."""

    def kind(feature) -> str:
        if isinstance(feature, Value):
            return "text" if feature.dtype in TEXT_TYPES else feature.dtype
        return str(feature)

    return ", ".join(f"{c} ({kind(dataset.features[c])})" for c in dataset.column_names)


def recorded_columns(checkpoints: Mapping) -> dict[str, dict]:
    """{checkpoint name: {"validation_file", "text_columns": [...], "label_column"}} from the llmkd_report.json
    that llmkd writes beside a trained checkpoint (or an export's .onnx file); checkpoints without one are left out."""
    out = {}
    for name, source in checkpoints.items():
        if isinstance(source, nn.Module):
            continue
        path = os.fspath(source)
        record = recorded_data(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
        text = record.get("text_columns")
        if text:
            out[name] = record | {"text_columns": [text] if isinstance(text, str) else list(text)}
    return out


def recorded_file(checkpoints: Mapping) -> str | None:
    """The validation file the checkpoints were trained with (llmkd_report.json), when it is here; None when none
    recorded one. Raises ValueError when they recorded different files that exist."""
    files = {}
    for name, record in recorded_columns(checkpoints).items():
        path = record.get("validation_file")
        if path and os.path.exists(path):
            files.setdefault(os.path.abspath(path), []).append(name)
    if len(files) > 1:
        said = "; ".join(f"{', '.join(names)}: {path}" for path, names in files.items())
        raise ValueError(
            f"the checkpoints were validated on different files ({said}); pass --validation_file"
        )
    return next(iter(files), None)


def _from_records(field: str, records: dict, columns: list[str], where: str):
    """(value, "recorded by 'name'") when the checkpoints that recorded `field` agree on one present in the data."""
    found = {}
    for name, record in records.items():
        value = record.get(field)
        needed = value if isinstance(value, list) else [value]
        if value and all(c in columns for c in needed):
            found.setdefault(tuple(needed), []).append(name)
    if len(found) > 1:
        said = "; ".join(f"{', '.join(names)}: {list(v)}" for v, names in found.items())
        flag = "--text_columns" if field == "text_columns" else "--label_column"
        raise ValueError(f"{where}: the checkpoints recorded different {field} ({said}); pass {flag}")
    if not found:
        return None, None
    value, names = next(iter(found.items()))
    return (list(value) if field == "text_columns" else value[0]), f"recorded by {', '.join(names)}"


def _guess_label(dataset: Dataset, where: str) -> str:
    found = [c for c in dataset.column_names if c.lower() in LABEL_COLUMNS]
    if len(found) != 1:
        why = "no column is named label or labels" if not found else f"{found} could each be the labels"
        raise ValueError(
            f"{where}: cannot tell the label column ({why}); the columns are {_types(dataset)}; "
            "pass --label_column NAME"
        )
    return found[0]


def _guess_text(dataset: Dataset, label_column: str, where: str) -> list[str]:
    features = dataset.features
    texts = [
        c
        for c in dataset.column_names
        if c != label_column and isinstance(features[c], Value) and features[c].dtype in TEXT_TYPES
    ]
    if len(texts) == 1:
        return texts
    pair = [p for p in TEXT_PAIRS if set(p) == set(texts)]
    if pair:
        return list(pair[0])
    why = "it has no text column" if not texts else f"the text columns {texts} could each be the input"
    raise ValueError(
        f"{where}: cannot tell which columns to classify ({why}); the columns are {_types(dataset)}; pass "
        "--text_columns NAME (or two names for a sentence pair)"
    )


def resolve_columns(
    dataset: Dataset, where: str, text_columns=None, label_column=None, records: dict | None = None
) -> tuple[list[str], str, str]:
    """(text columns, label column, where each came from): flags, else the checkpoints' records, else a guess.

    Raises ValueError naming the file's columns when a given column is missing or a guess is ambiguous."""
    columns, records = dataset.column_names, records or {}
    text = [text_columns] if isinstance(text_columns, str) else list(text_columns or [])
    text_from = "--text_columns" if text else None
    label_from = "--label_column" if label_column else None
    if message := missing_columns(dataset, [*text, *([label_column] if label_column else [])], where):
        raise ValueError(message)
    if not label_column:
        label_column, label_from = _from_records("label_column", records, columns, where)
    if not text:
        text, text_from = _from_records("text_columns", records, columns, where)
    if not label_column:
        label_column, label_from = _guess_label(dataset, where), "guessed"
    if not text:
        text, text_from = _guess_text(dataset, label_column, where), "guessed"
    if label_column in text:
        raise ValueError(f"{where}: {label_column!r} is both a text column and the label column; pick one")
    return text, label_column, f"text: {text_from}; label: {label_from}"


def _name_problems(configs: Mapping, values: list[str], counts: dict, n: int) -> list[str]:
    """One line per checkpoint whose classes lack some of the data's label names."""
    problems = []
    for name, config in configs.items():
        classes = model_label_names(config)
        keys = {_label_key(c) for c in classes}
        absent = [v for v in values if _label_key(v) not in keys]
        if not absent:
            continue
        rows = sum(counts[v] for v in absent)
        generic = (
            " (no class names: set its config.id2label, or write the labels as ids)"
            if _is_generic(classes)
            else ""
        )
        problems.append(
            f"labels {absent} ({rows} of {n} rows) are not classes of checkpoint {name!r}, which has "
            f"{dict(enumerate(classes))}{generic}"
        )
    return problems


def label_space(configs: Mapping, dataset: Dataset, column: str, reference: str, where: str):
    """(the data's class names in dataset-id order — () for regression —, the dataset with numeric labels checked).

    Names come from the reference checkpoint (or the first with class names when its are generic LABEL_k and the
    labels are ids). Raises ValueError naming every checkpoint whose label set does not fit the data, and the fix.
    """
    regression = [n for n, c in configs.items() if c.num_labels == 1]
    if regression and len(regression) < len(configs):
        raise ValueError(
            f"checkpoints {regression} are regression models (num_labels=1) but "
            f"{[n for n in configs if n not in regression]} are classifiers; evaluate them separately"
        )
    if regression:
        return (), check_labels(dataset, column, 1, where=where)
    feature = dataset.features[column]
    by_name = isinstance(feature, Value) and feature.dtype in TEXT_TYPES
    if by_name and all(isinstance(v, str) and v.lstrip("-").isdigit() for v in dataset.unique(column)):
        by_name = False  # "0"/"1" written as text: ids
        dataset = dataset.cast_column(column, Value("int64"))
    if by_name:
        values = dataset[column]
        if None in values:
            raise ValueError(f"{where}: {values.count(None)} rows have no label in {column!r}; fill them in")
        counts = Counter(values)
        problems = _name_problems(configs, sorted(counts), counts, len(values))
        if problems:
            raise ValueError(
                f"{where}: "
                + "; ".join(problems)
                + "; evaluate checkpoints trained on these classes, or correct "
                "the labels (names are matched ignoring case, spaces and hyphens)"
            )
        return tuple(model_label_names(configs[reference])), dataset
    num_labels = configs[reference].num_labels
    dataset = check_labels(dataset, column, num_labels, where=where, unlabelled=False)
    named = [model_label_names(configs[n]) for n in (reference, *configs)]
    return tuple(next((names for names in named if not _is_generic(names)), named[0])), dataset


def _check_alignment(spec: GlueTask, configs: Mapping, where: str) -> None:
    for name, config in configs.items():
        try:
            align_labels(spec, config)
        except ValueError as err:
            raise ValueError(f"{where}: checkpoint {name!r}: {err}") from None


def load_data_file(
    validation_file: str,
    checkpoints: Mapping,
    text_columns: str | Sequence[str] | None = None,
    label_column: str | None = None,
    reference: str | None = None,
) -> tuple[GlueTask, DatasetDict, dict]:
    """(task spec, DatasetDict(validation=rows with the text columns and integer "label"), data record).

    `validation_file`: csv/tsv/json/jsonl/parquet or a saved dataset folder (llmkd.data.loading.read_files).
    `checkpoints` {name: folder, .onnx export or in-memory model}: their configs give the label space (see the
    module docstring); `reference` (default: the first) orders integer labels. Raises FileNotFoundError /
    ValueError (columns, texts, labels) before any model is loaded."""
    where = validation_file
    dataset = read_files({"validation": validation_file})["validation"]
    text, label, columns_from = resolve_columns(
        dataset, where, text_columns, label_column, recorded_columns(checkpoints)
    )
    check_texts(dataset, text, SEQ_CLS, where)
    configs = {n: s.config if isinstance(s, nn.Module) else _config(s) for n, s in checkpoints.items()}
    reference = reference if reference in configs else next(iter(configs))
    names, dataset = label_space(configs, dataset, label, reference, where)
    metrics = REGRESSION_METRICS if not names else CLASSIFICATION_METRICS
    stem = os.path.splitext(os.path.basename(os.path.normpath(validation_file)))[0]
    # Classifiers are compared on accuracy (macro-F1 shown beside it); regression on mean(Pearson, Spearman) as STS-B.
    spec = GlueTask(stem, tuple(text), names, metrics, metrics[0], score_metrics=metrics[:1] if names else ())
    _check_alignment(spec, configs, where)
    dataset = dataset.select_columns([*text, label])
    if label != LABEL:
        dataset = dataset.rename_column(label, LABEL)
    if not names:
        dataset = dataset.cast_column(LABEL, Value("float64"))
    record = {
        "validation_file": os.path.abspath(validation_file),
        "text_columns": text,
        "label_column": label,
        "label_names": list(names),
        "columns_from": columns_from,
        "score": list(spec.score_metrics or spec.metrics),  # what "score", % of reference and Δ are made of
    }
    return spec, DatasetDict(validation=prepare_split(spec, dataset, "validation")), record


def evaluate_file(
    checkpoints: Mapping,
    validation_file: str,
    text_columns: str | Sequence[str] | None = None,
    label_column: str | None = None,
    *,
    tokenizer=None,
    reference: str | None = "teacher",
    **kwargs,
) -> dict:
    """`evaluate_checkpoints` on a user's data file: the same results dict, with "data" recording the file, its
    columns and labels. `kwargs` go to evaluate_checkpoints (batch_size, max_length, max_eval_samples, speed_*,
    bootstrap, seed). Raises ValueError before evaluating any checkpoint when the data does not fit one."""
    if reference is not None and reference not in checkpoints:
        raise ValueError(f"reference {reference!r} is not one of the checkpoints {list(checkpoints)}")
    spec, data, record = load_data_file(validation_file, checkpoints, text_columns, label_column, reference)
    results = evaluate_checkpoints(checkpoints, spec, data, tokenizer, reference=reference, **kwargs)
    return results | {"data": record}


def recorded_data(student_dir: str) -> dict:
    """{validation_file, text_columns, label_column} that the checkpoint's llmkd_report.json records under
    "recipe" or "data" (a dict, or the recipe's YAML text), else {}."""
    try:
        with open(os.path.join(student_dir, "llmkd_report.json"), encoding="utf-8") as handle:
            report = json.load(handle)
    except (OSError, ValueError):
        return {}
    for key in ("recipe", "data"):
        value = report.get(key)
        if isinstance(value, str):
            import yaml

            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                continue
        if isinstance(value, dict) and value.get("validation_file"):
            return {k: value.get(k) for k in ("validation_file", "text_columns", "label_column")}
    return {}
