"""Building students: from the teacher's layers (DistilBERT) or from the teacher's config with overrides.

Layer surgery is structural, not name-based: the teacher's layers are the one `nn.ModuleList` whose length is the
text config's layer count (`encoder.layer`, `model.layers`, `transformer.h`, `model.decoder.layers`, ...). The
student is built fresh from a config whose per-layer settings (attention types, NoPE flags, MoE layer indices,
per-layer overrides) are *selected* at the kept indices, then loaded with the kept layers' weights renumbered.
"""

from __future__ import annotations

import copy
from difflib import get_close_matches

import torch
from torch import nn

from llmkd.knowledge.adapters import student_parameters
from llmkd.modeling import base_model, num_layers, text_config

# Config lists that hold layer *indices* rather than one value per layer: remapped, never selected.
# (Qwen2/3-MoE `mlp_only_layers`, Llama 4 `moe_layers`.)
INDEX_LISTS = ("mlp_only_layers", "moe_layers")
# List-valued config fields that are never per-layer, even when their length happens to equal the layer count.
NOT_PER_LAYER = (
    "architectures",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_decoder_ids",
)
# Config flags under which a layer's maths depends on its position, not only on its weights and config lists
# (GPT-2 scales attention by 1/(layer_idx + 1)): a layer moved to another index would compute something else.
INDEX_DEPENDENT = ("scale_attn_by_inverse_layer_idx",)
# Module attributes that legitimately differ between teacher layer i and student layer j (their position).
POSITION_ATTRS = ("layer_idx", "layer_id", "layer_index", "layer_number", "training")
# The fix every refusal names: a fresh student of the teacher's config needs no layer surgery.
_FIX = "Build a fresh student with student_config: {num_hidden_layers: N} instead of student_layers."


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

    Embeddings, heads and final norms are copied; kept layer `layers[j]` becomes student layer j, and every
    per-layer config list is selected at the kept indices. Keeping all layers gives the teacher exactly.
    Raises ValueError (naming the family and `student_config` as the fix) when the layers are not one
    ModuleList of distinct modules (ALBERT shares one layer), when a layer's maths depends on its index, or
    when a student layer would not be built like the teacher layer it copies.
    """
    teacher = base_model(teacher)
    prefix, teacher_layers = find_layer_list(teacher)
    keep = select_layers(layers, len(teacher_layers))
    _refuse_index_dependent(teacher, keep)
    config = copy.deepcopy(teacher.config)
    select_config_layers(text_config_of(config), keep)
    student = type(teacher)(config).to(next(teacher.parameters()).dtype)
    student_layers = student.get_submodule(prefix)
    _check_same_layers(teacher, teacher_layers, student_layers, keep)
    try:
        missing, unexpected = student.load_state_dict(_renumbered_state(teacher, prefix, keep), strict=False)
    except RuntimeError as err:  # a per-layer weight shaped by the layer count (e.g. ESM's contact head)
        raise ValueError(
            f"{_family(teacher)}: copying layers {keep} gives weights of other shapes ({str(err).splitlines()[1:2]}); "
            "this architecture sizes weights outside its layer list by the layer count. " + _FIX
        ) from err
    missing = [k for k in missing if k not in _tied_keys(student)]
    if missing or unexpected:
        raise ValueError(
            f"{_family(teacher)}: copying layers {keep} left missing={missing} unexpected={unexpected}; "
            "this architecture keeps per-layer weights outside its layer list. " + _FIX
        )
    return student


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, ModuleList) of the model's repeated layers: the outermost ModuleList holding one distinct
    module per layer of the text config (`num_hidden_layers`, alias `n_layer`/`n_layers`/`num_layers`).

    Raises ValueError naming the family when there is no such list, several, or when its layers share weights.
    """
    n = num_layers(model)
    found = [(k, m) for k, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n and k]
    # A list nested inside a candidate's layers belongs to a layer (e.g. a layer's experts), not the stack.
    found = [(k, m) for k, m in found if not any(k.startswith(f"{o}.") for o, _ in found)]
    if not found:
        raise ValueError(
            f"{_family(model)}: no nn.ModuleList holds its {n} layers one module per layer (its layers share "
            "weights, as ALBERT's do, or are stored another way), so teacher layers cannot be copied. " + _FIX
        )
    if len(found) > 1:
        raise ValueError(
            f"{_family(model)}: several layer lists of length {n} ({[k for k, _ in found]}); which to cut is "
            "ambiguous (encoder-decoder models are not supported). " + _FIX
        )
    prefix, layers = found[0]
    seen: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            if seen.setdefault(id(p), i) != i:
                raise ValueError(
                    f"{_family(model)}: layers {seen[id(p)]} and {i} of {prefix} share weights, so dropping "
                    "one would change the other. " + _FIX
                )
    return prefix, layers


def select_config_layers(config, keep: list[int]) -> None:
    """Turns a text config of n layers into one of len(keep) layers, in place.

    Per-layer lists (length n: `layer_types`, `no_rope_layers`, ...) are selected at `keep`; index lists
    (`mlp_only_layers`, `moe_layers`) keep the kept indices, renumbered; per-layer overrides
    (`per_layer_config`) move with their layer. Raises ValueError when the result fails the config's checks.
    """
    n = int(config.num_hidden_layers)
    position = {t: s for s, t in enumerate(keep)}
    overrides = _layer_overrides(config)
    for name, values in per_layer_lists(config).items():
        setattr(config, name, type(values)(values[i] for i in keep))
    for name in INDEX_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and all(isinstance(i, int) and 0 <= i < n for i in values):
            setattr(config, name, type(values)(position[i] for i in values if i in position))
    if overrides is not None:
        config.per_layer_config = None
    config.num_hidden_layers = len(keep)
    if overrides is not None:
        config.per_layer_config = {position[i]: v for i, v in overrides.items() if i in position}
    _validate(config)


def per_layer_lists(config) -> dict[str, list | tuple]:
    """Config fields holding one value per layer: lists/tuples whose length is the layer count."""
    n = int(config.num_hidden_layers)
    return {
        name: value
        for name, value in vars(config).items()
        if isinstance(value, (list, tuple))
        and len(value) == n
        and not name.startswith("_")
        and name not in INDEX_LISTS + NOT_PER_LAYER
        and not name.endswith(("token_id", "token_ids"))
    }


def text_config_of(config):
    """The (mutable) text sub-config of a composite config; the config itself otherwise."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _layer_overrides(config) -> dict[int, dict] | None:
    """Per-layer overrides of a heterogeneous config (transformers' `per_layer_config`), keyed by layer."""
    if not getattr(config, "is_heterogeneous", False):
        return None
    saved = config.to_dict().get("per_layer_config") or {}
    return {int(i): copy.deepcopy(v) for i, v in saved.items()}


def _validate(config) -> None:
    """The config's own consistency checks (e.g. len(layer_types) == num_hidden_layers) as a ValueError."""
    if not hasattr(config, "validate"):  # configs before strict dataclasses have nothing to run
        return
    try:
        config.validate()
    except Exception as err:  # strict-dataclass errors do not subclass ValueError
        raise ValueError(f"{config.model_type}: the student config is inconsistent: {err}") from err


def _refuse_index_dependent(model: nn.Module, keep: list[int]) -> None:
    config = text_config(model)
    flags = [f for f in INDEX_DEPENDENT if getattr(config, f, False)]
    if flags and keep != list(range(len(keep))):
        raise ValueError(
            f"{_family(model)}: with {flags[0]}=True a layer's output depends on its index, so teacher layers "
            f"{keep} cannot move to student positions 0..{len(keep) - 1} unchanged; keep a prefix "
            "(student_layers: 'first:N'). " + _FIX
        )


def _check_same_layers(teacher: nn.Module, teacher_layers, student_layers, keep: list[int]) -> None:
    """Each student layer must be built like the teacher layer it copies (same modules, same settings)."""
    for j, i in enumerate(keep):
        t, s = _layer_signature(teacher_layers[i]), _layer_signature(student_layers[j])
        if t != s:
            diff = sorted(set(t.items()) ^ set(s.items()), key=repr)[:4]
            raise ValueError(
                f"{_family(teacher)}: student layer {j} is not built like teacher layer {i} (differs in {diff}); "
                "its config has a per-layer rule llmkd cannot select. " + _FIX
            )


def _layer_signature(layer: nn.Module) -> dict:
    """Class, parameter shapes and scalar settings (sliding window, rope on/off, ...) of every submodule."""
    sig = {}
    for name, module in layer.named_modules():
        sig[(name, "class")] = type(module).__name__
        for key, value in vars(module).items():
            scalar = isinstance(value, (bool, int, float, str, type(None)))
            if scalar and not key.startswith("_") and key not in POSITION_ATTRS:
                sig[(name, key)] = value
    for name, p in layer.named_parameters():
        sig[(name, "shape")] = tuple(p.shape)
    return sig


def _renumbered_state(teacher: nn.Module, prefix: str, keep: list[int]) -> dict[str, torch.Tensor]:
    """The teacher's state dict with `prefix.{keep[j]}.` renamed `prefix.{j}.` and dropped layers left out."""
    position = {str(t): str(s) for s, t in enumerate(keep)}
    state = {}
    for name, tensor in teacher.state_dict().items():
        if not name.startswith(f"{prefix}."):
            state[name] = tensor.clone()
            continue
        index, rest = name[len(prefix) + 1 :].split(".", 1)
        if index in position:
            state[f"{prefix}.{position[index]}.{rest}"] = tensor.clone()
    return state


def _family(model: nn.Module) -> str:
    return f"{getattr(model.config, 'model_type', '?')} ({type(model).__name__})"


def student_from_config(teacher: nn.Module, overrides: dict, seed: int = 42) -> nn.Module:
    """A freshly initialised student with the teacher's config changed by `overrides` (e.g. TinyBERT-4 shape).

    A smaller layer count (`num_hidden_layers` or its alias, e.g. GPT-2's `n_layer`) cuts the per-layer config
    lists to the first N layers unless `overrides` sets them too. Raises ValueError for an unknown key, and for a
    deeper student whose per-layer lists (`layer_types`, ...) are not given for every layer.
    """
    config = copy.deepcopy(base_model(teacher).config)
    text = text_config_of(config)
    unknown = [k for k in overrides if not hasattr(text, k)]
    if unknown:
        fields = sorted(text.to_dict())
        hints = [
            f"{k} (did you mean {close[0]}?)" for k in unknown if (close := get_close_matches(k, fields, 1))
        ]
        raise ValueError(
            f"student_config keys {unknown} are not fields of {type(text).__name__}"
            + (f": {', '.join(hints)}" if hints else "; see the teacher's config.json for its fields")
        )
    aliases = {real: name for name, real in getattr(text, "attribute_map", {}).items()}
    named = {aliases.get(k, k): v for k, v in overrides.items()}
    n_old, n_new = int(text.num_hidden_layers), named.get("num_hidden_layers", text.num_hidden_layers)
    if not isinstance(n_new, int) or isinstance(n_new, bool) or n_new < 1:
        raise ValueError(f"student_config num_hidden_layers={n_new!r}: need a positive integer")
    missing = sorted(k for k in per_layer_lists(text) if k not in named)
    if n_new > n_old and (missing or _layer_overrides(text)):
        raise ValueError(
            f"student_config num_hidden_layers={n_new} is deeper than the teacher's {n_old} layers, and "
            f"{type(text).__name__} has per-layer settings {missing or ['per_layer_config']} that cannot be "
            f"extended; give them for all {n_new} layers in student_config too"
        )
    if n_new < n_old:  # the first N layers' settings; lists given in overrides replace them below
        select_config_layers(text, list(range(n_new)))
    for key, value in named.items():
        setattr(text, key, value)
    _validate(text)
    torch.manual_seed(seed)
    return type(base_model(teacher))(config)


def _tied_keys(model: nn.Module) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied.keys())


def describe(model: nn.Module) -> dict:
    config = text_config(model)
    return {
        "parameters": student_parameters(model),  # a trainer's auxiliary modules (projectors) left out
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
    }
