"""What a teacher-logit cache was computed from, hashed so that a cache is only ever used for the same inputs.

Components: the teacher (Hub id + revision; for a local folder its config.json and, per weight file, the size,
the safetensors header and 16 sampled 64 KiB blocks — not a content hash of gigabytes), the teacher's compute
dtype, the tokenizer (its backend JSON without the run-time padding/truncation state), the token ids of every
split, max_length, k, temperature, the stored value dtype and the task. The fingerprint is the SHA-256 of
their canonical JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np
import torch

FORMAT = "llmkd-teacher-cache"
VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
SAMPLE_BLOCKS, BLOCK_BYTES = 16, 1 << 16
FIX = "re-run `llmkd cache-teacher RECIPE.yaml` with these settings (into a new teacher_cache folder)"


class CacheMismatchError(ValueError):
    """The cache does not belong to these inputs (or is damaged); the message names what differs and the fix."""


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _file_sample(path: str) -> str:
    """Size, safetensors header and evenly spaced blocks of one weight file: cheap, and any retraining shows."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(struct.pack("<Q", size))
    with open(path, "rb") as handle:
        if path.endswith(".safetensors") and size >= 8:
            (length,) = struct.unpack("<Q", handle.read(8))
            digest.update(handle.read(min(length, size - 8)))
        for i in range(SAMPLE_BLOCKS):
            handle.seek(max(0, (size - BLOCK_BYTES) * i // max(SAMPLE_BLOCKS - 1, 1)))
            digest.update(handle.read(BLOCK_BYTES))
    return digest.hexdigest()


def teacher_key(teacher, revision: str | None = None) -> str:
    """'dir:<hash>' for a local folder, 'hub:<id>@<revision>' for a Hub id, 'weights:<hash>' for a module.

    A Hub id is keyed by name and revision only (offline, nothing is downloaded): pin teacher_revision to a
    commit for an exact key. A module in memory is keyed by the SHA-256 of its parameters and buffers.
    """
    if isinstance(teacher, (str, os.PathLike)):
        path = os.fspath(teacher)
        if not os.path.isdir(path):
            return f"hub:{path}@{revision or 'main'}"
        parts = {}
        config = os.path.join(path, "config.json")
        if os.path.isfile(config):
            with open(config, "rb") as handle:
                parts["config.json"] = _sha(handle.read())
        for name in sorted(os.listdir(path)):
            if name.endswith(WEIGHT_SUFFIXES):
                parts[name] = _file_sample(os.path.join(path, name))
        if len(parts) < 2:
            raise ValueError(f"teacher folder {path!r} has no config.json or no weight files to fingerprint")
        return "dir:" + _sha(json.dumps(parts, sort_keys=True))
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return "weights:" + digest.hexdigest()


def tokenizer_key(tokenizer) -> str:
    """SHA-256 of what maps text to ids: the fast backend's JSON (vocab, merges, normalizer, added tokens…)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Run-time state that transformers mutates on every call with truncation/padding arguments.
        spec.pop("truncation", None)
        spec.pop("padding", None)
        return _sha(json.dumps(spec, sort_keys=True))
    return _sha(json.dumps(sorted(tokenizer.get_vocab().items())))


def data_key(dataset) -> str:
    """SHA-256 of every row's token ids (with its length, so row boundaries count)."""
    digest = hashlib.sha256()
    for batch in dataset.select_columns(["input_ids"]).iter(batch_size=1024):
        for ids in batch["input_ids"]:
            row = np.asarray(ids, dtype=np.int64)
            digest.update(struct.pack("<Q", len(row)))
            digest.update(row.tobytes())
    return digest.hexdigest()


def fingerprint(components: dict) -> str:
    return _sha(json.dumps(components, sort_keys=True))


def _flat(components: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in components.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_components(expected: dict, cached: dict, where: str) -> None:
    """Raises CacheMismatchError naming every component (None = not checked) that differs from the cache's."""
    want, have = _flat(expected), _flat(cached)
    diffs = [
        f"{key}: cached {have.get(key, '(none)')!r}, now {value!r}"
        for key, value in want.items()
        if value is not None and have.get(key) != value
    ]
    if diffs:
        raise CacheMismatchError(
            f"the teacher cache {where} was built from other inputs — " + "; ".join(diffs) + f". Fix: {FIX}, "
            "or train with the settings the cache was built with"
        )
