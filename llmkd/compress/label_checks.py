"""Label checks of `check_data` (llmkd.compress.checks): the class set of each split, and the class balance.

Each function reports into a DataReport (its `add(level, code, message, fix)` and `stats`).
"""

from __future__ import annotations

from collections import Counter

from llmkd.data.glue import _label_key

MAJORITY_WARNING_SHARE = 0.9
SHIFT_WARNING = 0.2  # total variation distance between the splits' class shares
FEW_ROWS_PER_CLASS = 10
MANY_CLASSES = 20  # more distinct labels than this, and more than half the rows: ids, not classes


def class_keys(values, label_names=None) -> tuple[list, dict, list]:
    """(one class key per row — None where the row has no label —, {key: display name}, values that are not
    classes). Integers (also whole floats and digit strings) are ids, named by `label_names` when given; other
    strings are names, matched ignoring case, spaces and hyphens; non-whole numbers are not classes."""
    names = list(label_names or [])
    keys, display, bad = [], {}, []
    for value in values:
        if value is None:
            keys.append(None)
            continue
        if isinstance(value, bool):  # JSON true/false: two named classes, not ids 1/0
            value = str(value)
        whole = isinstance(value, float) and value.is_integer()
        if whole or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
            value = int(value)
        if isinstance(value, float):
            bad.append(value)
            keys.append(None)
            continue
        shown = names[value] if isinstance(value, int) and 0 <= value < len(names) else str(value)
        key = value if isinstance(value, int) and not names else _label_key(shown)
        display.setdefault(key, shown)
        keys.append(key)
    return keys, display, bad


def read_labels(report, splits: dict, label: str, label_names) -> dict | None:
    """{split: class name per row}, or None when the labels cannot be read as classes (errors reported)."""
    keys, display, problems = {}, {}, False
    for split, data in splits.items():
        keys[split], shown, bad = class_keys(data[label], label_names)
        display |= {k: v for k, v in shown.items() if k not in display}
        missing = keys[split].count(None) - len(bad)
        if bad:
            problems = True
            report.add(
                "error",
                "label_scores",
                f"{split} data: label column {label!r} holds non-whole numbers ({len(bad)} of {len(data)} rows, "
                f"e.g. {sorted(set(bad))[:3]}): scores, not classes",
                "compress distils classifiers: name the column holding the classes (--label_column), or bin the "
                "scores into classes",
            )
        if missing:
            problems = True
            rows = [i for i, k in enumerate(keys[split]) if k is None][:5]
            report.add(
                "error",
                "label_missing",
                f"{split} data: {missing} of {len(data)} rows have no label in {label!r} (rows {rows})",
                "fill them in or delete those rows",
            )
    if problems:
        return None
    order = sorted(display, key=lambda k: (isinstance(k, str), k))
    report.stats["classes"] = [display[k] for k in order]
    counts = {split: Counter(k) for split, k in keys.items()}
    report.stats["counts"] = {s: {display[k]: c[k] for k in order if c[k]} for s, c in counts.items()}
    report.stats["shares"] = {
        s: {display[k]: c[k] / len(keys[s]) for k in order if c[k]} for s, c in counts.items()
    }
    if _class_set(report, counts, display, label):
        return None
    return {split: [display[k] for k in row_keys] for split, row_keys in keys.items()}


def _class_set(report, counts: dict, display: dict, label: str) -> bool:
    """Reports the class-set errors (one class, ids as classes, a class only in validation); True if any."""
    train, rows = counts["train"], sum(counts["train"].values())
    errors = len(report.errors)
    if len(train) == 1:
        only = display[next(iter(train))]
        report.add(
            "error",
            "one_class",
            f"train data: every one of its {rows} rows has label {only!r} in {label!r}: one class only, nothing "
            "to classify",
            "check that label_column names the class column, and that the file is not a slice filtered or sorted "
            "by label; a classifier needs rows of at least two classes",
        )
    elif len(train) > MANY_CLASSES and len(train) > rows / 2:
        report.add(
            "error",
            "label_ids",
            f"train data: label column {label!r} has {len(train)} distinct values in {rows} rows: row ids or "
            "free text, not classes",
            "set label_column to the column holding the classes",
        )
    validation = counts.get("validation", Counter())
    unseen = [display[k] for k in validation if k not in train]
    if unseen:
        n = sum(validation[k] for k in validation if k not in train)
        report.add(
            "error",
            "class_only_in_validation",
            f"classes {unseen} occur in validation ({n} rows) but never in train: the student cannot learn them",
            "add train rows of those classes, or drop them from validation (check the label spelling)",
        )
    absent = [k for k in train if validation and k not in validation]
    if absent:
        report.add(
            "warning",
            "class_missing_from_validation",
            f"classes {[display[k] for k in absent]} occur in train ({sum(train[k] for k in absent)} rows) but "
            "never in validation: their accuracy is not measured",
            "draw the validation split stratified by label",
        )
    return len(report.errors) > errors


def balance(report, majority_warning_share: float = MAJORITY_WARNING_SHARE) -> None:
    """The majority class and its baseline; warnings for a dominant class, few rows of a class, a class mix
    that differs between the splits."""
    shares, counts = report.stats["shares"], report.stats["counts"]
    top, top_share = max(shares["train"].items(), key=lambda item: item[1])
    majority = {"class": top, "train_share": top_share}
    if "validation" in shares:
        majority["baseline_accuracy"] = shares["validation"].get(top, 0.0)
    report.stats["majority"] = majority
    baseline = majority.get("baseline_accuracy", top_share)
    report.add(
        "info",
        "majority_baseline",
        f"majority class {top!r}: {100 * top_share:.1f}% of train; predicting it for every row scores "
        f"{100 * baseline:.1f}% accuracy on {'validation' if 'validation' in shares else 'train'}, the floor "
        "any model must beat",
    )
    if top_share > majority_warning_share and len(shares["train"]) > 1:
        report.add(
            "warning",
            "imbalanced",
            f"class {top!r} is {100 * top_share:.1f}% of train (over {100 * majority_warning_share:.0f}%): "
            f"accuracy near {100 * baseline:.1f}% is reached by always answering {top!r}",
            "read macro-F1 beside accuracy; collect more rows of the rare classes if you can",
        )
    few = {name: n for name, n in counts["train"].items() if n < FEW_ROWS_PER_CLASS}
    if few and len(counts["train"]) > 1:
        report.add(
            "warning",
            "few_rows",
            f"classes with fewer than {FEW_ROWS_PER_CLASS} train rows: {few}; a model learns little of them",
            "collect more rows of those classes",
        )
    if "validation" in shares:
        names = set(shares["train"]) | set(shares["validation"])
        tvd = sum(abs(shares["train"].get(n, 0) - shares["validation"].get(n, 0)) for n in names) / 2
        report.stats["class_shift"] = tvd
        if tvd > SHIFT_WARNING:
            report.add(
                "warning",
                "class_shift",
                f"the class mix differs between the splits (total variation distance {tvd:.2f}): train "
                f"{_percent(shares['train'])}, validation {_percent(shares['validation'])}",
                "draw the validation split from the same data as train, stratified by label",
            )


def _percent(shares: dict) -> str:
    return ", ".join(f"{name} {100 * share:.1f}%" for name, share in shares.items())
