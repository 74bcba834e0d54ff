"""`llmkd compress` stage 1: check the data and the teacher, then write the files every later run reads.

Nothing is trained here; every problem `check_data` / `check_teacher` call an error stops the command with its
numbers and its fix. The files written to OUT/data:

- train.jsonl: the training rows, shuffled with the seed (a file sorted by label would otherwise hand a slice one
  class), without rows whose text is in the validation data, without the search slice;
- search.jsonl: `search_share` of the shuffled training rows, held out: the candidates are ranked and the
  teacher's fine-tuning is stopped on it, so the validation rows are never used to choose anything;
- validation.jsonl: the rows every reported score comes from (the user's file, or 10% of train, seeded).

Labels are written as class ids in the teacher's order (or, when the teacher is fine-tuned first, in the order of
`classes`), so that every run reads them the same way whatever the user's file held (names, ids, digit strings).
"""

from __future__ import annotations

import json
import os

import numpy as np
from datasets import Dataset

from llmkd.atomic import atomic_write
from llmkd.compress.checks import check_data, drop_overlap
from llmkd.compress.label_checks import class_keys
from llmkd.compress.teacher_checks import check_teacher
from llmkd.data.glue import _is_generic, _label_key, model_label_names
from llmkd.data.loading import read_files

HELD_OUT_VALIDATION = 0.1  # share of train used as validation when no validation file is given
MIN_SEARCH_ROWS = 32  # fewer rows cannot rank candidates
MAX_SEARCH_ROWS = 2000  # ranking needs no more; more only slows every search call's evaluation


def prepare(config, out: str, tokenizer, teacher_config, teacher: str) -> dict:
    """Runs the data and teacher checks and writes OUT/data; returns the stage's JSON-able record. `teacher`:
    the teacher's folder (config.teacher resolved: an embedded:NAME alias is a folder by now).

    Raises ValueError listing every error of the checks (before anything is trained)."""
    _check_max_length(config.max_length, teacher_config)
    files = {"train": config.train_file} | (
        {"validation": config.validation_file} if config.validation_file else {}
    )
    for split, path in files.items():
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "dataset_info.json")):
            raise ValueError(
                f"{split}_file {path} is a folder but no saved dataset: pass a csv/tsv/json/jsonl/parquet file"
            )
    splits = read_files(files)
    train, validation = splits["train"], splits.get("validation")
    given = len(train)
    names = _teacher_names(teacher_config)
    report = check_data(
        train,
        validation,
        config.text_columns,
        config.label_column,
        tokenizer,
        names,
        max_length=config.max_length,
    )
    report.raise_errors()
    text, label = report.stats["columns"]["text"], report.stats["columns"]["label"]
    classes = report.stats["classes"]
    max_length = config.max_length or report.stats["lengths"]["recommended_max_length"]
    train = train.shuffle(seed=config.seed)
    if validation is None:
        cut = max(1, round(HELD_OUT_VALIDATION * len(train)))
        validation, train = train.select(range(cut)), train.select(range(cut, len(train)))
        report.add(
            "info", "validation", f"no validation file: {cut} training rows (seeded) are held out as one"
        )
    train = drop_overlap(train, validation, text)
    n_search = int(np.clip(round(config.search_share * len(train)), MIN_SEARCH_ROWS, MAX_SEARCH_ROWS))
    if n_search >= len(train) // 2:
        held = given - len(train)
        why = f" ({held} of them held out as validation or found in it)" if held else ""
        raise ValueError(
            f"train_file has {given} rows{why}: too few to hold out {n_search} for ranking candidates and train "
            f"on the rest; compress needs at least {2 * MIN_SEARCH_ROWS + 2} rows besides the validation rows; "
            "add rows"
        )
    search, train = train.select(range(n_search)), train.select(range(n_search, len(train)))
    checked = check_teacher(
        teacher, tokenizer, validation, text, label, classes=classes,
        baseline_class=report.stats["majority"]["class"], max_length=max_length, seed=config.seed,
    )  # fmt: skip
    if not checked.needs_fine_tuning:
        checked.raise_errors()  # a head for these classes that does not beat the baseline: nothing to learn
    order = classes if checked.needs_fine_tuning else model_label_names(teacher_config)
    folder = os.path.join(out, "data")
    files = {
        split: _write(os.path.join(folder, f"{split}.jsonl"), data, text, label, names, order)
        for split, data in (("train", train), ("search", search), ("validation", validation))
    }
    return {
        "files": files,
        "rows": {"train": len(train), "search": len(search), "validation": len(validation)},
        "text_columns": text,
        "label_column": "label",
        "classes": list(order),
        "max_length": int(max_length),
        "baseline": report.stats["majority"],
        "needs_fine_tuning": checked.needs_fine_tuning,
        "data_check": report.to_dict(),
        "teacher_check": checked.to_dict() | {"reasons": checked.reasons},
        "markdown": report.markdown() + "\n" + checked.markdown(),
    }


def _check_max_length(max_length: int | None, teacher_config) -> None:
    limit = getattr(teacher_config, "max_position_embeddings", None)
    if max_length is not None and limit and max_length > limit:
        raise ValueError(
            f"max_length={max_length} is more than the teacher's {limit} positions: pass --max_length {limit} or "
            "less (or leave it out: the data check recommends one)"
        )


def _teacher_names(teacher_config) -> list[str] | None:
    """The teacher's class names, to name integer labels; None for a model without a classifier head."""
    if teacher_config is None or not getattr(teacher_config, "architectures", None):
        return None
    if not any("ForSequenceClassification" in a for a in teacher_config.architectures):
        return None
    names = model_label_names(teacher_config)
    return None if _is_generic(names) else names


def _write(path: str, data: Dataset, text: list[str], label: str, names, order) -> str:
    """The rows as JSONL: the text columns as they are, `label` the class id in `order`."""
    keys, display, _ = class_keys(data[label], names)
    index = {_label_key(str(n)): i for i, n in enumerate(order)}
    ids = [_id(display[k], index, order) for k in keys]
    columns = [data[c] for c in text]

    def write(handle) -> None:
        for *texts, y in zip(*columns, ids):
            handle.write(json.dumps(dict(zip(text, texts)) | {"label": y}, ensure_ascii=False) + "\n")

    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, write)
    return os.path.abspath(path)


def _id(name, index: dict, order) -> int:
    key = _label_key(str(name))
    if key in index:
        return index[key]
    if str(name).lstrip("-").isdigit() and _is_generic(list(order)):  # generic LABEL_k heads: ids are ids
        return int(name)
    raise ValueError(f"class {name!r} is not one of the teacher's classes {list(order)}")
