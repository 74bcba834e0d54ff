"""Memory-bounded logit distillation: the loss of :mod:`llmkd.losses`, reduced, one chunk of positions at a time.

For causal LMs the vocabulary (32k-152k entries) dominates memory: a plain logit loss keeps several float32
``(N, V)`` tensors (upcasts, log-softmaxes, their exponentials, the mixture of a JSD) alive until backward.
Here each chunk's value and gradient are computed together in the forward pass and only the gradient is
kept, so at most one chunk of ``(chunk_size, V)`` float32 temporaries exists at a time, backward included.
The maths is the per-position loss of ``LOSSES["logits"]`` and the reduction is
:func:`~llmkd.losses.masked_mean`'s: a masked sum divided by ``num_items``. forward_kl (kl), soft_ce,
reverse_kl and jsd use closed-form gradients with in-place ops (3-4 ``(chunk_size, V)`` tensors at a
chunk's peak, tested equal to autograd of the plain loss); the other losses use autograd per chunk (6-11).

- :func:`chunked_logit_loss` starts from the logits; it stores one ``(N, V)`` gradient in the input dtype.
- :func:`fused_logit_distillation` starts from the final hidden states and the two lm_head weights, so no
  ``(N, V)`` tensor exists at all; it stores the gradients of the student hidden states and head.

Gradient-in-forward with chunked vocabulary projections follows Liger Kernel (Hsu et al. 2024, "Liger
Kernel: Efficient Triton Kernels for LLM Training", arXiv 2410.10989) and Cut Cross-Entropy (Wijmans et al.
2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv 2411.09009), here in plain PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkd.losses.common import masked_mean
from llmkd.losses.kernels.lean import LEAN, compute_dtype
from llmkd.losses.response import RESPONSE_LOSSES

Tensor = torch.Tensor


def _loss_fn(name: str):
    if name not in RESPONSE_LOSSES:
        raise ValueError(f"unknown logits loss {name!r}; choose one of {', '.join(RESPONSE_LOSSES)}")
    return RESPONSE_LOSSES[name]


def _check_chunk_size(chunk_size: int) -> None:
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(
            f"chunk_size must be a positive int, got {chunk_size!r}; 1024 rows keep a 152k vocabulary "
            "at about 0.6 GB of float32 per temporary"
        )


def _flat_mask(mask: Tensor | None, n: int, device: torch.device) -> Tensor:
    """The ``(N,)`` bool mask of supervised positions (all of them when ``mask`` is None)."""
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if mask.numel() != n:
        raise ValueError(
            f"mask has {mask.numel()} entries (shape {tuple(mask.shape)}) but there are {n} positions; "
            "pass one bool per position, true where the position is supervised"
        )
    return mask.reshape(n).to(device) != 0


def _supervised_chunks(mask: Tensor, chunk_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the chunks holding at least one supervised position; fully masked ones are skipped."""
    n = len(mask)
    chunk_size = min(chunk_size, max(n, 1))  # so a huge chunk_size pads nothing
    starts = range(0, n, chunk_size)
    padded = mask.new_zeros(len(starts) * chunk_size)
    padded[:n] = mask
    # One host sync for the whole loop rather than one `.any()` per chunk.
    keep = padded.view(len(starts), chunk_size).any(1).tolist()
    return [(start, min(start + chunk_size, n)) for start, kept in zip(starts, keep) if kept]


def _scale(mask: Tensor, num_items: int | float | Tensor | None, dtype: torch.dtype) -> Tensor:
    """1 / num_items (default: the mask count), or 0 when there are no items: masked_mean of a single 1."""
    count = mask.sum() if num_items is None else num_items
    return masked_mean(torch.ones((), dtype=compute_dtype(dtype), device=mask.device), num_items=count)


def _validate(loss_fn, student: Tensor, teacher: Tensor, temperature: float, params: dict) -> None:
    # On empty slices: bad temperature / beta / alpha fail even when every chunk is masked and skipped.
    with torch.no_grad():
        loss_fn(student[:0], teacher[:0], temperature=temperature, **params)


def _chunk_grad(loss_fn, logits, mask_chunk, scale, temperature, params, needs_grad, owned=False):
    """(masked sum of the chunk's loss × scale, its float gradient w.r.t. the student chunk or None).

    ``logits()`` gives the (student, teacher) chunk; a callable, so that the only references to the fused
    path's freshly computed chunk logits are the kernel's own and it can drop them early.
    """
    lean = LEAN.get(loss_fn)
    if lean is not None:  # the kernel scales its gradient (one pass fewer)
        values, grad = lean(logits, temperature, scale / temperature, needs_grad, owned, **params)
    else:
        values, grad = _autograd_chunk(loss_fn, *logits(), mask_chunk, temperature, params, needs_grad)
        grad = None if grad is None else grad.mul_(scale)
    # torch.where, not values * mask: a masked row may hold NaN (padding), and 0 * NaN is NaN.
    total = torch.where(mask_chunk, values, 0.0).sum() * scale
    if grad is None or mask_chunk.all():
        return total, grad
    # Masked rows get 0 even when their logits are NaN.
    return total, grad.masked_fill_(~mask_chunk.unsqueeze(-1), 0.0)


def _autograd_chunk(loss_fn, student_chunk, teacher_chunk, mask_chunk, temperature, params, needs_grad):
    """(per-position values, their summed gradient w.r.t. the student chunk) by autograd of the plain loss."""
    with torch.enable_grad():
        # A detached leaf in the compute dtype: the gradient comes back in float32, not the input dtype.
        leaf = student_chunk.detach().to(compute_dtype(student_chunk.dtype)).requires_grad_(needs_grad)
        values = loss_fn(leaf, teacher_chunk, temperature=temperature, **params)
        if not needs_grad:
            return values.detach(), None
        (grad,) = torch.autograd.grad(torch.where(mask_chunk, values, 0.0).sum(), leaf)
    return values.detach(), grad


def _scaled(grad: Tensor | None, grad_output: Tensor) -> Tensor | None:
    # In place: the saved gradient is as large as the input, and a copy would double the peak in backward.
    # A second backward through the same graph then fails autograd's saved-tensor version check.
    return None if grad is None else grad.mul_(grad_output.to(grad.dtype))


# logits in, chunk by chunk -----------------------------------
class _ChunkedLogitLoss(torch.autograd.Function):
    """Value in forward, d value / d student_logits kept for backward; the teacher gets no gradient."""

    @staticmethod
    def forward(ctx, student, teacher, mask, scale, loss_fn, temperature, params, chunk_size, needs_grad):
        total = torch.zeros((), dtype=compute_dtype(student.dtype), device=student.device)
        grad = torch.zeros_like(student) if needs_grad else None
        for start, stop in _supervised_chunks(mask, chunk_size):
            value, chunk_grad = _chunk_grad(
                loss_fn,
                lambda: (student[start:stop], teacher[start:stop]),  # noqa: B023 - called in this iteration
                mask[start:stop],
                scale,
                temperature,
                params,
                needs_grad,
            )
            total += value
            if needs_grad:
                grad[start:stop] = chunk_grad  # cast to the input dtype on copy
            del chunk_grad  # else it lives on through the next chunk's peak
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (_scaled(grad, grad_output),) + (None,) * 8


def chunked_logit_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    mask: Tensor | None = None,
    num_items: int | float | Tensor | None = None,
    chunk_size: int = 1024,
    **params,
) -> Tensor:
    """Σ_{i ∈ mask} ℓ(z_S[i], z_T[i]) / num_items, ℓ = ``LOSSES["logits"][loss]``; (N, V), (N, V) -> scalar.

    Equal to ``masked_mean(ℓ(student_logits, teacher_logits, temperature=T, **params), mask, num_items)``
    (float32, or float64 for float64 inputs), computed ``chunk_size`` positions at a time with the gradient
    taken in forward. Leading dims are flattened: ``(B, T, V)`` with a ``(B, T)`` mask works too (a
    non-contiguous view such as ``logits[:, :-1]`` is copied by the flattening, so prefer masking the last
    position over slicing it off).

    Memory: the ``(N, V)`` gradient in the input dtype is saved for backward (the size of the logits
    themselves); beyond it, only one chunk of ``(chunk_size, V)`` float32 temporaries is alive at a time,
    measured by the allocator: 4 (jsd) or 3 (forward_kl, soft_ce, reverse_kl) such tensors plus two bool
    masks, 6-11 for the losses without a closed form; e.g. 32 rows at V = 152k is ≈ 80 MB for jsd.
    Fully masked chunks are skipped; masked positions get exactly zero gradient. ``teacher_logits`` gets no
    gradient (a frozen teacher). Backward scales the saved gradient in place, so it runs once per forward.
    No T² factor: the caller applies it, as for the plain losses.
    """
    _check_chunk_size(chunk_size)
    loss_fn = _loss_fn(loss)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ; slice both to the shared vocabulary rows and the same positions first"
        )
    _validate(loss_fn, student_logits, teacher_logits, temperature, params)
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    flat_mask = _flat_mask(mask, len(student), student.device)
    needs_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _ChunkedLogitLoss.apply(
        student,
        teacher,
        flat_mask,
        _scale(flat_mask, num_items, student.dtype),
        loss_fn,
        temperature,
        params,
        chunk_size,
        needs_grad,
    )


# hidden states and lm_head weights in, chunk by chunk --------
class _FusedLogitDistillation(torch.autograd.Function):
    """Per chunk: logits from hidden @ Wᵀ (+ b), the loss and its logit gradient, contracted at once into
    the gradients of the student hidden states, head weight and bias."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, mask, scale, loss_fn, temperature, params, chunk_size, needs):
        need_h, need_w, need_b = needs
        compute = compute_dtype(hs.dtype)
        total = torch.zeros((), dtype=compute, device=hs.device)
        grad_h = torch.zeros_like(hs) if need_h else None
        # Weight and bias gradients are sums over every chunk: accumulated in float32, cast once at the end.
        grad_w = torch.zeros(ws.shape, dtype=compute, device=ws.device) if need_w else None
        grad_b = torch.zeros(bs.shape, dtype=compute, device=bs.device) if need_b else None
        for start, stop in _supervised_chunks(mask, chunk_size):
            h = hs[start:stop]
            value, g = _chunk_grad(
                loss_fn,
                lambda: (F.linear(h, ws, bs), F.linear(ht[start:stop], wt, bt)),  # noqa: B023 - called now
                mask[start:stop],
                scale,
                temperature,
                params,
                any(needs),
                owned=True,
            )
            total += value
            if need_h:
                grad_h[start:stop] = g.to(ws.dtype) @ ws
            if need_w:
                grad_w.addmm_(g.T, h.to(compute))
            if need_b:
                grad_b += g.sum(0)
            del g  # else it lives on through the next chunk's peak
        ctx.save_for_backward(
            grad_h,
            None if grad_w is None else grad_w.to(ws.dtype),
            None if grad_b is None else grad_b.to(bs.dtype),
        )
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w, grad_b = (_scaled(grad, grad_output) for grad in ctx.saved_tensors)
        return (grad_h, grad_w, grad_b) + (None,) * 10


def _check_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, side: str) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{side} hidden states {tuple(hidden.shape)} and head weight {tuple(weight.shape)} do not match: "
            f"expected (N, H) and (V, H); flatten (B, T, H) to (B·T, H) and pass lm_head.weight"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{side} head bias {tuple(bias.shape)} should be ({weight.shape[0]},)")


def _check_heads(student: tuple, teacher: tuple) -> None:
    """Each side's (hidden states, head weight, head bias) fit together, and both sides share positions and
    vocabulary."""
    _check_head(*student, "student")
    _check_head(*teacher, "teacher")
    (student_hidden, student_head_weight, _), (teacher_hidden, teacher_head_weight, _) = student, teacher
    if len(student_hidden) != len(teacher_hidden) or len(student_head_weight) != len(teacher_head_weight):
        raise ValueError(
            f"student ({len(student_hidden)} positions, vocab {len(student_head_weight)}) and teacher "
            f"({len(teacher_hidden)} positions, vocab {len(teacher_head_weight)}) differ; use the same "
            "positions and slice both heads to the shared vocabulary rows"
        )


def fused_logit_distillation(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_head_weight: Tensor,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    mask: Tensor | None = None,
    chunk_size: int = 1024,
    num_items: int | float | Tensor | None = None,
    student_head_bias: Tensor | None = None,
    teacher_head_bias: Tensor | None = None,
    **params,
) -> Tensor:
    """:func:`chunked_logit_loss` of z_S = h_S W_Sᵀ + b_S and z_T = h_T W_Tᵀ + b_T without ever forming them.

    Shapes: h_S (N, H_S), W_S (V, H_S), h_T (N, H_T), W_T (V, H_T), b (V,) -> scalar. Equal to
    ``masked_mean(ℓ(h_S @ W_S.T + b_S, h_T @ W_T.T + b_T, temperature=T, **params), mask, num_items)``.
    The logit matmuls run in the input dtype (as the model's lm_head would); the loss in float32.

    Gradients go to ``student_hidden``, ``student_head_weight`` and ``student_head_bias`` (the ones that
    require grad); the teacher side gets none. Per chunk the logit gradient g is contracted at once:
    ∂/∂h_S[chunk] = g W_S and ∂/∂W_S += gᵀ h_S[chunk], ∂/∂b_S += Σ_rows g.

    Memory: no ``(N, V)`` tensor exists. Peak extra, independent of N: as chunked_logit_loss's chunk (the
    chunk's logits are overwritten in place), plus what is saved for backward: the gradients of the
    student hidden states ``(N, H_S)`` and head ``(V, H_S)``, and a float32 ``(V, H_S)`` accumulator when
    the head is not float32. Backward scales them in place, so it runs once per forward. Compute is that
    of the plain path (two logit matmuls plus two gradient matmuls); fully masked chunks are skipped.
    """
    _check_chunk_size(chunk_size)
    loss_fn = _loss_fn(loss)
    student = (student_hidden, student_head_weight, student_head_bias)
    teacher = (teacher_hidden, teacher_head_weight, teacher_head_bias)
    _check_heads(student, teacher)
    empty = student_hidden.new_zeros(0, len(student_head_weight))
    _validate(loss_fn, empty, empty, temperature, params)
    flat_mask = _flat_mask(mask, len(student_hidden), student_hidden.device)
    grad_on = torch.is_grad_enabled()
    needs = tuple(
        grad_on and tensor is not None and tensor.requires_grad
        for tensor in (student_hidden, student_head_weight, student_head_bias)
    )
    teacher = (t if t is None else t.detach() for t in teacher)  # the frozen side gets no gradient
    return _FusedLogitDistillation.apply(
        student_hidden,
        student_head_weight,
        student_head_bias,
        *teacher,
        flat_mask,
        _scale(flat_mask, num_items, student_hidden.dtype),
        loss_fn,
        temperature,
        params,
        chunk_size,
        needs,
    )
