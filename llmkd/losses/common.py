"""Shared maths of the losses: dtype promotion, the stable p·log(p/q) terms and the one reduction.

Dtype: inputs are upcast before any maths to float32, or kept in float64 when given float64 (so that
``torch.autograd.gradcheck`` works); the result has that dtype. Reduction happens once, in :func:`masked_mean`.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

# Below sqrt / normalise so that duplicate examples and zero vectors keep finite gradients.
EPS = 1e-12


def upcast(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors in one compute dtype: float32, or float64 if any input is float64."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return tuple(tensor.to(dtype) for tensor in tensors)


def prob_kl_terms(p: Tensor, q: Tensor) -> Tensor:
    """Elementwise p·(log p − log q) for probabilities; both clamped to the smallest normal number."""
    tiny = torch.finfo(p.dtype).tiny
    return p * (p.clamp_min(tiny).log() - q.clamp_min(tiny).log())


def masked_mean(values: Tensor, mask: Tensor | None = None, num_items: int | Tensor | None = None) -> Tensor:
    """Σ values[mask] / num_items (default: the mask count); 0 when there are no items.

    ``mask`` (true = supervised) broadcasts to ``values``. Pass as ``num_items`` the number of supervised
    items of the whole gradient-accumulation window, so 1 batch of 8 and 4 batches of 2 give one update.
    Masked entries may hold NaN/inf: they reach neither the value nor the gradient.
    """
    (values,) = upcast(values)
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    try:
        mask = torch.broadcast_to(mask.to(values.device) != 0, values.shape)
    except RuntimeError as error:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to values of shape {tuple(values.shape)}"
        ) from error
    # torch.where, not values * mask: 0 * NaN is NaN, in the value and in the gradient.
    total = torch.where(mask, values, 0.0).sum()
    count = mask.sum() if num_items is None else torch.as_tensor(num_items, device=values.device)
    count = count.to(total.dtype)
    # No data-dependent Python branch: that would force a device sync on every step.
    return torch.where(count > 0, total / torch.where(count > 0, count, 1.0), total * 0)
