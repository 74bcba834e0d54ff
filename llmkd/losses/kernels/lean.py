"""Closed-form per-chunk kernels of the most used logit losses (value and d value / d student logits).

They hold at most 4 (jsd) or 3 (the KLs) (chunk, V) float tensors instead of the 6-11 of autograd through the
plain loss, and make fewer passes over them. They follow llmkd.losses.response exactly (the same -inf floor,
fully -inf rows give 0); tests/test_chunked.py checks values and gradients against the plain path. Losses
without an entry in LEAN go through autograd per chunk (llmkd.losses.kernels.chunked).
"""

from __future__ import annotations

import functools
import math

import torch

from llmkd.losses.response import forward_kl, jsd, reverse_kl, soft_ce

Tensor = torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs (the dtype rule of llmkd.losses)."""
    return torch.promote_types(torch.float32, dtype)


def _log_probs(logits: Tensor, temperature: float, owned: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """llmkd.losses._log_softmax of a chunk: (floored log p (rows, V), its -inf entries or None, -inf rows).

    ``owned``: the logits are a temporary of the caller (the fused path's matmul) and may be overwritten.
    """
    compute = compute_dtype(logits.dtype)
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


LEAN = {
    forward_kl: _lean_forward_kl,
    soft_ce: functools.partial(_lean_forward_kl, cross_entropy=True),
    reverse_kl: _lean_reverse_kl,
    jsd: _lean_jsd,
}
