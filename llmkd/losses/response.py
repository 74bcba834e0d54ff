"""Response (logit) losses: per-position divergences between softmax(z_S / T) and softmax(z_T / T).

``-inf`` logits (masked vocabulary entries) have probability 0 and their log-probability is replaced by
the log of the smallest normal number of the compute dtype (-87.3 in float32). Terms with p = 0 then
contribute nothing, and a token the teacher supports but the student masks costs a large but finite
p_T·(log p_T + 87.3) with no gradient into the masked logit. A position whose logits are all ``-inf`` on
either side has no distribution: its loss is 0 and so is its gradient. Every function maps (..., V) -> (...).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from llmkd.losses.common import upcast

Tensor = torch.Tensor


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(
            f"temperature must be > 0, got {temperature}; use 1.0 for the plain softmax or a larger value "
            "(e.g. 2.0) to soften both distributions"
        )


def _log_softmax(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Finite log-probs of softmax(logits / T), (..., V), and the (...) mask of fully ``-inf`` rows."""
    dead = torch.isneginf(logits).all(-1)
    # A fully masked row would give -inf - (-inf) = NaN; any finite row does, its loss is zeroed later.
    log_p = (logits.masked_fill(dead.unsqueeze(-1), 0.0) / temperature).log_softmax(-1)
    # torch.where, not clamp: clamping would also cut the gradient of legitimately tiny log-probs.
    floor = math.log(torch.finfo(log_p.dtype).tiny)
    return torch.where(torch.isneginf(log_p), floor, log_p), dead


def _response(
    kernel: Callable[[Tensor, Tensor], Tensor],
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
) -> Tensor:
    """``kernel(log_p_student, log_p_teacher)`` reducing V, with fully masked positions set to 0."""
    _check_temperature(temperature)
    student_logits, teacher_logits = upcast(student_logits, teacher_logits)
    log_ps, dead_s = _log_softmax(student_logits, temperature)
    log_pt, dead_t = _log_softmax(teacher_logits, temperature)
    return kernel(log_ps, log_pt).masked_fill(dead_s | dead_t, 0.0)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) over the last dim from finite log-probs (so p = 0 gives 0·finite = 0, never 0·inf)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight: float) -> Tensor:
    """log(w·a + (1 − w)·b), exact at w ∈ {0, 1} where log(w) or log(1 − w) would be -inf."""
    if weight == 0:
        return log_b
    if weight == 1:
        return log_a
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


def _check_alpha(alpha: float) -> None:
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}; alpha=0 is the plain KL, DistiLLM uses 0.1")


# response (logit) losses -------------------------------------
def forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """KL(p_T ‖ p_S) = Σ_v p_T (log p_T − log p_S), p = softmax(z / T); (..., V) -> (...). Mode covering.

    Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network", arXiv 1503.02531.
    """
    return _response(lambda log_ps, log_pt: _kl(log_pt, log_ps), student_logits, teacher_logits, temperature)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """KL(p_S ‖ p_T) = Σ_v p_S (log p_S − log p_T); (..., V) -> (...). Mode seeking.

    As used by MiniLLM: Gu, Dong, Wei & Huang 2024, "MiniLLM: Knowledge Distillation of Large Language
    Models", arXiv 2306.08543.
    """
    return _response(lambda log_ps, log_pt: _kl(log_ps, log_pt), student_logits, teacher_logits, temperature)


def jsd(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, beta: float = 0.5
) -> Tensor:
    """Generalised JSD: β·KL(p_T ‖ m) + (1 − β)·KL(p_S ‖ m), m = β·p_T + (1 − β)·p_S; (..., V) -> (...).

    Bounded by the binary entropy H(β). Agarwal et al. 2024, "On-Policy Distillation of Language Models:
    Learning from Self-Generated Mistakes" (GKD), arXiv 2306.13649.
    """
    if not 0 < beta < 1:
        raise ValueError(
            f"jsd needs 0 < beta < 1, got beta={beta}; the divergence vanishes at the ends: use forward_kl "
            "(the beta -> 0 limit, up to a factor beta) or reverse_kl (the beta -> 1 limit) instead"
        )

    def kernel(log_ps: Tensor, log_pt: Tensor) -> Tensor:
        log_m = _log_mix(log_pt, log_ps, beta)
        return beta * _kl(log_pt, log_m) + (1 - beta) * _kl(log_ps, log_m)

    return _response(kernel, student_logits, teacher_logits, temperature)


def skew_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, alpha: float = 0.1
) -> Tensor:
    """Skew KL: KL(p_T ‖ α·p_T + (1 − α)·p_S); α = 0 is forward KL; (..., V) -> (...).

    Ko, Kim, Chen & Yun 2024, "DistiLLM: Towards Streamlined Distillation for Large Language Models",
    arXiv 2402.03898.
    """
    _check_alpha(alpha)
    return _response(
        lambda log_ps, log_pt: _kl(log_pt, _log_mix(log_pt, log_ps, alpha)),
        student_logits,
        teacher_logits,
        temperature,
    )


def skew_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, alpha: float = 0.1
) -> Tensor:
    """Skew reverse KL: KL(p_S ‖ α·p_S + (1 − α)·p_T); α = 0 is reverse KL; (..., V) -> (...).

    Ko et al. 2024 (DistiLLM), arXiv 2402.03898.
    """
    _check_alpha(alpha)
    return _response(
        lambda log_ps, log_pt: _kl(log_ps, _log_mix(log_ps, log_pt, alpha)),
        student_logits,
        teacher_logits,
        temperature,
    )


def tvd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Total variation distance ½·Σ_v |p_T − p_S|, in [0, 1]; (..., V) -> (...).

    As a distillation loss: Wen, Li, Du & Mou 2023, "f-Divergence Minimization for Sequence-Level
    Knowledge Distillation", arXiv 2307.15190.
    """
    return _response(
        lambda log_ps, log_pt: 0.5 * (log_pt.exp() - log_ps.exp()).abs().sum(-1),
        student_logits,
        teacher_logits,
        temperature,
    )


def soft_ce(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Soft cross-entropy −Σ_v p_T log p_S = KL(p_T ‖ p_S) + H(p_T); (..., V) -> (...).

    Hinton, Vinyals & Dean 2015, arXiv 1503.02531 (same gradient as forward_kl, offset by H(p_T)).
    """
    return _response(
        lambda log_ps, log_pt: -(log_pt.exp() * log_ps).sum(-1), student_logits, teacher_logits, temperature
    )


def logit_mse(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """mean_v (z_S/T − z_T/T)² over the entries finite on both sides; (..., V) -> (...).

    An entry that is ±inf/NaN on either side is left out of the sum and of the count (a row with no finite
    pair gives 0). Logit matching: Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?", arXiv 1312.6184.
    """
    _check_temperature(temperature)
    zs, zt = upcast(student_logits, teacher_logits)
    both = torch.isfinite(zs) & torch.isfinite(zt)
    # torch.where, not a product with the mask: inf - inf and 0·inf would be NaN in value or gradient.
    squared = torch.where(both, (zs - zt) / temperature, 0.0).pow(2)
    return squared.sum(-1) / both.sum(-1).clamp_min(1)


# name -> loss; llmkd.losses.LOSSES["logits"] is this dict.
RESPONSE_LOSSES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
    "soft_ce": soft_ce,
    "mse": logit_mse,
}
