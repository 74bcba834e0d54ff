"""The data checks `llmkd compress` runs before anything is trained: `check_data(...) -> DataReport`.

What a user's classification data can get wrong, each found with its numbers and its fix:

- columns: the text and label columns exist (given, else guessed as `llmkd eval` guesses them,
  llmkd.evaluation.any_data.resolve_columns); no row without text (llmkd.data.loading.check_texts);
- labels: the classes (ids or names; names match ignoring case, spaces and hyphens, as in any_data); a class only
  in validation is an error (the student never sees it), a class missing from validation a warning; one class
  only is an error; scores (non-whole numbers) or row ids (a distinct value per row) where classes belong too;
- balance: counts and shares per split; the majority-class baseline is the accuracy of predicting the train
  majority class for every validation row; a majority above 90% and a class mix that differs between the splits
  (total variation distance above 0.2) are warnings;
- duplicates between splits: a validation text that also occurs in train (exact match after Unicode NFKC, case
  folding and whitespace collapsing; a sentence pair matches as a pair) lets a score reward memorisation: any is a
  warning, 5% of validation or more an error (fix: `drop_overlap`, or a validation split drawn apart from train);
  duplicates within train are an info;
- text lengths, order of the rows and the precision a validation set of this size gives: llmkd.compress.profile.

Every finding is kept (none stops the others, except a missing column, which the others need); the caller
decides: `report.raise_errors()` raises one ValueError listing every error with its fix.
"""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from datasets import Dataset

from llmkd.compress import profile
from llmkd.compress.label_checks import MAJORITY_WARNING_SHARE, balance, read_labels
from llmkd.data.loading import check_texts, missing_columns, read_files
from llmkd.evaluation.any_data import resolve_columns
from llmkd.modeling import SEQ_CLS

OVERLAP_ERROR_SHARE = 0.05  # validation rows also in train, from which on the overlap is an error
EXAMPLES = 3  # duplicated texts quoted in a message


@dataclass(frozen=True)
class Finding:
    """One result of a check. `code` names the check (stable: code that acts on a finding tests it), `message`
    says what was found with its numbers, `fix` what to do about it (empty for an info)."""

    code: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.message}; {self.fix}" if self.fix else self.message


@dataclass
class Report:
    """Findings by level and the JSON-able numbers they came from (`stats`)."""

    title: ClassVar[str] = "checks"
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    infos: list[Finding] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def add(self, level: str, code: str, message: str, fix: str = "") -> None:
        levels = {"error": self.errors, "warning": self.warnings, "info": self.infos}
        levels[level].append(Finding(code, message, fix))

    def codes(self, level: str | None = None) -> set[str]:
        """The codes found (at one level: "error", "warning" or "info")."""
        levels = {"error": self.errors, "warning": self.warnings, "info": self.infos}
        chosen = [levels[level]] if level else list(levels.values())
        return {f.code for findings in chosen for f in findings}

    def raise_errors(self) -> None:
        """Raises ONE ValueError listing every error with its fix; nothing when there is none."""
        if self.errors:
            lines = "\n".join(f"  - {e}" for e in self.errors)
            count = f"{len(self.errors)} problem{'s' if len(self.errors) > 1 else ''}"
            raise ValueError(f"{self.title}: {count} to fix before training:\n{lines}")

    def to_dict(self) -> dict:
        """JSON-able: {"errors"/"warnings"/"infos": [{code, message, fix}], "stats": {...}}."""
        out = {level: [asdict(f) for f in getattr(self, level)] for level in ("errors", "warnings", "infos")}
        return out | {"stats": self.stats}

    def findings_markdown(self) -> list[str]:
        lines = []
        for level, heading in (("errors", "Errors"), ("warnings", "Warnings"), ("infos", "Notes")):
            found = getattr(self, level)
            if found:
                lines += [f"**{heading}**", "", *(f"- {f}" for f in found), ""]
        return lines or ["No problems found.", ""]


@dataclass
class DataReport(Report):
    """`check_data`'s findings; stats: rows, columns, classes, counts, shares, majority, overlap, train_duplicates,
    lengths, order, precision (see check_data)."""

    title: ClassVar[str] = "data checks"

    def markdown(self) -> str:
        """The data section of the compress report: a class table, then errors, warnings and notes."""
        s = self.stats
        lines = ["## Data", ""]
        if s.get("columns"):
            c = s["columns"]
            rows = ", ".join(f"{split} {n}" for split, n in s["rows"].items())
            lines += [f"Rows: {rows}; text columns {c['text']}, label column {c['label']!r}.", ""]
        if s.get("counts"):
            splits = list(s["counts"])
            lines += ["| class | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
            for name in s["classes"]:
                cells = [
                    f"{s['counts'][p].get(name, 0)} ({100 * s['shares'][p].get(name, 0):.1f}%)"
                    for p in splits
                ]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
        return "\n".join(lines + self.findings_markdown())


def check_data(
    train: Dataset | str,
    validation: Dataset | str | None = None,
    text_columns=None,
    label_column: str | None = None,
    tokenizer=None,
    label_names=None,
    *,
    max_length: int | None = None,
    model_max_length: int | None = None,
    max_train_samples: int | None = None,
    overlap_error_share: float = OVERLAP_ERROR_SHARE,
    majority_warning_share: float = MAJORITY_WARNING_SHARE,
    precision_warning_points: float = profile.PRECISION_WARNING_POINTS,
) -> DataReport:
    """Checks a classification task's train (and validation) data; never raises for bad data: see the report.

    `train` / `validation`: datasets, or csv/tsv/json/jsonl/parquet files or saved-dataset folders (read with
    llmkd.data.loading.read_files, which raises FileNotFoundError / ValueError for a missing or unreadable file).
    `text_columns` (one, or two for a sentence pair) and `label_column`: guessed from the train data when None.
    `label_names`: class names in id order, to name integer labels (e.g. the teacher's id2label). `tokenizer`: the
    text lengths are measured in its tokens (none: not measured); `max_length`: the length training will cut at;
    `model_max_length`: the model's position limit (default: the tokenizer's, when it has a real one);
    `max_train_samples`: the slice of train a run would take from the top (its class mix is checked).
    """
    report = DataReport()
    splits = _read(train, validation)
    columns = _columns(report, splits, text_columns, label_column)
    if columns is None:
        return report
    text, label = columns
    texts_ok = all([_texts(report, split, data, text) for split, data in splits.items()])  # every split said
    labels = read_labels(report, splits, label, label_names)
    if labels is not None:
        balance(report, majority_warning_share)
        profile.order(report, labels["train"], max_train_samples)
    if texts_ok:
        keys = {
            split: [normalise(row) for row in zip(*(data[c] for c in text))] for split, data in splits.items()
        }
        _duplicates(report, keys, labels, overlap_error_share)
        if tokenizer is not None:
            lengths = {split: profile.token_lengths(tokenizer, data, text) for split, data in splits.items()}
            profile.lengths(report, lengths, tokenizer, max_length, model_max_length)
    if "validation" in splits:
        baseline = report.stats.get("majority", {}).get("baseline_accuracy")
        profile.precision(report, len(splits["validation"]), baseline, precision_warning_points)
    return report


def _read(train, validation) -> dict[str, Dataset]:
    given = {"train": train} | ({"validation": validation} if validation is not None else {})
    files = {split: data for split, data in given.items() if not isinstance(data, Dataset)}
    read = read_files(files) if files else {}
    return {split: read[split] if split in files else data for split, data in given.items()}


def _columns(report: DataReport, splits: dict, text_columns, label_column) -> tuple[list[str], str] | None:
    """(text columns, label column) present in every split, else None with the error reported."""
    try:
        text, label, found = resolve_columns(splits["train"], "train data", text_columns, label_column)
    except ValueError as err:
        report.add("error", "columns", str(err))
        return None
    for split, data in list(splits.items())[1:]:
        if message := missing_columns(data, [*text, label], f"{split} data"):
            report.add("error", "columns", message)
            return None
    report.stats["rows"] = {split: len(data) for split, data in splits.items()}
    report.stats["columns"] = {"text": text, "label": label, "from": found}
    if "guessed" in found:
        report.add(
            "info", "columns", f"columns {found} (text {text}, label {label!r}); set them to choose others"
        )
    return text, label


def _texts(report: DataReport, split: str, data: Dataset, text: list[str]) -> bool:
    try:
        check_texts(data, text, SEQ_CLS, f"{split} data")
    except ValueError as err:
        report.add("error", "texts", str(err))
        return False
    return True


# ---- duplicates -----------------------------------------------------------------------------------------------


def normalise(texts) -> str:
    """One row's texts (a tuple: one, or two for a pair) as a key: NFKC, case-folded, whitespace collapsed."""
    return "\x1f".join(" ".join(unicodedata.normalize("NFKC", t).casefold().split()) for t in texts)


def _duplicates(report: DataReport, keys: dict, labels: dict | None, error_share: float) -> None:
    train = keys["train"]
    first = {}
    for row, key in enumerate(train):
        first.setdefault(key, row)
    repeats = len(train) - len(first)
    train_labels = {}
    if labels is not None:
        for key, label in zip(train, labels["train"]):
            train_labels.setdefault(key, set()).add(label)
    conflicting = sum(len(v) > 1 for v in train_labels.values())
    report.stats["train_duplicates"] = {"rows": repeats, "conflicting_texts": conflicting}
    if repeats:
        report.add(
            "info",
            "train_duplicates",
            f"train has {repeats} repeated rows ({100 * repeats / len(train):.1f}%, same text after case and "
            f"space normalisation); {conflicting} texts carry different labels (label noise)",
        )
    if "validation" in keys:
        _overlap(report, keys, first, train_labels, labels, error_share)


def _overlap(report, keys, first: dict, train_labels: dict, labels, error_share: float) -> None:
    validation = keys["validation"]
    shared = [row for row, key in enumerate(validation) if key in first]
    n, m = len(shared), len(validation)
    differ = 0
    if labels is not None:
        differ = sum(labels["validation"][row] not in train_labels[validation[row]] for row in shared)
    examples = [
        {"validation_row": row, "train_row": first[validation[row]], "text": validation[row][:80]}
        for row in shared[:EXAMPLES]
    ]
    report.stats["overlap"] = {
        "validation_rows_in_train": n,
        "share": n / m,
        "different_label": differ,
        "examples": examples,
    }
    if n == 0:
        report.add("info", "overlap", f"no validation text occurs in train ({m} validation rows checked)")
        return
    quoted = "; ".join(
        f"validation row {e['validation_row']} = train row {e['train_row']}: {e['text']!r}" for e in examples
    )
    what = (
        f"every validation row ({m}) also occurs in train: validation is a copy of training data"
        if n == m
        else f"{n} of {m} validation rows ({100 * n / m:.1f}%) also occur in train"
    )
    message = (
        f"{what} (same text after case and space normalisation; {differ} of them with another label), e.g. "
        f"{quoted}; their scores reward memorisation"
    )
    fix = (
        "deduplicate: drop those texts from train (llmkd.compress.checks.drop_overlap), or use a validation "
        "split drawn apart from train"
    )
    report.add("error" if n / m >= error_share else "warning", "overlap", message, fix)


def drop_overlap(train: Dataset, validation: Dataset, text_columns) -> Dataset:
    """`train` without the rows whose text (normalised as in the overlap check) occurs in `validation`."""
    columns = [text_columns] if isinstance(text_columns, str) else list(text_columns)
    held_out = {normalise(row) for row in zip(*(validation[c] for c in columns))}
    keep = [i for i, row in enumerate(zip(*(train[c] for c in columns))) if normalise(row) not in held_out]
    return train.select(keep)
