"""Paired inputs: each example read by the student through its processor and by the teacher through its own.

Cross-modal distillation (Gou et al. 2021 §5.3; Gupta, Hoffman & Malik 2016, "Cross Modal Distillation for
Supervision Transfer", arXiv 1507.00448) trains a student on one modality from a teacher on another through paired
samples: here a spoken sentence (student) and its transcript (teacher). The same mechanism pairs any two
processors: text → audio, text → image, or two tokenizers of text classifiers.

`encode_pairs` turns each row's `student_column` into the student's inputs (``input_ids`` / ``input_values`` /
``input_features`` / ``pixel_values``, no prefix) and its `teacher_column` into the teacher's, under the
``teacher_`` prefix that `llmkd.teachers.LiveTeacher(input_prefix="teacher_")` reads. Each row is processed
alone, so nothing in its values depends on the other rows of a batch; `llmkd.data.collate` pads both streams
and builds each one's attention mask.

Audio cells are arrays at the feature extractor's sampling rate, ``{"array", "sampling_rate"}`` dicts (what
`datasets.Audio` decodes to; other rates are resampled) or paths of WAV files (relative to `base_dir`), read with
scipy and resampled with its polyphase filter.
"""

from __future__ import annotations

import os

import numpy as np
from scipy.io import wavfile
from scipy.signal import resample_poly
from transformers import PreTrainedTokenizerBase, ProcessorMixin
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.image_processing_base import ImageProcessingMixin

from llmkd.data.collate import SIGNAL_COLUMNS
from llmkd.data.loading import label_id, missing_columns

TEACHER = "teacher_"
TEXT, AUDIO, IMAGE = "text", "audio", "image"


def modality(processor) -> str:
    """TEXT (a tokenizer), AUDIO (a sequence feature extractor) or IMAGE (an image processor).

    Raises TypeError for anything else, naming the class."""
    if isinstance(processor, PreTrainedTokenizerBase):
        return TEXT
    if isinstance(processor, SequenceFeatureExtractor):
        return AUDIO
    if isinstance(processor, ImageProcessingMixin):
        return IMAGE
    raise TypeError(
        f"{type(processor).__name__} is not a tokenizer, an audio feature extractor or an image processor; pass "
        "the one that prepares the model's inputs (AutoTokenizer, AutoFeatureExtractor, AutoImageProcessor)"
    )


def unwrap(processor):
    """The part of a multi-part processor (Wav2Vec2Processor, CLIPProcessor, …) that prepares a classifier's
    input: its feature extractor, else its image processor; a plain processor is returned as it is."""
    if isinstance(processor, ProcessorMixin):
        for name in ("feature_extractor", "image_processor", "tokenizer"):
            part = getattr(processor, name, None)
            if part is not None:
                return part
    return processor


def read_audio(value, sampling_rate: int, base_dir: str | None = None) -> np.ndarray:
    """One clip as float32 samples at `sampling_rate` (Hz), from an array, a decoded dict or a WAV path.

    Raises ValueError for a missing file, a non-mono array or a value of another type."""
    rate = sampling_rate
    if isinstance(value, dict):
        value, rate = value.get("array"), int(value.get("sampling_rate", sampling_rate))
    if isinstance(value, str):
        path = value if os.path.isabs(value) or base_dir is None else os.path.join(base_dir, value)
        if not os.path.isfile(path):
            raise ValueError(f"audio file {path!r} does not exist; paths are relative to {base_dir!r}")
        rate, value = wavfile.read(path)
        if np.issubdtype(value.dtype, np.integer):
            value = value / float(np.iinfo(value.dtype).max + 1)
    audio = np.asarray(value, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono (one axis of samples), got an array of shape {audio.shape}")
    if rate != sampling_rate:
        divisor = int(np.gcd(int(rate), int(sampling_rate)))
        audio = resample_poly(audio, sampling_rate // divisor, rate // divisor).astype(np.float32)
    return audio


def encode_side(processor, cells: list, *, max_length: int, max_seconds: float | None, base_dir=None) -> dict:
    """The model inputs of one side for a batch of cells, each computed alone: {column: list per row}."""
    kind = modality(processor)
    if kind == TEXT:
        texts = [cells] if not isinstance(cells[0], tuple) else list(zip(*cells))
        return dict(processor(*texts, truncation=True, max_length=max_length))
    out: dict[str, list] = {}
    for cell in cells:
        if kind == AUDIO:
            rate = int(processor.sampling_rate)
            audio = read_audio(cell, rate, base_dir)
            if max_seconds is not None:
                audio = audio[: int(max_seconds * rate)]
            features = processor(audio, sampling_rate=rate, return_tensors="np")
        else:  # a PIL image, or an (H, W, C) array (datasets stores arrays as nested lists)
            pixels = np.asarray(cell) if isinstance(cell, (list, tuple)) else cell
            features = processor(pixels, return_tensors="np")
        for column in SIGNAL_COLUMNS:
            if column in features:
                out.setdefault(column, []).append(np.asarray(features[column][0], dtype=np.float32))
    return out


def encode_pairs(
    dataset,
    student_processor,
    teacher_processor,
    *,
    student_column: str | list = "audio",
    teacher_column: str | list = "text",
    label_column: str | None = "label",
    label_names: list | None = None,
    max_length: int = 128,
    max_seconds: float | None = None,
    base_dir: str | None = None,
):
    """A `datasets.Dataset` of paired inputs: the student's columns, the teacher's under ``teacher_``, ``label``.

    Args:
        dataset: rows with the two input columns (and the label column, when it is set and present).
        student_processor, teacher_processor: each side's tokenizer, feature extractor or image processor.
        student_column, teacher_column: the column each side reads (two text columns for sentence pairs).
        label_column: gold labels (ids, or names looked up in `label_names`); None or absent: no labels.
        max_length: tokens per text input (> 0). max_seconds: audio cut to this many seconds (None: whole clips).
        base_dir: the folder that relative audio paths start from (the data file's).

    Raises ValueError for a missing column or bad values, TypeError for a processor of an unknown kind.
    """
    columns = {"student": student_column, "teacher": teacher_column}
    needed = [c for value in columns.values() for c in ([value] if isinstance(value, str) else value)]
    if message := missing_columns(dataset, needed, "the paired data"):
        raise ValueError(message)
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0 or null, got {max_seconds!r}")
    labelled = label_column is not None and label_column in dataset.column_names
    sides = (
        ("", unwrap(student_processor), student_column),
        (TEACHER, unwrap(teacher_processor), teacher_column),
    )
    options = {"max_length": max_length, "max_seconds": max_seconds, "base_dir": base_dir}

    def encode(batch):
        out = {}
        for prefix, processor, column in sides:
            cells = batch[column] if isinstance(column, str) else list(zip(*(batch[c] for c in column)))
            out |= {prefix + k: v for k, v in encode_side(processor, cells, **options).items()}
        if labelled:
            out["label"] = [label_id(v, label_names) for v in batch[label_column]]
        return out

    encoded = dataset.map(
        encode, batched=True, batch_size=64, remove_columns=dataset.column_names, desc="encoding pairs"
    )
    signals = [c for c in encoded.column_names if c.removeprefix(TEACHER) in SIGNAL_COLUMNS]
    # Rows come back as float32 arrays, not nested Python lists (fast to collate).
    return encoded.with_format("numpy", columns=signals, output_all_columns=True) if signals else encoded
