"""How much a teacher encoder relies on each layer, attention head, FFN neuron and hidden channel, measured on a
calibration set (a few batches of the task's training data) to guide structured pruning
(`llmkd.students.pruning.prune_encoder`). Larger means more important. The scores, per axis:

- heads [L, H] (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"): E_x |∂ℓ(x)/∂m_h|, with a
  mask m (all ones) multiplying each head's output before the attention output projection, and ℓ the teacher's
  own per-example task loss on the batch labels (cross-entropy; squared error for regression; BCE for
  multi-label). Without labels the teacher's own predictions serve as labels: a soft-target loss against the
  teacher itself has zero gradient at m = 1, so it cannot rank heads. One mask per example gives each
  example's |gradient| from one backward pass.
- heads_activation [L, H] (Minitron, Muralidharan et al. 2024): mean over real tokens of ‖head output‖₂.
- neurons [L, I] (Minitron): mean over real tokens of |a_i|, a the FFN activation (the input of its down
  projection: act(x W1 + b1), or act(x Wg) ⊙ x Wu for gated MLPs). A dead neuron scores exactly 0.
- hidden [D] (Minitron's embedding channels): mean over real tokens and the L + 1 hidden states (the
  LayerNorm-ed residual stream of post-LN encoders) of |h_c|.
- layers [L]: the change when the layer is removed (Minitron's depth criterion, measured on the teacher's own
  outputs so no labels are needed): mean over examples of KL(p_teacher ‖ p_teacher without layer l).
- layer_cosine [L]: block importance 1 − cos(h_l, h_{l+1}) averaged over real tokens (Men et al. 2024,
  "ShortGPT"; Minitron's BI), free from the same forward pass.

Every mean is a sum over the whole calibration set divided once by its count (examples or real tokens), and
padded positions never count: a padded batch scores like its examples one by one.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from llmkd.modeling import base_model, forward_keys, select_inputs
from llmkd.students.from_teacher import student_from_teacher
from llmkd.students.pruning import encoder_layout, encoder_shape


def calibration_batches(
    tokenizer, texts, labels=None, *, batch_size: int = 32, max_length: int = 128
) -> list[dict]:
    """Tokenised batches for `importance_scores`: texts are strings or (text, text_pair) tuples; labels (class ids,
    or floats for regression) are optional. Raises ValueError for no texts or a label count that differs."""
    texts = list(texts)
    if not texts or (labels is not None and len(labels) != len(texts)):
        raise ValueError(
            f"calibration_batches: {len(texts)} texts and {'no' if labels is None else len(labels)} labels; "
            "pass at least one text and, if any, one label per text"
        )
    batches, side = [], tokenizer.padding_side
    tokenizer.padding_side = "right"  # left padding would shift absolute positions: scores would change
    try:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            pairs = [tuple(t) if isinstance(t, (tuple, list)) else (t,) for t in chunk]
            encoded = tokenizer(
                *zip(*pairs), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            batch = dict(encoded)
            if labels is not None:
                batch["labels"] = torch.tensor(list(labels[start : start + batch_size]))
            batches.append(batch)
    finally:
        tokenizer.padding_side = side
    return batches


def importance_scores(teacher: nn.Module, batches, *, layer_removal: bool = True) -> dict[str, torch.Tensor]:
    """Importance of every head, neuron, hidden channel and layer of a sequence-classification encoder (see the
    module docstring): float32 CPU tensors `heads`, `heads_activation` [L, H], `neurons` [L, I], `hidden` [D],
    `layer_cosine` [L] and, with `layer_removal`, `layers` [L] (L extra passes over `batches`; the only layer of a
    1-layer teacher scores inf); plus `examples` and `tokens`, the counts behind the means.

    batches: dicts of tensors with input_ids and attention_mask (token_type_ids, labels optional), as
    `calibration_batches` makes them. The teacher is left unchanged (train/eval mode restored). Raises ValueError
    for an unsupported model, a model without logits, no batches, or a regression teacher without labels.
    """
    model = base_model(teacher)
    encoder_layout(model)  # refuses decoders and unsupported families first, with their own message
    if type(model).__name__ not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values():
        raise ValueError(
            f"importance_scores needs a sequence classifier (the task loss ranks heads); got {type(model).__name__}: "
            "load the teacher with AutoModelForSequenceClassification"
        )
    batches = list(batches)
    if not batches:
        raise ValueError(
            "batches is empty: pass a few batches of the task's training data (calibration_batches)"
        )
    shape = encoder_shape(model)
    sums = {
        "heads": torch.zeros(shape["layers"], shape["heads"], dtype=torch.float64),
        "heads_activation": torch.zeros(shape["layers"], shape["heads"], dtype=torch.float64),
        "neurons": torch.zeros(shape["layers"], shape["intermediate"], dtype=torch.float64),
        "hidden": torch.zeros(shape["hidden"], dtype=torch.float64),
        "layer_cosine": torch.zeros(shape["layers"], dtype=torch.float64),
        "examples": torch.zeros((), dtype=torch.float64),
        "tokens": torch.zeros((), dtype=torch.float64),
    }
    was_training = model.training
    model.eval()  # dropout off: scores of the deployed teacher, and repeatable
    try:
        for batch in batches:
            _score_batch(model, batch, sums)
        counts = {"heads": sums["examples"], "hidden": sums["tokens"] * (shape["layers"] + 1)}
        scores = {k: (v / counts.get(k, sums["tokens"])).float() for k, v in sums.items()}
        scores["examples"], scores["tokens"] = sums["examples"].float(), sums["tokens"].float()
        if layer_removal:
            scores["layers"] = _removal_scores(model, batches, shape["layers"])
    finally:
        model.train(was_training)
    return scores


def _inputs(model: nn.Module, batch: dict) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
    """(model inputs on its device, real-token mask [B, T] as floats, labels or None)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in select_inputs(batch, forward_keys(model)).items()}
    ids = inputs["input_ids"]
    real = inputs.get("attention_mask", torch.ones_like(ids)).to(torch.float64)
    labels = batch.get("labels")
    return inputs, real, None if labels is None else labels.to(device)


def _score_batch(model: nn.Module, batch: dict, sums: dict) -> None:
    layout, _, layers = encoder_layout(model)
    inputs, real, labels = _inputs(model, batch)
    n_heads = sums["heads"].shape[1]
    dtype = next(model.parameters()).dtype
    # One mask row per example: the batch gradient then holds each example's own gradient.
    masks = [
        torch.ones(real.shape[0], n_heads, dtype=dtype, device=real.device, requires_grad=True)
        for _ in layers
    ]
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(
            layer.get_submodule(layout.out).register_forward_pre_hook(
                partial(_mask_heads, masks[i], sums["heads_activation"][i], real)
            )
        )
        hooks.append(
            layer.get_submodule(layout.down).register_forward_pre_hook(
                partial(_record_neurons, sums["neurons"][i], real)
            )
        )
    try:
        with torch.enable_grad():
            out = model(**inputs, output_hidden_states=True)
            loss = _example_losses(model.config, out.logits, labels).sum()
            grads = torch.autograd.grad(loss, masks)
    finally:
        for hook in hooks:
            hook.remove()
    sums["heads"] += torch.stack([g.detach().abs().sum(0) for g in grads]).cpu().double()
    states = [h.detach().double() for h in out.hidden_states]
    for i, (before, after) in enumerate(zip(states[:-1], states[1:])):
        cos = F.cosine_similarity(before, after, dim=-1)
        sums["layer_cosine"][i] += ((1 - cos) * real).sum().cpu()
    sums["hidden"] += sum((h.abs() * real[..., None]).sum((0, 1)) for h in states).cpu()
    sums["examples"] += real.shape[0]
    sums["tokens"] += real.sum().cpu()


def _mask_heads(mask: torch.Tensor, norms: torch.Tensor, real: torch.Tensor, module, args):
    """Pre-hook of the attention output projection: records each head's output norm, multiplies it by the mask."""
    x = args[0]  # [B, T, H * head_dim], the concatenated heads
    heads = x.view(*x.shape[:-1], mask.shape[1], -1)
    norms += (heads.detach().double().norm(dim=-1) * real[..., None]).sum((0, 1)).cpu()
    return ((heads * mask[:, None, :, None]).view_as(x), *args[1:])


def _record_neurons(sums: torch.Tensor, real: torch.Tensor, module, args) -> None:
    """Pre-hook of the FFN down projection: its input is the neurons' activations [B, T, I]."""
    sums += (args[0].detach().double().abs() * real[..., None]).sum((0, 1)).cpu()


def _problem(config) -> str:
    if config.problem_type:
        return config.problem_type
    return "regression" if config.num_labels == 1 else "single_label_classification"


def _example_losses(config, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """[B]: the task loss of each example; the teacher's own predictions stand in for missing labels."""
    problem, logits = _problem(config), logits.float()
    if problem == "regression":
        if labels is None:
            raise ValueError(
                "head importance of a regression teacher needs labels (its own predictions give zero gradient): "
                "pass labels to calibration_batches, or rank heads by importance['heads_activation']"
            )
        return 0.5 * (logits - labels.float().view_as(logits)).pow(2).sum(-1)
    if problem == "multi_label_classification":
        target = (logits.detach() > 0).float() if labels is None else labels.float()
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)
    target = logits.detach().argmax(-1) if labels is None else labels
    return F.cross_entropy(logits, target, reduction="none")


def _output_distance(config, reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """[B]: KL(reference ‖ other) of the predicted distributions (Bernoulli per label for multi-label); half the
    squared distance for regression."""
    problem, reference, other = _problem(config), reference.double(), other.double()
    if problem == "regression":
        return 0.5 * (reference - other).pow(2).sum(-1)
    if problem == "multi_label_classification":
        p, lp, lq = torch.sigmoid(reference), F.logsigmoid(reference), F.logsigmoid(other)
        lp_neg, lq_neg = F.logsigmoid(-reference), F.logsigmoid(-other)
        return (p * (lp - lq) + (1 - p) * (lp_neg - lq_neg)).sum(-1)
    lp, lq = reference.log_softmax(-1), other.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


@torch.no_grad()
def _removal_scores(model: nn.Module, batches: list[dict], n_layers: int) -> torch.Tensor:
    """[L]: mean over examples of the output change when each layer alone is dropped (an exact copy of the other
    layers, built by student_from_teacher)."""
    if n_layers == 1:
        return torch.full((1,), float("inf"))
    inputs = [_inputs(model, b)[0] for b in batches]
    reference = [model(**x).logits for x in inputs]
    scores = torch.zeros(n_layers, dtype=torch.float64)
    for i in range(n_layers):
        without = student_from_teacher(model, [j for j in range(n_layers) if j != i]).eval()
        for x, ref in zip(inputs, reference):
            scores[i] += _output_distance(model.config, ref, without(**x).logits).sum().cpu()
        del without
    return (scores / sum(x["input_ids"].shape[0] for x in inputs)).float()
