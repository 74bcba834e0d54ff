"""Is a causal LM's logit tensor just its output head applied to its last hidden state?

The fused logit path never materialises the full [B, T, V] logits: it recomputes them chunk by chunk as
`linear(h_last, W_head, b_head)`. That equals the model's own logits only when the model applies nothing after
the head — not Gemma 2's soft-capping `c·tanh(z/c)`, Cohere's `logit_scale·z`, Granite's `z / logits_scaling` —
and only when the head is a plain Linear/Embedding whose `.weight` is the matrix actually used (not LoRA,
fake-quantised or 4-bit). `head_mismatch` checks the head's type and the config's logit-transform fields,
then measures whatever else a forward might do with one pass on a few tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkd.modeling import base_model, forward_keys, text_config

PROBE_TOKENS = 6
# Config fields that, when present and not the identity, transform the logits after the head.
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,  # Gemma 2/3/4, VaultGemma, T5Gemma: logits = c · tanh(z / c)
    "logit_scale": 1.0,  # Cohere, Cohere 2: logits = logit_scale · z
    "logits_scaling": 1.0,  # Granite (MoE, hybrid), MiniCPM3: logits = z / logits_scaling
    "lm_head_multiplier": 1.0,  # Falcon-H1: logits = lm_head_multiplier · z
    "logits_soft_cap": None,  # RecurrentGemma
    "output_logit_soft_cap": None,  # xLSTM
}
# Allowed |model logits − linear(h, W)| in units of the logits' magnitude: a few rounding steps of the dtype.
ULPS = 16


def head_mismatch(model: nn.Module) -> str | None:
    """None when `model(x).logits == linear(hidden_states[-1], head.weight, head.bias)`, else why not.

    `head` is `model.get_output_embeddings()`. Refused without running (a reason is returned) when the head is
    missing, is not exactly nn.Linear / nn.Embedding (LoRA, fake-quantised, 4-bit, parametrized), has forward
    hooks or has no usable float weight, and when the config sets a logit transform (LOGIT_TRANSFORMS) to
    something other than the identity. Otherwise runs one eval-mode, no-grad forward on PROBE_TOKENS token
    ids (logits [1, T, V]); the model's training flags and the RNG state are left as they were.
    """
    model = base_model(model)
    family = getattr(model.config, "model_type", type(model).__name__)
    head = model.get_output_embeddings()
    # A configured transform is refused even when the probe's logits are too small to show it (a soft-cap is
    # nearly the identity near 0, and in bf16 invisible): real inputs reach the range where it is not.
    reason = _head_reason(head) or _describe_transform(model)
    if reason is not None:
        return f"{family}: {reason}"
    try:
        logits, hidden = _probe(model, head)
    except Exception as err:  # a model the probe cannot run is one whose fused path cannot be checked
        return f"{family}: the probe forward failed ({type(err).__name__}: {err})"
    if logits is None:
        return f"{family}: its forward returns no logits or hidden states to compare"
    if hidden.shape[-1] != head.weight.shape[-1]:
        return f"{family}: the last hidden state (width {hidden.shape[-1]}) is not the head's input"
    plain = F.linear(hidden.to(head.weight.dtype), head.weight, getattr(head, "bias", None)).float()
    logits = logits.float()
    if logits.shape != plain.shape:
        return (
            f"{family}: logits {tuple(logits.shape)} are not lm_head(last hidden state) {tuple(plain.shape)}"
        )
    tol = ULPS * torch.finfo(head.weight.dtype).eps * (1.0 + plain.abs().max().item())
    if (logits - plain).abs().max().item() <= tol:
        return None
    return f"{family}: the logits are not lm_head(last hidden state)"


def _head_reason(head: nn.Module | None) -> str | None:
    if head is None:
        return "no output head (get_output_embeddings() is None)"
    if type(head) not in (nn.Linear, nn.Embedding):
        return (
            f"the output head is a {type(head).__name__}, not a plain nn.Linear/nn.Embedding "
            "(LoRA, quantised or wrapped heads do not compute logits from .weight alone)"
        )
    if head._forward_hooks or head._forward_pre_hooks:  # a hook may rescale or replace what the head returns
        return "the output head has forward hooks, so its output is not linear(h, .weight) alone"
    weight = head.weight
    if not weight.is_floating_point() or weight.device.type == "meta":
        return (
            f"the output head's weight is {weight.dtype} on {weight.device.type}, not a usable float matrix"
        )
    return None


@torch.no_grad()
def _probe(model: nn.Module, head: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(logits, hidden_states[-1]) of one eval-mode forward on token ids 1..PROBE_TOKENS (mod the vocabulary)."""
    rows = head.weight.shape[0]
    device = head.weight.device
    ids = (torch.arange(1, PROBE_TOKENS + 1, device=device) % rows).unsqueeze(0)
    modes = {m: m.training for m in model.modules()}
    # fork_rng: a model that samples in eval mode (or a hook that does) must not move the caller's RNG.
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            model.eval()
            extra = {"use_cache": False} if "use_cache" in forward_keys(model) else {}
            out = model(
                input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, **extra
            )
    finally:
        for module, training in modes.items():
            module.training = training
    hidden = getattr(out, "hidden_states", None)
    logits = getattr(out, "logits", None)
    if logits is None or not hidden:
        return None, None
    return logits, hidden[-1]


def _describe_transform(model: nn.Module) -> str | None:
    """'logits = softcap(h·Wᵀ) (final_logit_softcapping=30.0), ...' naming the config's logit transforms that are
    not the identity; None when there are none."""
    config = text_config(model)
    found = {
        k: getattr(config, k)
        for k, identity in LOGIT_TRANSFORMS.items()
        if getattr(config, k, identity) not in (identity, None)
    }
    if not found:
        return None
    shape = "softcap(h·Wᵀ)" if any("cap" in k for k in found) else "scaled h·Wᵀ"
    fields = ", ".join(f"{k}={v}" for k, v in found.items())
    return f"logits = {shape} ({fields}), not lm_head(last hidden state)"
