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

import functools
import math

import torch
import torch.nn.functional as F

from llmkd.losses import forward_kl, get_loss, jsd, masked_mean, reverse_kl, soft_ce

Tensor = torch.Tensor


# shared helpers ----------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs (the dtype rule of llmkd.losses)."""
    return torch.promote_types(torch.float32, dtype)


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
    return masked_mean(torch.ones((), dtype=_compute_dtype(dtype), device=mask.device), num_items=count)


def _validate(loss_fn, student: Tensor, teacher: Tensor, temperature: float, params: dict) -> None:
    # On empty slices: bad temperature / beta / alpha fail even when every chunk is masked and skipped.
    with torch.no_grad():
        loss_fn(student[:0], teacher[:0], temperature=temperature, **params)


def _chunk_grad(loss_fn, logits, mask_chunk, scale, temperature, params, needs_grad, owned=False):
    """(masked sum of the chunk's loss × scale, its float gradient w.r.t. the student chunk or None).

    ``logits()`` gives the (student, teacher) chunk; a callable, so that the only references to the fused
    path's freshly computed chunk logits are the kernel's own and it can drop them early.
    """
    lean = _LEAN.get(loss_fn)
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
        leaf = student_chunk.detach().to(_compute_dtype(student_chunk.dtype)).requires_grad_(needs_grad)
        values = loss_fn(leaf, teacher_chunk, temperature=temperature, **params)
        if not needs_grad:
            return values.detach(), None
        (grad,) = torch.autograd.grad(torch.where(mask_chunk, values, 0.0).sum(), leaf)
    return values.detach(), grad


def _scaled(grad: Tensor | None, grad_output: Tensor) -> Tensor | None:
    # In place: the saved gradient is as large as the input, and a copy would double the peak in backward.
    # A second backward through the same graph then fails autograd's saved-tensor version check.
    return None if grad is None else grad.mul_(grad_output.to(grad.dtype))


# lean per-chunk kernels --------------------------------------
# Closed-form value and d value / d student logits of the most used losses, with in-place ops, so that a chunk
# holds at most 4 (jsd) or 3 (the KLs) (chunk, V) float tensors instead of the 6-11 of autograd through the
# plain loss, and makes fewer passes over them. They follow llmkd.losses exactly (the same -inf floor, fully
# -inf rows give 0); tests/test_chunked.py checks values and gradients against the plain path. The other
# losses go through autograd (_autograd_chunk).
def _log_probs(logits: Tensor, temperature: float, owned: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """llmkd.losses._log_softmax of a chunk: (floored log p (rows, V), its -inf entries or None, -inf rows).

    ``owned``: the logits are a temporary of the caller (the fused path's matmul) and may be overwritten.
    """
    compute = _compute_dtype(logits.dtype)
    dead = logits.amax(-1) == -math.inf
    fresh = owned or logits.dtype != compute  # x below may then be overwritten
    x = logits.to(compute)
    if dead.any():  # a fully -inf row would be NaN; its loss is zeroed later
        x, fresh = x.masked_fill(dead.unsqueeze(-1), 0.0), True
    if temperature != 1:
        x = x.div_(temperature) if fresh else x / temperature
    log_p = x.log_softmax(-1)
    del x
    neg_inf = None
    if torch.isneginf(log_p.amin(-1)).any():  # checked on row minima: no (rows, V) mask when there is none
        neg_inf = torch.isneginf(log_p)
        log_p.masked_fill_(neg_inf, math.log(torch.finfo(compute).tiny))
    return log_p, neg_inf, dead


def _chunk_log_probs(logits, temperature, owned):
    """(log p_S, its -inf entries, log p_T, rows dead on either side) of the chunk that ``logits()`` gives;
    each side's logits are dropped as soon as they are read (the fused path's are temporaries)."""
    zs, zt = logits()
    log_ps, neg_inf_s, dead_s = _log_probs(zs, temperature, owned)
    del zs
    log_pt, _, dead_t = _log_probs(zt, temperature, owned)
    return log_ps, neg_inf_s, log_pt, dead_s | dead_t


def _finish(values, grad_log_ps, p_s, neg_inf_s, dead, factor):
    """(values, factor · d values / d x_S), x_S = z_S / T, from g = d values / d log p_S: g − p_S·Σg.

    As in the plain path, -inf student entries get no gradient (its torch.where) and dead rows give 0.
    """
    if dead.any():
        values = values.masked_fill(dead, 0.0)
    if grad_log_ps is None:
        return values, None
    if neg_inf_s is not None:
        grad_log_ps.masked_fill_(neg_inf_s, 0.0)
        p_s.masked_fill_(neg_inf_s, 0.0)  # the true softmax: exactly 0 there, not exp(floor)
    grad = grad_log_ps.addcmul_(p_s, grad_log_ps.sum(-1, keepdim=True), value=-1.0).mul_(factor)
    return values, grad.masked_fill_(dead.unsqueeze(-1), 0.0) if dead.any() else grad


def _lean_forward_kl(logits, temperature, factor, needs_grad, owned, *, cross_entropy=False):
    """KL(p_T ‖ p_S) = Σ p_T (log p_T − log p_S) (soft CE: −Σ p_T log p_S); d/d log p_S = −p_T."""
    log_ps, neg_inf_s, log_pt, dead = _chunk_log_probs(logits, temperature, owned)
    p_t = log_pt.exp()
    terms = torch.mul(p_t, log_ps, out=log_pt).neg_() if cross_entropy else log_pt.sub_(log_ps).mul_(p_t)
    values = terms.sum(-1)
    del terms, log_pt
    grad = p_t.neg_() if needs_grad else None
    return _finish(values, grad, log_ps.exp_(), neg_inf_s, dead, factor)


def _lean_reverse_kl(logits, temperature, factor, needs_grad, owned):
    """KL(p_S ‖ p_T) = Σ p_S (log p_S − log p_T); d/d log p_S = p_S (log p_S − log p_T + 1)."""
    log_ps, neg_inf_s, log_pt, dead = _chunk_log_probs(logits, temperature, owned)
    p_s = log_ps.exp()
    terms = log_pt.neg_().add_(log_ps).mul_(p_s)
    del log_ps
    values = terms.sum(-1)
    grad = terms.add_(p_s) if needs_grad else None
    return _finish(values, grad, p_s, neg_inf_s, dead, factor)


def _lean_jsd(logits, temperature, factor, needs_grad, owned, *, beta=0.5):
    """β·KL(p_T ‖ m) + (1 − β)·KL(p_S ‖ m); d/d log p_S = (1 − β)·p_S (log p_S − log m): the terms through
    log m cancel because β p_T + (1 − β) p_S = m."""
    log_ps, neg_inf_s, log_pt, dead = _chunk_log_probs(logits, temperature, owned)
    log_m = log_ps + math.log1p(-beta)
    shifted = log_pt + math.log(beta)
    torch.logaddexp(log_m, shifted, out=log_m)  # log m, as llmkd.losses._log_mix
    del shifted
    p = log_pt.exp()
    values = log_pt.sub_(log_m).mul_(p).sum(-1).mul_(beta)
    torch.exp(log_ps, out=p)  # from here on p is p_S
    terms = torch.sub(log_ps, log_m, out=log_pt).mul_(p)
    del log_m, log_ps
    values.add_(terms.sum(-1), alpha=1 - beta)
    grad = terms if needs_grad else None
    return _finish(values, grad, p, neg_inf_s, dead, factor * (1 - beta))


_LEAN = {
    forward_kl: _lean_forward_kl,
    soft_ce: functools.partial(_lean_forward_kl, cross_entropy=True),
    reverse_kl: _lean_reverse_kl,
    jsd: _lean_jsd,
}


# logits in, chunk by chunk -----------------------------------
class _ChunkedLogitLoss(torch.autograd.Function):
    """Value in forward, d value / d student_logits kept for backward; the teacher gets no gradient."""

    @staticmethod
    def forward(ctx, student, teacher, mask, scale, loss_fn, temperature, params, chunk_size, needs_grad):
        total = torch.zeros((), dtype=_compute_dtype(student.dtype), device=student.device)
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
    loss_fn = get_loss("logits", loss)
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
        compute = _compute_dtype(hs.dtype)
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
    loss_fn = get_loss("logits", loss)
    _check_head(student_hidden, student_head_weight, student_head_bias, "student")
    _check_head(teacher_hidden, teacher_head_weight, teacher_head_bias, "teacher")
    if len(student_hidden) != len(teacher_hidden) or len(student_head_weight) != len(teacher_head_weight):
        raise ValueError(
            f"student ({len(student_hidden)} positions, vocab {len(student_head_weight)}) and teacher "
            f"({len(teacher_hidden)} positions, vocab {len(teacher_head_weight)}) differ; use the same "
            "positions and slice both heads to the shared vocabulary rows"
        )
    empty = student_hidden.new_zeros(0, len(student_head_weight))
    _validate(loss_fn, empty, empty, temperature, params)
    flat_mask = _flat_mask(mask, len(student_hidden), student_hidden.device)
    grad_on = torch.is_grad_enabled()
    needs = tuple(
        grad_on and tensor is not None and tensor.requires_grad
        for tensor in (student_hidden, student_head_weight, student_head_bias)
    )
    teacher = (
        t if t is None else t.detach() for t in (teacher_hidden, teacher_head_weight, teacher_head_bias)
    )
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
