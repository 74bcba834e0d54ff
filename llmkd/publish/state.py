"""Training state (optimizer, scheduler, scaler, RNG) as safetensors + JSON instead of a pickle.

`save_state(state, folder, name)` writes `name.safetensors` (every tensor, under its path in the structure) and
`name.json` (the structure: dicts with their key types, lists, tuples, numbers, strings, numpy arrays as lists);
`load_state(folder, name)` rebuilds the same nested object. Loading runs no code from the files: a tensor comes
from safetensors, everything else from JSON, so resuming from someone else's checkpoint cannot execute anything.

Both files are written atomically, the JSON last; `has_state` is true only when both are there.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import load_file, save

from llmkd.atomic import atomic_write

# Markers of the JSON structure; a plain JSON object is a dict whose keys are all strings without these.
TENSOR, TUPLE, PAIRS, ARRAY = "__tensor__", "__tuple__", "__pairs__", "__ndarray__"
MARKERS = (TENSOR, TUPLE, PAIRS, ARRAY)


def state_files(folder: str, name: str) -> tuple[str, str]:
    return os.path.join(folder, f"{name}.safetensors"), os.path.join(folder, f"{name}.json")


def has_state(folder: str, name: str) -> bool:
    return all(os.path.isfile(path) for path in state_files(folder, name))


def save_state(state, folder: str, name: str) -> None:
    """Writes `state` (nested dicts / lists / tuples of tensors, numpy arrays and JSON scalars).

    Raises TypeError naming the path of a value neither safetensors nor JSON can hold (a function, a module)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "state", tensors)
    text = json.dumps(tree)  # strict: anything JSON cannot hold fails here, at save time, not on resume
    weights, structure = state_files(folder, name)
    atomic_write(weights, lambda handle: handle.write(save(tensors)), "wb")
    atomic_write(structure, lambda handle: handle.write(text))


def load_state(folder: str, name: str, device: str | torch.device = "cpu"):
    """The object `save_state` wrote, tensors on `device`. FileNotFoundError when a file is missing."""
    weights, structure = state_files(folder, name)
    for path in (weights, structure):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: {folder} holds no complete {name!r} state")
    tensors = load_file(weights, device=str(device))
    with open(structure, encoding="utf-8") as handle:
        return _decode(json.load(handle), tensors)


def _encode(value, path: str, tensors: dict):
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {TENSOR: path}
    if isinstance(value, np.ndarray):
        return {ARRAY: value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in MARKERS for k in value):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in value.items()}
        for key in value:  # optimizer states are keyed by parameter index: keep the key's type
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise TypeError(f"{path}: dict key {key!r} of type {type(key).__name__} cannot be saved")
        return {PAIRS: [[k, _encode(v, f"{path}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {TUPLE: [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"{path}: a {type(value).__name__} cannot be saved as safetensors + JSON (only tensors, arrays, "
        "numbers, strings and containers of them)"
    )


def _decode(tree, tensors: dict):
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if TENSOR in tree:
        return tensors[tree[TENSOR]]
    if ARRAY in tree:
        return np.array(tree[ARRAY], dtype=tree["dtype"])
    if TUPLE in tree:
        return tuple(_decode(v, tensors) for v in tree[TUPLE])
    if PAIRS in tree:
        return {k: _decode(v, tensors) for k, v in tree[PAIRS]}
    return {k: _decode(v, tensors) for k, v in tree.items()}
