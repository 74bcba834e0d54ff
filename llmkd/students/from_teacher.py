"""Building students: from the teacher's layers (DistilBERT) or from the teacher's config with overrides."""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from llmkd.modeling import num_layers, text_config

# Matches the layer index in parameter names: bert `encoder.layer.3.`, llama `model.layers.3.`.
LAYER_KEY = re.compile(r"(\.layers?\.)(\d+)(\.)")


def select_layers(spec, n_teacher: int) -> list[int]:
    """Teacher layers to keep: a list such as [0, 2, 4], or 'every:K', 'first:N', 'last:N'."""
    if isinstance(spec, str):
        how, _, k = spec.partition(":")
        if how not in ("every", "first", "last") or not k.isdigit() or int(k) < 1:
            raise ValueError(
                f"student_layers={spec!r}: use a list like [0, 2, 4] or 'every:K', 'first:N', 'last:N'"
            )
        k = int(k)
        layers = {
            "every": list(range(0, n_teacher, k)),
            "first": list(range(min(k, n_teacher))),
            "last": list(range(max(n_teacher - k, 0), n_teacher)),
        }[how]
    else:
        layers = list(spec)
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < n_teacher]
    if bad or not layers or len(set(layers)) != len(layers):
        raise ValueError(
            f"student_layers={spec!r}: need distinct teacher layer indices in 0..{n_teacher - 1} (bad: {bad})"
        )
    return sorted(layers)


def student_from_teacher(teacher: nn.Module, layers) -> nn.Module:
    """A shallower copy of the teacher keeping `layers` (DistilBERT's initialisation, Sanh et al. 2019).

    Embeddings, heads and final norms are copied; kept layer `layers[j]` becomes student layer j.
    """
    keep = select_layers(layers, num_layers(teacher))
    config = copy.deepcopy(teacher.config)
    _set_layers(config, len(keep))
    student = type(teacher)(config).to(next(teacher.parameters()).dtype)
    renumber = {str(t): str(s) for s, t in enumerate(keep)}
    state = {}
    for name, tensor in teacher.state_dict().items():
        match = LAYER_KEY.search(name)
        if match is None:
            state[name] = tensor.clone()
        elif match.group(2) in renumber:
            state[LAYER_KEY.sub(lambda m: f"{m.group(1)}{renumber[m.group(2)]}{m.group(3)}", name, 1)] = (
                tensor.clone()
            )
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(student)]
    if missing or unexpected:
        raise RuntimeError(
            f"layer copy left missing={missing} unexpected={unexpected}; unsupported architecture"
        )
    return student


def student_from_config(teacher: nn.Module, overrides: dict, seed: int = 42) -> nn.Module:
    """A freshly initialised student with the teacher's config changed by `overrides` (e.g. TinyBERT-4 shape)."""
    config = copy.deepcopy(teacher.config)
    unknown = [k for k in overrides if not hasattr(config, k)]
    if unknown:
        raise ValueError(f"student_config keys {unknown} are not fields of {type(config).__name__}")
    for key, value in overrides.items():
        setattr(config, key, value)
    if "num_hidden_layers" in overrides:
        _set_layers(config, overrides["num_hidden_layers"])
    torch.manual_seed(seed)
    return type(teacher)(config)


def _set_layers(config, n: int) -> None:
    config.num_hidden_layers = n
    if getattr(config, "layer_types", None) is not None:  # per-layer attention kinds (Llama 3 / Qwen style)
        config.layer_types = config.layer_types[:n]


def _tied_keys(model: nn.Module) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied.keys())


def describe(model: nn.Module) -> dict:
    config = text_config(model)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
    }
