"""The loss of a top-k teacher cache: both distributions collapsed onto k + 1 buckets, then any logit loss.

Let S be the teacher's k most likely tokens at a position and B the map that sends each v ∈ S to its own bucket
and every other token to one "rest" bucket. The bucketed distributions are

    p̄(i) = p(v_i) for v_i ∈ S,        p̄(rest) = Σ_{v ∉ S} p(v).

The cache stores log p̄_T (top-k log-probabilities and the log of the remaining mass, at temperature T); the
student's log p̄_S is computed exactly from its logits: log-softmax gathered at S, and for the rest bucket the
logsumexp of the logits with S masked out minus the logsumexp over all — the non-S terms summed directly, never
log(1 − Σ_S p), which cancels when the top-k hold almost all the mass (:class:`_StudentBuckets`, one fused
autograd function costing about a log-softmax; the writer uses the plain masked logsumexp). The loss
is then ``RESPONSE_LOSSES[name](log p̄_S, log p̄_T, temperature=1)``: both (k + 1)-vectors are normalised
log-distributions, so the log-softmax inside every loss is the identity on them (it only renormalises the
rounding of a float16 cache).

Why this is the right target:
- It is *exact* for the bucketed distributions: no teacher mass is dropped or renormalised onto the top-k (the
  biased "top-k renormalised" estimator that Anshumann et al. 2025, "Sparse Logit Sampling: Accelerating
  Knowledge Distillation in LLMs", arXiv 2503.16870, analyse), and it equals the full loss when k = V.
- For every f-divergence (forward and reverse KL, generalised JSD, the skew KLs — divergences to a mixture,
  and bucketing commutes with mixing — and TVD) it is a *lower bound* of the full divergence: B is a
  deterministic channel applied to both distributions, and by the data-processing inequality
  D_f(p̄_T ‖ p̄_S) ≤ D_f(p_T ‖ p_S) (Csiszár 1967; Liese & Vajda 2006, "On Divergences and Informations in
  Statistics and Information Theory", IEEE Trans. Inf. Theory 52(10)), with equality when p_T / p_S is
  constant on the rest bucket. ``soft_ce`` is not a divergence: its bucketed value is KL(p̄_T ‖ p̄_S) + H(p̄_T).
"""

from __future__ import annotations

import torch

from llmkd.losses.response import RESPONSE_LOSSES

Tensor = torch.Tensor

# logit_mse matches raw logits, which a top-k cache of log-probabilities does not keep.
RAW_LOGIT_LOSSES = frozenset({"mse"})


def rest_log_mass(log_probs: Tensor, topk_ids: Tensor) -> Tensor:
    """log Σ_{v ∉ S} p(v) from (..., V) log-probs and the (..., k) ids S; -inf where S covers every token.

    A logsumexp with S masked to -inf: stable when the rest mass is tiny, where log(1 − Σ_S p) cancels.
    """
    masked = log_probs.scatter(-1, topk_ids, float("-inf"))
    empty = torch.isneginf(masked).all(-1, keepdim=True)
    # An all -inf row has a NaN logsumexp gradient: compute it on zeros and select -inf without gradient.
    value = masked.masked_fill(empty, 0.0).logsumexp(-1, keepdim=True)
    return torch.where(empty, float("-inf"), value).squeeze(-1)


class _StudentBuckets(torch.autograd.Function):
    """log p̄_S of (..., V) logits at (..., k) ids, in about as many passes over V as a log-softmax.

    With m the row max and e_v = exp((z_v − m) / T): total = Σ_v e_v, rest = Σ_{v ∉ S} e_v summed directly (the top-k
    entries zeroed first, so no 1 − Σ cancellation). Outputs (z_{s_i} − m) / T − log total and log rest − log total.
    Gradient (times T) at s_i: g_i − G·p_{s_i}; at v ∉ S: e_v·(g_rest / rest − G / total), with G = Σ g.
    Exact while the rest's terms do not underflow float32 (e^-87 below the max), as for any float32 softmax.
    """

    @staticmethod
    def forward(ctx, logits, ids, temperature):
        m = logits.amax(-1, keepdim=True)
        dead = torch.isneginf(m)  # every logit -inf: no distribution
        m = m.masked_fill(dead, 0.0)
        e = logits.sub(m)
        if temperature != 1.0:
            e.div_(temperature)
        e.exp_()
        e_top = e.gather(-1, ids)
        e.scatter_(-1, ids, 0.0)
        rest = e.sum(-1, keepdim=True)
        # A sum of positives, no cancellation; dead rows get 1 so that nothing below divides by 0.
        total = (rest + e_top.sum(-1, keepdim=True)).masked_fill(dead, 1.0)
        log_total = total.log()
        top = (logits.gather(-1, ids) - m) / temperature - log_total
        out = torch.cat([top, rest.log() - log_total], -1).masked_fill(dead, float("-inf"))
        ctx.save_for_backward(e, e_top, total, rest, ids, dead)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad):
        e, e_top, total, rest, ids, dead = ctx.saved_tensors
        g_top, g_rest = grad[..., :-1], grad[..., -1:]
        g_all = grad.sum(-1, keepdim=True)
        inv_rest = torch.where(rest > 0, 1.0 / rest.clamp_min(torch.finfo(rest.dtype).tiny), 0.0)
        scale = 1.0 / ctx.temperature
        # Dead rows: e is 0 there, and their top-k entries are zeroed in the (..., k) values, not in (..., V).
        grad_logits = e.mul((g_rest * inv_rest - g_all / total) * scale)
        at_top = ((g_top - g_all * e_top / total) * scale).masked_fill(dead, 0.0)
        return grad_logits.scatter_(-1, ids, at_top), None, None


def student_buckets(student_logits: Tensor, topk_ids: Tensor, *, temperature: float = 1.0) -> Tensor:
    """log p̄_S: the student's log-softmax(z / T) at the k ids, then the log of its remaining mass.

    (..., V) logits and (..., k) int64 ids -> (..., k + 1) float32 (float64 for float64 logits). A position whose
    logits are all -inf gives an all -inf row, which every logit loss treats as "no distribution" (loss 0).
    """
    z = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
    return _StudentBuckets.apply(
        z, topk_ids, temperature
    )  # any leading dims: no copy of a sliced (B, T-1, V)


def teacher_buckets(
    topk_logprobs: Tensor, rest_logmass: Tensor, dtype: torch.dtype = torch.float32
) -> Tensor:
    """log p̄_T from the cache: (..., k) and (...) -> (..., k + 1) in `dtype`."""
    return torch.cat([topk_logprobs.to(dtype), rest_logmass.to(dtype).unsqueeze(-1)], -1)


def bucketed_logit_loss(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    rest_logmass: Tensor,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    **params,
) -> Tensor:
    """D(p̄_T, p̄_S) of the (k + 1)-bucket distributions; (..., V), (..., k), (..., k), (...) -> (...).

    ``topk_logprobs`` and ``rest_logmass`` are the teacher's log-softmax(z_T / T) values as cached (any float
    dtype); ``temperature`` must be the one the cache was built with. No T² factor (the trainer applies it).
    See the module docstring for why the value is exact for the buckets and a lower bound of the full loss.
    """
    if loss in RAW_LOGIT_LOSSES or loss not in RESPONSE_LOSSES:
        usable = sorted(set(RESPONSE_LOSSES) - RAW_LOGIT_LOSSES)
        raise ValueError(
            f"logit loss {loss!r} cannot be computed from a top-k cache of log-probabilities; use one of {usable}"
        )
    s = student_buckets(student_logits, topk_ids.long(), temperature=temperature)
    t = teacher_buckets(topk_logprobs, rest_logmass, s.dtype)
    return RESPONSE_LOSSES[loss](s, t, temperature=1.0, **params)
