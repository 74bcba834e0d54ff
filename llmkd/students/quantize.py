"""Quantisation-aware distillation (QAT): a student whose Linear weights are fake-quantised to int8/int4.

Symmetric round-to-nearest with one scale per output row or per group of `group_size` input columns:
    s = max|W_g| / q_max,   q = clamp(round(W / s), -q_max, q_max),   Ŵ = s · q,   q_max = 2^(b-1) - 1
(127 for int8, 7 for int4; Jacob et al. 2018, arXiv 1712.05877, with the symmetric per-channel scales now
standard for weights). The forward pass uses Ŵ, the backward pass the straight-through estimator
∂L/∂W := ∂L/∂Ŵ (Bengio et al. 2013), so the latent full-precision W keeps learning while the loss is that of
the int model. Trained against a full-precision teacher this is the survey's "quantised distillation"
(Polino et al. 2018, arXiv 1802.05668; Mishra & Marr 2018, Apprentice, arXiv 1711.05852).

Mechanism: each selected `nn.Linear` is swapped for a `QATLinear` (an `nn.Linear` subclass holding the same
Parameter objects), so the model stays a transformers model and its state_dict keys do not change: the
trainer's checkpoints are plain checkpoints of the latent weights. `export_quantized` writes the int model.
"""

from __future__ import annotations

import copy
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from llmkd import modeling as A
from llmkd.atomic import atomic_write, write_json

QMAX = {8: 127, 4: 7}
# Heads stay in full precision: the logits the distillation loss reads come straight out of them, an LLM head is
# often tied to the input embeddings (a lookup, not quantised here), and a classifier head is tiny (labels × H).
DEFAULT_EXCLUDE = ("lm_head", "classifier", "score")
FORMAT = "llmkd-symmetric-int"
WEIGHTS_FILE, QUANT_CONFIG_FILE = "model.safetensors", "quantization_config.json"


def check_bits(bits, group_size) -> None:
    if bits not in QMAX or isinstance(bits, bool):
        raise ValueError(f"bits must be 8 or 4 (signed symmetric integers), got {bits!r}")
    if group_size is not None and (
        not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0
    ):
        raise ValueError(
            f"group_size must be a positive integer or null (one scale per output row), got {group_size!r}"
        )


def _groups(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(out, in) → (out, n_groups, group): one scale per group; group_size=None means one group per row."""
    out_features, in_features = weight.shape
    size = in_features if group_size is None else group_size
    if in_features % size:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_features}")
    return weight.reshape(out_features, in_features // size, size)


def quantize_weight(weight: torch.Tensor, bits: int = 8, group_size: int | None = None):
    """Symmetric round-to-nearest: returns int8 codes q (out, in) in [-q_max, q_max] and float32 scales
    (out, n_groups). An all-zero group gets scale 1 (its codes are 0 whatever the scale)."""
    check_bits(bits, group_size)
    groups = _groups(weight.detach().float(), group_size)
    scale = groups.abs().amax(dim=-1) / QMAX[bits]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(groups / scale.unsqueeze(-1)), -QMAX[bits], QMAX[bits])
    return q.to(torch.int8).reshape(weight.shape), scale


def dequantize_weight(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Ŵ = s · q, computed in float32 and then cast (export, load and fake-quant share this one path)."""
    group = q.shape[1] // scale.shape[1]
    groups = q.float().reshape(q.shape[0], scale.shape[1], group) * scale.float().unsqueeze(-1)
    return groups.reshape(q.shape).to(dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: the dequantised weight Ŵ exactly; backward: the identity (∂L/∂W := ∂L/∂Ŵ)."""

    @staticmethod
    def forward(ctx, weight, bits, group_size):
        q, scale = quantize_weight(weight, bits, group_size)
        return dequantize_weight(q, scale, weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def fake_quantize(weight: torch.Tensor, bits: int = 8, group_size: int | None = None) -> torch.Tensor:
    return _StraightThrough.apply(weight, bits, group_size)


class QATLinear(nn.Linear):
    """An `nn.Linear` whose forward multiplies by the fake-quantised weight; parameters and keys unchanged."""

    bits: int = 8
    group_size: int | None = None

    @classmethod
    def wrap(cls, linear: nn.Linear, bits: int, group_size: int | None) -> QATLinear:
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        # The same Parameter objects, not copies: optimisers, tied references and devices see no change.
        module.weight = linear.weight
        module.bias = linear.bias
        module.bits, module.group_size = bits, group_size
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize(self.weight, self.bits, self.group_size), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}"


def _excluded(name: str, module: nn.Module, head: nn.Module | None, exclude) -> bool:
    parts = set(name.split("."))
    if module is head and "lm_head" in exclude:  # the output head, whatever the architecture calls it
        return True
    return bool(parts & set(exclude)) or name in exclude


def _targets(model: nn.Module, bits: int, group_size: int | None, exclude) -> dict[str, nn.Linear]:
    head = A.base_model(model).get_output_embeddings()
    targets = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not _excluded(name, m, head, exclude)
    }
    if not targets:
        raise ValueError(f"no nn.Linear layer left to quantise after exclude={list(exclude)}")
    for name, m in targets.items():
        if isinstance(m, QATLinear):
            raise ValueError(
                f"{name} is already fake-quantised; quantize_student/ptq take an unquantised model"
            )
        if group_size is not None and m.in_features % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide {name}.in_features={m.in_features}; pick a divisor "
                f"(e.g. 32 or 64 for widths that are multiples of 64) or group_size=null for per-row scales"
            )
        if bits == 4 and m.in_features % 2:
            raise ValueError(f"int4 packs two weights per byte; {name}.in_features={m.in_features} is odd")
        embeddings = A.base_model(model).get_input_embeddings()
        if m is head and embeddings is not None and head.weight is embeddings.weight:
            raise ValueError(
                f"{name} is tied to the input embeddings; keep it in exclude (tied heads stay full precision)"
            )
    return targets


def quantize_student(model: nn.Module, bits: int = 8, group_size: int | None = None, exclude=DEFAULT_EXCLUDE):
    """Makes `model` (in place) a QAT student: every selected Linear computes with fake-quantised weights.

    `exclude`: module-name components kept in full precision (default: output and classifier heads); the
    output head counts as "lm_head" whatever its attribute name. Fails before training on bad settings."""
    check_bits(bits, group_size)
    exclude = tuple(exclude or ())
    for name, linear in _targets(model, bits, group_size, exclude).items():
        model.set_submodule(name, QATLinear.wrap(linear, bits, group_size))
    return model


def quantized_modules(model: nn.Module) -> dict[str, QATLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QATLinear)}


def ptq(model: nn.Module, bits: int = 8, group_size: int | None = None, exclude=DEFAULT_EXCLUDE) -> nn.Module:
    """Post-training quantisation, the baseline without distillation: the same round-to-nearest quantiser
    applied to a trained model's weights with no further training. Returns a quantised copy (eval mode);
    `model` is untouched. `export_quantized` writes it in the same int format as a QAT student."""
    return quantize_student(copy.deepcopy(model), bits, group_size, exclude).eval()


# ---- export / load -------------------------------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) int codes in [-8, 7] → (out, in/2) uint8, two's-complement nibbles, even column in the low one."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low, high = (packed & 0xF).to(torch.int8), (packed >> 4).to(torch.int8)
    both = torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return torch.where(both >= 8, both - 16, both)  # sign-extend the 4-bit two's complement


def _export_state(model: nn.Module, modules: dict[str, QATLinear]):
    """Int codes + scales for quantised weights; every other tensor as is, tied duplicates stored once."""
    state, seen, tied = {}, {}, {}
    quantised = {f"{name}.weight": m for name, m in modules.items()}
    ignored = set(
        getattr(model, "_keys_to_ignore_on_save", None) or ()
    )  # as save_pretrained: e.g. projectors
    for key, tensor in model.state_dict().items():
        if key in ignored:
            continue
        if key in quantised:
            m = quantised[key]
            q, scale = quantize_weight(tensor, m.bits, m.group_size)
            state[f"{key}_q"] = pack_int4(q) if m.bits == 4 else q
            state[f"{key}_scale"] = scale
            continue
        pointer = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if pointer in seen:  # safetensors refuses shared memory; the loader re-ties it
            tied[key] = seen[pointer]
            continue
        seen[pointer] = key
        state[key] = tensor.detach().cpu().contiguous().clone()
    return {k: v.cpu().contiguous() for k, v in state.items()}, tied


def export_quantized(model: nn.Module, out_dir: str | os.PathLike) -> dict:
    """Writes the int model: `model.safetensors` (int8 codes, or int4 packed two per uint8, plus float32
    scales named `<module>.weight_q` / `<module>.weight_scale`; other tensors as trained), `config.json` and
    `quantization_config.json`. Returns the JSON written."""
    modules = quantized_modules(model)
    if not modules:
        raise ValueError("the model has no fake-quantised layer; call quantize_student (QAT) or ptq first")
    out_dir = os.fspath(out_dir)
    if A.base_model(model) is not model:
        raise TypeError(
            f"export_quantized takes the transformers model itself, got a {type(model).__name__} wrapper"
        )
    state, tied = _export_state(model, modules)
    layers = {
        name: {"bits": m.bits, "group_size": m.group_size, "shape": list(m.weight.shape)}
        for name, m in modules.items()
    }
    meta = {
        "format": FORMAT,
        "version": 1,
        "scheme": "symmetric round-to-nearest, W = scale * q; int4: two per uint8, even column in the low nibble",
        "layers": layers,
        "tied": tied,
        "weight_bytes": sum(t.numel() * t.element_size() for t in state.values()),
    }
    atomic_write(
        os.path.join(out_dir, WEIGHTS_FILE), lambda h: h.write(save(state, {"format": FORMAT})), "wb"
    )
    A.task_of(model)  # the loader rebuilds causal LMs and sequence classifiers only
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # set by save_pretrained, not at construction
    atomic_write(os.path.join(out_dir, "config.json"), lambda h: h.write(config.to_json_string()))
    write_json(os.path.join(out_dir, QUANT_CONFIG_FILE), meta)
    return meta


def _model_class(config):
    name = (config.architectures or [None])[0]
    if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return AutoModelForCausalLM
    if name in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values():
        return AutoModelForSequenceClassification
    raise ValueError(f"config.architectures={config.architectures}: not a causal LM or sequence classifier")


def load_quantized(out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """A plain transformers model whose quantised weights are exactly Ŵ = s · q (in `dtype`, default the
    exported model's dtype), in eval mode. Fails on a folder that `export_quantized` did not write."""
    out_dir = os.fspath(out_dir)
    meta_path = os.path.join(out_dir, QUANT_CONFIG_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{meta_path} is missing: {out_dir} is not an llmkd quantised export")
    with open(meta_path, encoding="utf-8") as handle:
        meta = json.load(handle)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    config = AutoConfig.from_pretrained(out_dir)
    model = _model_class(config).from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    stored = load_file(os.path.join(out_dir, WEIGHTS_FILE))
    state = {k: v for k, v in stored.items() if not k.endswith(("_q", "_scale"))}
    for name, layer in meta["layers"].items():
        q = stored[f"{name}.weight_q"]
        q = unpack_int4(q) if layer["bits"] == 4 else q
        state[f"{name}.weight"] = dequantize_weight(q, stored[f"{name}.weight_scale"], dtype or torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = set(missing) - set(meta["tied"])
    if missing or unexpected:
        raise ValueError(
            f"{out_dir} does not fit its config: missing {sorted(missing)}, unexpected {unexpected}"
        )
    return model.eval()
