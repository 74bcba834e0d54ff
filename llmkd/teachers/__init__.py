"""Teacher sources (the extension point "where do teacher outputs come from"), listed in `TEACHERS`.

- ``live``: a frozen transformers model (`LiveTeacher`), placed for the back-end (copy, FSDP shards, ZeRO-3);
- ``cache``: a teacher-logit cache folder written by `llmkd cache-teacher` (`CachedTeacher`); no weights.
- ``ema``: a mean teacher, the exponential moving average of the student (`MeanTeacher`, llmkd.teachers.ema).
- ``ensemble``: several teachers (models and classifier caches), their logits combined (`EnsembleTeacher`).

`as_source` turns what a user passes as ``teacher=`` into a source. To add a source: a `TeacherSource` subclass
in its own module and one entry here.
"""

from __future__ import annotations

import os

from llmkd.teachers.base import TeacherOutputs, TeacherSource, TopK
from llmkd.teachers.cached.reader import CachedTeacher
from llmkd.teachers.ema import MeanTeacher
from llmkd.teachers.ensemble import EnsembleTeacher
from llmkd.teachers.live import LiveTeacher

TEACHERS: dict[str, type[TeacherSource]] = {
    "live": LiveTeacher,
    "cache": CachedTeacher,
    "ema": MeanTeacher,
    "ensemble": EnsembleTeacher,
}


def as_source(teacher, input_prefix: str = "") -> TeacherSource:
    """A `TeacherSource` from a source, a cache folder or a model (read through `input_prefix` columns)."""
    if isinstance(teacher, TeacherSource):
        return teacher
    if isinstance(teacher, (str, os.PathLike)):
        folder = os.fspath(teacher)
        if os.path.isfile(os.path.join(folder, "config.json")):
            raise ValueError(
                f"teacher={folder!r} is a model folder: load it first (AutoModelForSequenceClassification / "
                "AutoModelForCausalLM.from_pretrained) and pass the model; a folder given as teacher= must be a "
                "teacher-logit cache written by `llmkd cache-teacher`"
            )
        return CachedTeacher(folder)
    return LiveTeacher(teacher, input_prefix)


__all__ = [
    "TEACHERS",
    "CachedTeacher",
    "EnsembleTeacher",
    "LiveTeacher",
    "MeanTeacher",
    "TeacherOutputs",
    "TeacherSource",
    "TopK",
    "as_source",
]
