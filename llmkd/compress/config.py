"""`llmkd compress`'s settings: one dataclass, every field with its help, checked before anything is loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields


def _help(text: str, default=None):
    return field(default=default, metadata={"help": text})


@dataclass
class CompressConfig:
    """From a teacher and a user's data to the best student under a speed budget (see llmkd.compress.run)."""

    teacher: str | None = _help(
        "Teacher: a local model folder, a Hub id or embedded:all-minilm-l6-v2. A classifier with a head for the "
        "data's classes teaches as it is; an encoder without one (or with other classes) is fine-tuned first."
    )
    train_file: str | None = _help("csv/tsv/json/jsonl/parquet file of labelled training rows.")
    validation_file: str | None = _help(
        "The same format: the rows every reported score comes from (none: 10% of the training rows, seeded)."
    )
    text_columns: list | str | None = _help("Text column(s), two for sentence pairs (default: guessed).")
    label_column: str | None = _help("Label column: class names or ids (default: guessed).")
    speedup: float = _help("CPU throughput speed-up over the teacher the student must reach (> 1).", 2.5)
    budget_minutes: float = _help(
        "Wall-clock minutes for the whole command (> 0): the search and the final runs are sized to fit.",
        30.0,
    )
    output_dir: str = _help(
        "Folder for everything the command writes; rerun the command to resume.", "runs/compress"
    )
    seed: int = _help("Seed of the data shuffle, the search and every training run.", 42)
    max_length: int | None = _help("Tokens per input (default: the data check's recommendation).")
    search_share: float = _help(
        "Share of the training rows held out to rank candidates and stop the teacher's fine-tuning (0-0.5); "
        "the validation file is never used to choose.",
        0.1,
    )
    max_candidates: int = _help("Most student shapes timed and ranked (>= 1).", 6)
    eta: int = _help("Successive halving: 1/eta of the candidates go on to each next round (>= 2).", 2)
    batch_size: int = _help("Training batch size of every run (> 0).", 32)
    learning_rate: float = _help("Peak learning rate of the student runs (> 0).", 2e-4)
    teacher_learning_rate: float = _help("Peak learning rate when the teacher is fine-tuned (> 0).", 5e-5)
    max_epochs: float = _help("Most passes over the training rows in the final runs (> 0).", 3.0)
    temperature: float = _help("Soft-target temperature of the distillation runs (> 0).", 2.0)
    threads: int | None = _help("CPU threads for timing (default: torch's).")

    def __post_init__(self):
        if not self.teacher:
            raise ValueError("no teacher: pass --teacher FOLDER_OR_HUB_ID (e.g. embedded:all-minilm-l6-v2)")
        if not self.train_file:
            raise ValueError("no training data: pass --train_file FILE (csv/tsv/json/jsonl/parquet)")
        self._positive("speedup", self.speedup, above=1.0)
        for name in ("budget_minutes", "learning_rate", "teacher_learning_rate", "max_epochs", "temperature"):
            self._positive(name, getattr(self, name))
        for name in ("max_candidates", "batch_size"):
            self._whole(name, getattr(self, name), 1)
        self._whole("seed", self.seed, 0)
        self._whole("eta", self.eta, 2)
        if self.max_length is not None:
            self._whole("max_length", self.max_length, 1)
        if self.threads is not None:
            self._whole("threads", self.threads, 1)
        if not isinstance(self.search_share, (int, float)) or not 0 < self.search_share <= 0.5:
            raise ValueError(f"search_share must lie in (0, 0.5], got {self.search_share!r} (e.g. 0.1)")
        if isinstance(self.text_columns, str):
            self.text_columns = [self.text_columns]
        columns = self.text_columns
        if columns is not None and (
            not isinstance(columns, list)
            or not 1 <= len(columns) <= 2
            or not all(isinstance(c, str) for c in columns)
        ):
            raise ValueError(
                f"text_columns must name one or two columns (a sentence pair), got {columns!r}: "
                "--text_columns sentence or --text_columns '[premise, hypothesis]'"
            )
        if self.label_column is not None and not isinstance(self.label_column, str):
            raise ValueError(
                f"label_column must name a column, got {self.label_column!r}: --label_column label"
            )

    @staticmethod
    def _positive(name: str, value, above: float = 0.0) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value <= above:
            raise ValueError(f"{name} must be a number > {above:g}, got {value!r}")

    @staticmethod
    def _whole(name: str, value, least: int) -> None:
        """A whole number >= least (seed: >= 0)."""
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be a whole number >= {least}, got {value!r}")

    def key(self) -> dict:
        """What the run's results depend on: a rerun with another key in the same output_dir is refused."""
        skip = {"output_dir", "budget_minutes", "threads"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


def compress_config(values: dict) -> CompressConfig:
    """A CompressConfig from recipe/flag values; unknown keys are refused with a suggestion."""
    from llmkd.cli.keys import unknown_keys_error

    known = {f.name for f in fields(CompressConfig)}
    unknown = set(values) - known
    if unknown:
        raise unknown_keys_error(unknown, known)
    numbers = {f.name: f.default for f in fields(CompressConfig) if isinstance(f.default, (int, float))}
    values = {k: _number(k, v) if k in numbers and isinstance(v, str) else v for k, v in values.items()}
    return CompressConfig(**values)


def _number(key: str, value: str):
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{key} must be a number, got {value!r}") from None
    return (
        int(number)
        if number.is_integer() and key in {"max_candidates", "eta", "batch_size", "seed"}
        else number
    )
