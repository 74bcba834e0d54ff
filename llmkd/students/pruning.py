"""Structured pruning of a transformers encoder guided by teacher importance (Minitron: Muralidharan et al. 2024,
"Compact Language Models via Pruning and Knowledge Distillation"): whole layers, attention heads, FFN neurons and
hidden (embedding) channels. The result is a plain checkpoint of the teacher's class: a config with smaller
numbers and the teacher's weights sliced, so `save_pretrained` / `AutoModel*.from_pretrained` round-trip it with no
custom code.

Depth goes through `student_from_teacher` (kept layers copied exactly); width keeps the same count in every layer
(one `intermediate_size`, one `num_attention_heads`), the top-k of each layer by importance
(`llmkd.students.importance.importance_scores`).

Heads and plain checkpoints: transformers 5.24 has no `prune_heads` / `config.pruned_heads` any more, and BERT,
RoBERTa, ELECTRA and DistilBERT compute the head size as hidden_size / num_attention_heads. In those families
dropping heads at a kept head size is only expressible together with the hidden size: keeping h heads of size d
needs hidden_size = h * d (Minitron prunes both axes too). Families with a head-size field (NomicBERT's
`head_dim`) prune heads alone. FFN-neuron and head removal is exact (a dead neuron or head removed changes
nothing); hidden-channel removal is not (LayerNorm statistics change) and needs distillation afterwards.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from llmkd.modeling import base_model
from llmkd.students.from_teacher import (
    find_layer_list,
    select_config_layers,
    select_layers,
    student_from_teacher,
)
from llmkd.students.from_teacher import text_config_of as _text


@dataclass(frozen=True)
class Layout:
    """Where a layer keeps its projections (names relative to one layer) and which config fields size them."""

    query: str
    key: str
    value: str
    out: str  # attention output projection: its input is the concatenated heads
    up: tuple[str, ...]  # FFN projections whose rows are neurons (up, and gate for gated MLPs)
    down: str  # FFN output projection: its input is the neurons' activations
    ffn_field: str
    head_dim_field: str | None  # a config field for the head size; None: head size = hidden / heads

    @property
    def heads_tied_to_hidden(self) -> bool:
        return self.head_dim_field is None


_BERT = Layout(
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    ("intermediate.dense",),
    "output.dense",
    "intermediate_size",
    None,
)
FAMILIES = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "distilbert": Layout(
        "attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", ("ffn.lin1",), "ffn.lin2",
        "hidden_dim", None,
    ),
    "nomic_bert": Layout(
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size", "head_dim",
    ),
}  # fmt: skip


def encoder_layout(model: nn.Module) -> tuple[Layout, str, nn.ModuleList]:
    """(layout, dotted name of the layer list, the layers) of a supported encoder.

    Raises ValueError naming the model type and the supported families for a causal LM, a decoder-configured
    encoder, or an architecture outside `FAMILIES`.
    """
    model = base_model(model)
    kind, name = getattr(model.config, "model_type", "?"), type(model).__name__
    if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() or getattr(model.config, "is_decoder", False):
        raise ValueError(
            f"{kind} ({name}) is a causal/decoder model: structured pruning here supports encoders "
            f"({', '.join(FAMILIES)}); shorten a causal LM with student_from_teacher(teacher, layers) instead"
        )
    if kind not in FAMILIES:
        raise ValueError(
            f"{kind} ({name}) is not supported for head/FFN pruning (supported: {', '.join(FAMILIES)}); "
            "use student_from_teacher(teacher, layers) for depth only, or add its Layout to FAMILIES"
        )
    prefix, layers = find_layer_list(model)
    return FAMILIES[kind], prefix, layers


def encoder_shape(model: nn.Module) -> dict[str, int]:
    """layers, heads, head_dim, intermediate (FFN width) and hidden of a supported encoder."""
    layout, _, layers = encoder_layout(model)
    config = _text(base_model(model).config)
    heads = int(config.num_attention_heads)
    return {
        "layers": len(layers),
        "heads": heads,
        "head_dim": layers[0].get_submodule(layout.out).in_features // heads,
        "intermediate": int(getattr(config, layout.ffn_field)),
        "hidden": int(config.hidden_size),
    }


def prune_encoder(
    teacher: nn.Module,
    *,
    layers=None,
    heads_per_layer: int | None = None,
    intermediate_size: int | None = None,
    hidden_size: int | None = None,
    importance: dict | None = None,
) -> nn.Module:
    """A pruned copy of `teacher` (same class, plain checkpoint); the teacher is left unchanged.

    layers: teacher layer indices or a spec ('first:N', 'every:K', as `select_layers`), or an int N for the N
      layers of highest `importance['layers']`; None keeps all. Kept layers are copied exactly.
    heads_per_layer, intermediate_size, hidden_size: the width kept in every layer (None: unchanged); each keeps
      the top-k of `importance['heads']` [L, H], `importance['neurons']` [L, I], `importance['hidden']` [D]
      (rows are teacher layers). In families whose head size is hidden / heads, heads_per_layer * head_dim must
      equal hidden_size.
    Nothing pruned gives the teacher exactly. Raises ValueError (naming the value and the fix) for an unsupported
    model, a size out of range, an empty layer list, or missing/misshapen importance scores.
    """
    teacher = base_model(teacher)
    layout, _, _ = encoder_layout(teacher)
    shape = encoder_shape(teacher)
    heads = _width("heads_per_layer", heads_per_layer, shape["heads"])
    ffn = _width("intermediate_size", intermediate_size, shape["intermediate"])
    hidden = _width("hidden_size", hidden_size, shape["hidden"])
    if layout.heads_tied_to_hidden and heads * shape["head_dim"] != hidden:
        size = shape["head_dim"]
        fix = f"heads_per_layer={heads} needs hidden_size={heads * size}"
        if hidden % size == 0:
            fix += f", and hidden_size={hidden} needs heads_per_layer={hidden // size}"
        raise ValueError(
            f"{teacher.config.model_type}: heads_per_layer={heads} with hidden_size={hidden}: this family's head "
            f"size is hidden_size / num_attention_heads and transformers has no prune_heads, so to keep heads of "
            f"size {size}: {fix}"
        )
    cuts = {
        "heads": heads < shape["heads"],
        "neurons": ffn < shape["intermediate"],
        "hidden": hidden < shape["hidden"],
    }
    by_rank = isinstance(layers, int) and not isinstance(layers, bool)
    if by_rank and not 1 <= layers <= shape["layers"]:
        raise ValueError(f"layers={layers}: keep between 1 and {shape['layers']} (the teacher's) layers")
    scores = _checked_importance(
        importance, [k for k, cut in cuts.items() if cut] + ["layers"] * by_rank, shape
    )
    keep = _kept_layers(layers, shape["layers"], scores)
    # A fresh model, in the teacher's train/eval mode: an exact copy of the kept layers.
    model = student_from_teacher(teacher, keep).train(teacher.training)
    if not any(cuts.values()):
        return model
    picks = {
        "heads": _top_rows(scores["heads"][keep], heads) if cuts["heads"] else None,
        "neurons": _top_rows(scores["neurons"][keep], ffn) if cuts["neurons"] else None,
        "hidden": _top_rows(scores["hidden"][None], hidden)[0] if cuts["hidden"] else None,
    }
    return _sliced(model, layout, shape, picks, heads, ffn, hidden)


def _width(name: str, value, full: int) -> int:
    if value is None:
        return full
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= full:
        raise ValueError(
            f"{name}={value!r}: need an integer in 1..{full} (the teacher's), or None to keep it"
        )
    return value


def _checked_importance(importance, needed: list[str], shape: dict) -> dict:
    expected = {
        "heads": (shape["layers"], shape["heads"]),
        "neurons": (shape["layers"], shape["intermediate"]),
        "hidden": (shape["hidden"],),
        "layers": (shape["layers"],),
    }
    if needed and importance is None:
        raise ValueError(
            f"pruning {needed} needs importance scores: pass importance=importance_scores(teacher, batches)"
        )
    out = {}
    for key in needed:
        value = importance.get(key) if isinstance(importance, dict) else None
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected[key]:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"importance[{key!r}] is {got}, need a tensor of shape {expected[key]} for this teacher: "
                "compute it with importance_scores(teacher, batches) on this same teacher"
            )
        if torch.isnan(value).any():
            raise ValueError(f"importance[{key!r}] contains NaN: recompute it (a NaN cannot be ranked)")
        out[key] = value.detach().float().cpu()
    return out


def _kept_layers(layers, n: int, scores: dict) -> list[int]:
    if layers is None:
        return list(range(n))
    if isinstance(layers, int) and not isinstance(layers, bool):
        return sorted(_top_rows(scores["layers"][None], layers)[0].tolist())
    if isinstance(layers, (list, tuple)) and not layers:
        raise ValueError(
            "layers=[]: keep at least one layer, e.g. layers=[0, 2] or layers=N for the N most important"
        )
    return select_layers(layers, n)


def _top_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[rows, k]: each row's k highest-scoring indices in ascending order (ties: the lower index)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)[:, :k]
    return order.sort(dim=-1).values


def _sliced(model: nn.Module, layout: Layout, shape: dict, picks: dict, heads: int, ffn: int, hidden: int):
    """The model rebuilt at the new widths with its weights indexed by `picks` (kept heads, neurons, channels)."""
    prefix, layers = find_layer_list(model)
    cuts: dict[str, list[tuple[int, torch.Tensor]]] = {}  # state key -> [(dim, kept indices)]

    def cut(module_name: str, dim: int, index: torch.Tensor, bias: bool) -> None:
        cuts.setdefault(f"{module_name}.weight", []).append((dim, index))
        if bias:
            cuts.setdefault(f"{module_name}.bias", []).append((0, index))

    width = shape["head_dim"]
    for i in range(len(layers)):
        at = f"{prefix}.{i}."
        if picks["heads"] is not None:
            rows = (picks["heads"][i][:, None] * width + torch.arange(width)).reshape(-1)
            for name in (layout.query, layout.key, layout.value):
                cut(at + name, 0, rows, True)
            cut(at + layout.out, 1, rows, False)
        if picks["neurons"] is not None:
            for name in layout.up:
                cut(at + name, 0, picks["neurons"][i], True)
            cut(at + layout.down, 1, picks["neurons"][i], False)
    if picks["hidden"] is not None:
        _cut_hidden(model, layout, prefix, len(layers), shape["hidden"], picks["hidden"], cut)
    state = model.state_dict()
    for key, steps in cuts.items():
        if key in state:
            for dim, index in steps:
                state[key] = state[key].index_select(dim, index.to(state[key].device))
    config = pruned_config(model.config, layout, shape, heads=heads, ffn=ffn, hidden=hidden)
    pruned = type(model)(config).to(next(model.parameters()).dtype)
    try:
        missing, unexpected = pruned.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(
            f"{model.config.model_type}: a weight outside the known layout has another size after pruning "
            f"({str(err).splitlines()[1:2]}); prune this model without hidden_size, or extend its Layout"
        ) from err
    if missing or unexpected:
        raise ValueError(f"{model.config.model_type}: pruning left missing={missing} unexpected={unexpected}")
    return pruned.train(model.training)


def _cut_hidden(
    model, layout: Layout, prefix: str, n_layers: int, width: int, index: torch.Tensor, cut
) -> None:
    """Residual-stream channels: layer projections on their residual side only (their other side is heads or
    neurons, even when it has the same size); every other Linear, Embedding and LayerNorm of width `width`."""
    inputs = (layout.query, layout.key, layout.value, *layout.up)
    known = {
        f"{prefix}.{i}.{n}": n in inputs for i in range(n_layers) for n in (*inputs, layout.out, layout.down)
    }
    for name, module in model.named_modules():
        if name in known:
            if known[name]:  # reads the stream
                cut(name, 1, index, False)
            else:  # writes the stream
                cut(name, 0, index, module.bias is not None)
        elif isinstance(module, nn.Linear):
            if module.in_features == width:
                cut(name, 1, index, False)
            if module.out_features == width:
                cut(name, 0, index, module.bias is not None)
        elif isinstance(module, nn.Embedding) and module.embedding_dim == width:
            cut(name, 1, index, False)
        elif isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape) == (width,):
            cut(name, 0, index, module.bias is not None)


def pruned_config(config, layout: Layout, shape: dict, *, heads: int, ffn: int, hidden: int, layers=None):
    """A copy of `config` at the given widths (and the first `layers` layers, for counting); checked by the
    config's own validation (a ValueError otherwise)."""
    config = copy.deepcopy(config)
    text = _text(config)
    if layers is not None:
        select_config_layers(text, list(range(layers)))
    if getattr(text, "embedding_size", None) == shape["hidden"]:  # ELECTRA: embeddings as wide as the stream
        text.embedding_size = hidden
    setattr(text, layout.ffn_field, ffn)
    text.num_attention_heads = heads
    text.hidden_size = hidden
    if layout.head_dim_field:
        setattr(text, layout.head_dim_field, shape["head_dim"])
    if hasattr(text, "validate"):
        try:
            text.validate()
        except Exception as err:  # strict-dataclass errors do not subclass ValueError
            raise ValueError(f"{text.model_type}: the pruned config is inconsistent: {err}") from err
    return config


def candidate_shapes(teacher: nn.Module, *, depths=None, heads=None, intermediate_sizes=None) -> list[dict]:
    """Every depth × heads × FFN shape with its exact parameter count (model built on the meta device).

    Defaults: depths 1..L; heads H, 3H/4, H/2; FFN I, 3I/4, I/2, I/4. Where the head size is hidden / heads,
    fewer heads also narrow `hidden_size` (see the module docstring). Each entry: layers, heads_per_layer,
    hidden_size, intermediate_size, parameters, fraction (of the teacher's). Raises ValueError for an
    unsupported model or an out-of-range size.
    """
    teacher = base_model(teacher)
    layout, _, _ = encoder_layout(teacher)
    shape = encoder_shape(teacher)
    full_l, full_h, full_i = shape["layers"], shape["heads"], shape["intermediate"]
    depths = list(depths or range(1, full_l + 1))
    heads = list(heads or sorted({full_h, max(1, 3 * full_h // 4), max(1, full_h // 2)}, reverse=True))
    ffns = list(
        intermediate_sizes
        or sorted({full_i, 3 * full_i // 4, full_i // 2, max(1, full_i // 4)}, reverse=True)
    )
    for name, values, full in (
        ("depths", depths, full_l),
        ("heads", heads, full_h),
        ("intermediate_sizes", ffns, full_i),
    ):
        for v in values:
            _width(name, v, full)
    total = _count(type(teacher), teacher.config)
    out = []
    for n, h, i in itertools.product(depths, heads, ffns):
        d = h * shape["head_dim"] if layout.heads_tied_to_hidden else shape["hidden"]
        config = pruned_config(teacher.config, layout, shape, heads=h, ffn=i, hidden=d, layers=n)
        p = _count(type(teacher), config)
        out.append(
            {"layers": n, "heads_per_layer": h, "hidden_size": d, "intermediate_size": i, "parameters": p}
            | {"fraction": p / total}
        )
    return out


def _count(cls, config) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = cls(config)
    return sum(p.numel() for p in model.parameters())
