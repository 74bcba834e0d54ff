"""Content keys: hashes of what decides a model's outputs, so that anything derived from them (a teacher-logit
cache, a converted checkpoint, a synthesised dataset, a demo's finished step) is reused only for the same inputs.

- `teacher_key` / `checkpoint_key` / `files_digest`: model folders (config, code, weights) or Hub snapshots;
- `tokenizer_key`: what maps text to ids; `data_key`: every model-input column of a dataset;
- `file_sha256`, `code_key`: single files and the source of functions (a converter, a split rule).

Files are hashed whole, streamed through SHA-256: 1.45 GB/s from the page cache on this project's CPU
(SHA-NI; blake2b measured 0.8 GB/s, so SHA-256 it is), i.e. ~0.2 s for a 270 MB bf16 135M model and ~10 s for
a 14 GB 7B one; a cold disk is read at its own speed. A sampled hash would be cheaper but misses a tensor changed
between the samples, and that is exactly the change a fine-tuned teacher makes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import struct
import tempfile

import numpy as np
import torch

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
# Files that decide what text maps to which ids; the weights' files are `_is_model_file`.
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
    }
)
# Columns a Hugging Face model takes as inputs: any of them changes the teacher's outputs.
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "position_ids",
    "decoder_input_ids",
    "decoder_attention_mask",
    "pixel_values",
    "pixel_mask",
    "input_features",
    "input_values",
    "bbox",
)
UNRESOLVED = "not-in-the-local-hub-cache"


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a whole file, streamed (see the module docstring for the cost)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def code_key(*functions) -> str:
    """SHA-256 of functions' source (their bytecode where no source ships): the code that made a derived file
    is one of its inputs, so an edit to it is noticed on the next reuse."""
    parts = []
    for function in functions:
        try:
            parts.append(inspect.getsource(function))
        except (OSError, TypeError):
            parts.append(function.__code__.co_code.hex())
    return _sha("\n".join(parts))


def _is_model_file(name: str) -> bool:
    # config + weights decide the outputs; *.py is remote code (trust_remote_code); the index maps shards
    return name == "config.json" or name.endswith((*WEIGHT_SUFFIXES, ".index.json", ".py"))


# Any one of these makes a folder's tokenizer loadable (the others in TOKENIZER_FILES only add to one).
TOKENIZER_CORE = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


def has_tokenizer(folder) -> bool:
    """Whether a model folder holds a tokenizer: transformers 5 quietly builds one that reads every word as
    unknown when it has none."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return any(n in TOKENIZER_CORE or n.endswith(".model") for n in names)  # .model: sentencepiece


def _is_tokenizer_file(name: str) -> bool:
    return name in TOKENIZER_FILES or name.endswith((".model", ".tiktoken"))  # sentencepiece, tiktoken


def files_digest(folder: str | os.PathLike, select=_is_model_file) -> dict:
    """{name: SHA-256} of the selected top-level files of a folder (symlinks, as in a Hub snapshot, followed)."""
    folder = os.fspath(folder)
    return {
        name: file_sha256(os.path.join(folder, name))
        for name in sorted(os.listdir(folder))
        if select(name) and os.path.isfile(os.path.join(folder, name))
    }


def _is_checkpoint_file(name: str) -> bool:
    return _is_model_file(name) or _is_tokenizer_file(name) or name == "generation_config.json"


def checkpoint_key(folder: str | os.PathLike) -> str:
    """'dir:<hash>' of a checkpoint folder's model, tokenizer and generation-config files (what
    `from_pretrained` reads). Run records beside them (reports, model cards, trainer checkpoints) are left
    out, so evaluating or describing a checkpoint never changes its key."""
    parts = files_digest(folder, _is_checkpoint_file)
    if not parts:
        raise ValueError(f"{os.fspath(folder)!r} has no model or tokenizer files to fingerprint")
    return "dir:" + _sha(json.dumps(parts, sort_keys=True))


def _weights_key(folder: str) -> str | None:
    parts = files_digest(folder)
    if "config.json" not in parts or not any(name.endswith(WEIGHT_SUFFIXES) for name in parts):
        return None
    return _sha(json.dumps(parts, sort_keys=True))


def hub_snapshot(name: str, revision: str | None = None) -> str | None:
    """The local Hub-cache snapshot folder `from_pretrained(name, revision=…)` loads offline, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(name, "config.json", revision=revision or "main")
    except (ImportError, ValueError):  # not a valid repo id, or no huggingface_hub
        return None
    return os.path.dirname(config) if isinstance(config, str) else None


def content_keyed(fingerprint: dict) -> dict:
    """A settings dict (a synthesis run's fingerprint) with a `content` key added to every model / tokenizer
    identity in it (a dict with `name_or_path`, as `llmkd.data.synthesis.common.model_identity` makes).

    A name says nothing about the weights: a teacher re-trained into the same folder, or a Hub branch that
    moved, keeps its name. The content key hashes the files `from_pretrained` read (`checkpoint_key`: a local
    folder, or the Hub-cache snapshot of the identity's revision). A model built in memory has no files: its
    key stays None and only its settings are compared. Idempotent: present keys are kept."""
    out = {}
    for key, value in fingerprint.items():
        if isinstance(value, dict) and "name_or_path" in value and "content" not in value:
            value = value | {"content": _files_key(value["name_or_path"], value.get("revision"))}
        out[key] = value
    return out


def _files_key(name: str | None, revision: str | None) -> str | None:
    folder = name if name and os.path.isdir(name) else name and hub_snapshot(name, revision)
    if not folder:
        return None
    try:
        return checkpoint_key(folder)
    except ValueError:  # a folder without model or tokenizer files
        return None


def teacher_key(teacher, revision: str | None = None) -> str:
    """A content key of the teacher.

    - a local folder: 'dir:' + SHA-256 over config.json, *.py, index and weight files, each hashed whole;
    - a Hub id: resolved offline to the Hub-cache snapshot that transformers loads for `revision` (a branch,
      tag or commit; default main) and hashed the same way: 'hub:<id>@<revision>#<hash>'. When no snapshot
      with weights is cached here (e.g. a training machine without the teacher), 'hub:<id>@<revision>#'
      + UNRESOLVED: only the name is known, and `check_components` says so when it accepts such a key;
    - a module in memory: 'weights:' + SHA-256 of every parameter and buffer (names, dtypes, bytes) and of its
      config (everything that shapes the computation: rope_theta, the attention implementation, …; not the
      bookkeeping fields `_name_or_path`, `_commit_hash`, `transformers_version`).
    """
    if isinstance(teacher, (str, os.PathLike)):
        path = os.fspath(teacher)
        if os.path.isdir(path):
            digest = _weights_key(path)
            if digest is None:
                raise ValueError(
                    f"teacher folder {path!r} has no config.json or no weight files to fingerprint"
                )
            return "dir:" + digest
        snapshot = hub_snapshot(path, revision)
        digest = _weights_key(snapshot) if snapshot else None
        return f"hub:{path}@{revision or 'main'}#{digest or UNRESOLVED}"
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(_config_json(teacher).encode())
    return "weights:" + digest.hexdigest()


def _config_json(model) -> str:
    """The model's config as canonical JSON, without the fields that name it rather than shape its outputs."""
    config = getattr(model, "config", None)
    if config is None:
        return ""
    values = json.loads(config.to_json_string(use_diff=False))
    for key in ("_name_or_path", "_commit_hash", "transformers_version"):
        values.pop(key, None)
    values["_attn_implementation"] = getattr(config, "_attn_implementation", None)
    return json.dumps(values, sort_keys=True, default=str)


def tokenizer_key(tokenizer) -> str:
    """SHA-256 of what maps text to ids.

    Fast tokenizers: the backend's JSON — vocabulary, merges, normalizer, pre-tokenizer, added and special
    tokens (with their flags), the post-processor (so whether BOS/EOS or [CLS]/[SEP] are added) — without the
    run-time padding/truncation state that transformers rewrites on every call, plus `split_special_tokens`,
    the one transformers switch outside that JSON that changes ids. Which token plays pad/eos is not keyed:
    it changes no id of a text (labels come from the attention mask). Slow tokenizers: see `_slow_key`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return _slow_key(tokenizer)
    spec = json.loads(backend.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    spec["split_special_tokens"] = bool(getattr(tokenizer, "split_special_tokens", False))
    return _sha(json.dumps(spec, sort_keys=True))


PROBE = ("Hello World!  Héllo naïve CAFÉ, 12345 don't\tstop", "日本語 😀 [CLS] <s> </s> <unk> tail")


def _slow_key(tokenizer) -> str:
    """A Python tokenizer has no serialised pipeline: key its vocabulary, added tokens, vocabulary files
    (`save_vocabulary`: the sentencepiece model, vocab.txt, merges…) and the ids of a probe text, alone and as
    a pair. The probe catches Python-side settings the files do not hold (lower-casing, accent stripping,
    BOS/EOS and pair templates); a setting that changes no probe id would go unnoticed."""
    added = {
        str(index): [
            str(token),
            *(getattr(token, k, None) for k in ("special", "lstrip", "rstrip", "normalized")),
        ]
        for index, token in sorted(getattr(tokenizer, "added_tokens_decoder", {}).items())
    }
    spec = {
        "class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "added": added,
        "files": _vocabulary_files(tokenizer),
        "probe": _probe(tokenizer),
    }
    return _sha(json.dumps(spec, sort_keys=True, default=str))


def _vocabulary_files(tokenizer) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        try:
            paths = tokenizer.save_vocabulary(folder)
        except (NotImplementedError, AttributeError, OSError, TypeError):
            return {}
        return {os.path.basename(p): file_sha256(p) for p in paths or () if p and os.path.isfile(p)}


def _probe(tokenizer) -> list:
    out = []
    for args in ((PROBE[0],), PROBE):
        try:
            encoded = tokenizer(*args)
        except (ValueError, TypeError, NotImplementedError, KeyError) as error:  # e.g. no pair template
            out.append(type(error).__name__)
            continue
        out.append([list(encoded[k]) for k in ("input_ids", "token_type_ids") if k in encoded])
    return out


def _value_bytes(value) -> bytes:
    """A cell as bytes with its shape, ints as int64 and floats as float64 (Arrow's int32/int64 alike)."""
    try:
        array = np.asarray(value)
    except ValueError:  # ragged nesting (numpy 2 refuses it)
        array = None
    if array is None or (array.dtype == object and array.ndim):  # each element on its own, with the count
        return b"R" + struct.pack("<Q", len(value)) + b"".join(_value_bytes(v) for v in value)
    if array.dtype.kind in "biu":
        array = array.astype(np.int64)
    elif array.dtype.kind == "f":
        array = array.astype(np.float64)
    else:
        raise TypeError(f"cannot fingerprint a model-input value of dtype {array.dtype}: {value!r:.80}")
    return b"A" + struct.pack(f"<Q{array.ndim}Q", array.ndim, *array.shape) + array.tobytes()


def data_key(dataset, columns=None) -> str:
    """SHA-256 of every row of every model-input column present (`MODEL_INPUTS`, or `columns`).

    input_ids alone is not the teacher's input: token_type_ids (BERT sentence pairs), a stored attention mask
    or position ids change its outputs too. Each cell is hashed with its shape, so row boundaries count, and
    the key is the hash of {column: digest}, so it does not depend on how the rows are batched."""
    names = [c for c in (columns or MODEL_INPUTS) if c in dataset.column_names]
    if "input_ids" not in names:
        raise ValueError(
            f"cannot fingerprint data without an input_ids column (columns: {dataset.column_names})"
        )
    digests = {name: hashlib.sha256() for name in names}
    for batch in dataset.select_columns(names).iter(batch_size=1024):
        for name in names:
            for value in batch[name]:
                digests[name].update(_value_bytes(value))
    return _sha(json.dumps({name: d.hexdigest() for name, d in digests.items()}, sort_keys=True))
