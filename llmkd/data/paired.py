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

Audio cells are arrays at the feature extractor's sampling rate, ``{"array", "sampling_rate"}`` or
``{"path"/"bytes"}`` dicts, decoders with ``get_all_samples()`` (what `datasets.Audio` decodes to), or paths of
WAV files (relative to `base_dir`), read with scipy, averaged to mono and resampled with its polyphase filter.
Image cells are PIL images, (H, W, C) arrays or paths (relative to `base_dir`, read as RGB).
"""

from __future__ import annotations

import io
import os

import numpy as np
from scipy.io import wavfile
from scipy.signal import resample_poly
from transformers import PreTrainedTokenizerBase, ProcessorMixin
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.image_processing_base import ImageProcessingMixin

from llmkd.data.collate import SIGNAL_COLUMNS
from llmkd.data.loading import label_id

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
    """One clip as float32 samples at `sampling_rate` (Hz), mono (channels averaged).

    `value`: an array at `sampling_rate`; a dict with ``array`` and ``sampling_rate``, or with ``path`` / ``bytes``
    of a WAV file; a decoder with ``get_all_samples()`` (what `datasets.Audio` columns decode to, torchcodec's
    AudioDecoder); or a WAV path, relative to `base_dir`. Other rates are resampled (scipy's polyphase filter).
    Raises ValueError for a missing file, an empty clip or a value of another kind."""
    rate, audio = _samples(value, sampling_rate, base_dir)
    audio = np.asarray(audio)
    if audio.ndim == 2:  # (samples, channels) as WAV files store them, or (channels, samples) from a decoder
        audio = audio.mean(axis=1 if audio.shape[0] > audio.shape[1] else 0)
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"audio must be a non-empty clip of samples, got an array of shape {audio.shape}")
    audio = audio.astype(np.float32)
    if rate != sampling_rate:
        divisor = int(np.gcd(int(rate), int(sampling_rate)))
        audio = resample_poly(audio, sampling_rate // divisor, rate // divisor).astype(np.float32)
    return audio


def _samples(value, sampling_rate: int, base_dir: str | None) -> tuple[int, np.ndarray]:
    if hasattr(value, "get_all_samples"):  # torchcodec's AudioDecoder: (channels, samples) floats
        clip = value.get_all_samples()
        return int(clip.sample_rate), np.asarray(clip.data)
    if isinstance(value, dict):
        if value.get("array") is not None:
            return int(value.get("sampling_rate", sampling_rate)), value["array"]
        if value.get("bytes") is not None:
            return _wav(io.BytesIO(value["bytes"]))
        value = value.get("path")
    if isinstance(value, (str, os.PathLike)):
        path = _resolve(value, base_dir)
        if not os.path.isfile(path):
            raise ValueError(f"audio file {path!r} does not exist; relative paths start at {base_dir!r}")
        return _wav(path)
    if value is None or isinstance(value, (bool, int, float)):
        raise ValueError(f"audio cell {value!r}: give samples, a WAV path or a decoded audio dict")
    return sampling_rate, value


def _wav(source) -> tuple[int, np.ndarray]:
    """A WAV file's rate and samples in [-1, 1] (8-bit files are unsigned: their silence is 128)."""
    rate, samples = wavfile.read(source)
    if samples.dtype == np.uint8:
        return rate, (samples.astype(np.float32) - 128) / 128
    if np.issubdtype(samples.dtype, np.integer):
        return rate, samples / float(np.iinfo(samples.dtype).max + 1)
    return rate, samples


def _resolve(path, base_dir: str | None) -> str:
    path = os.fspath(path)
    return path if os.path.isabs(path) or base_dir is None else os.path.join(base_dir, path)


def read_image(value, base_dir: str | None = None):
    """A PIL image (RGB) from a path relative to `base_dir`; arrays (datasets stores them as nested lists) and
    images pass through. Raises ValueError for a missing file."""
    if isinstance(value, (str, os.PathLike)):
        from PIL import Image

        path = _resolve(value, base_dir)
        if not os.path.isfile(path):
            raise ValueError(f"image file {path!r} does not exist; relative paths start at {base_dir!r}")
        with Image.open(path) as image:
            return image.convert("RGB")
    if isinstance(value, dict) and value.get("path"):
        return read_image(value["path"], base_dir)
    return np.asarray(value) if isinstance(value, (list, tuple)) else value


def encode_side(processor, cells: list, *, max_length: int, max_seconds: float | None, base_dir=None) -> dict:
    """The model inputs of one side for a batch of cells, each computed alone: {column: list per row}.

    Audio features keep the extractor's own frame mask (w2v-BERT's feature extractor pads an odd frame count), so
    that a padded batch masks exactly what each clip alone masks."""
    kind = modality(processor)
    if kind == TEXT:
        texts = [cells] if not isinstance(cells[0], tuple) else list(zip(*cells))
        return dict(processor(*texts, truncation=True, max_length=max_length))
    out: dict[str, list] = {}
    for index, cell in enumerate(cells):
        try:
            features = _features(processor, kind, cell, max_seconds, base_dir)
        except (ValueError, TypeError, RuntimeError) as err:
            where = f" ({cell})" if isinstance(cell, (str, os.PathLike)) else ""
            raise ValueError(f"{kind} cell {index} of its batch{where}: {err}") from err
        for column in SIGNAL_COLUMNS:
            if column in features:
                out.setdefault(column, []).append(np.asarray(features[column][0], dtype=np.float32))
        if "input_features" in features and "attention_mask" in features:
            out.setdefault("attention_mask", []).append(np.asarray(features["attention_mask"][0]).tolist())
    return out


def _features(processor, kind: str, cell, max_seconds, base_dir):
    if kind == IMAGE:
        return processor(read_image(cell, base_dir), return_tensors="np")
    rate = int(processor.sampling_rate)
    audio = read_audio(cell, rate, base_dir)
    if max_seconds is not None:
        audio = audio[: int(max_seconds * rate)]
    return processor(audio, sampling_rate=rate, return_tensors="np")


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
    for side, value in (("student_column", student_column), ("teacher_column", teacher_column)):
        missing = [c for c in ([value] if isinstance(value, str) else value) if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"{side}={value!r}: the paired data has no column {missing[0]!r} (columns: "
                f"{dataset.column_names}); set {side} to the column that side reads"
            )
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
