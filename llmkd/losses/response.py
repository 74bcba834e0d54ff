"""Response (logit) losses: per-position divergences between softmax(z_S / T) and softmax(z_T / T).

``-inf`` logits (masked vocabulary entries) have probability 0 and their log-probability is replaced by
the log of the smallest normal number of the compute dtype (-87.3 in float32). Terms with p = 0 then
contribute nothing, and a token the teacher supports but the student masks costs a large but finite
p_T·(log p_T + 87.3) with no gradient into the masked logit. A position whose logits are all ``-inf`` on
either side has no distribution: its loss is 0 and so is its gradient. Every function maps (..., V) -> (...).

Reduction: the sum over V happens here; the trainer averages the per-position values over the supervised
positions of the accumulation window (labels != -100), which is the "batchmean over label tokens" of the
authors' code cited in each docstring (tests/test_losses_reference_response.py re-implements that code in float64).
The T² of Hinton et al. is not applied here: ``LOSSES["logits"][name].soft_target`` tells the trainer to
multiply by it. DistiLLM's code drops vocabulary entries that are ±inf on either side (``inf_mask``); where
only one side is -inf, ours charges the floor above instead: the two agree unless an entry is -inf on one side
only.
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

    Reduction: the sum over V. Times T² (applied by the trainer) and averaged over the selected positions it
    equals DistilBERT's loss_ce (huggingface/transformers examples/research_projects/distillation/
    distiller.py: nn.KLDivLoss(reduction="batchmean") on the masked-selected rows, × T²). DistiLLM's
    forward_kl (jongwooko/distillm distillm/losses.py) returns the cross-entropy −Σ p_T log p_S = this +
    H(p_T): same gradient, a value larger by the teacher entropy (``soft_ce`` is that form). Hinton, Vinyals &
    Dean 2015, "Distilling the Knowledge in a Neural Network", arXiv 1503.02531.
    """
    return _response(lambda log_ps, log_pt: _kl(log_pt, log_ps), student_logits, teacher_logits, temperature)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """KL(p_S ‖ p_T) = Σ_v p_S (log p_S − log p_T); (..., V) -> (...). Mode seeking.

    Reduction: the sum over V; averaged over label tokens by the trainer it equals the token-level reverse_kl
    of jongwooko/distillm distillm/losses.py (−Σ p_S log p_T + Σ p_S log p_S, mean over labels != -100).
    MiniLLM's single-step term (microsoft/LMOps minillm/minillm/losses.py _reg_loss: cross-entropy minus
    student entropy, Σ·mask / Σ mask) is this averaged over response tokens; its main objective is the policy
    gradient of the sequence-level reverse KL, a different estimator. Gu, Dong, Wei & Huang 2024, "MiniLLM:
    Knowledge Distillation of Large Language Models", arXiv 2306.08543.
    """
    return _response(lambda log_ps, log_pt: _kl(log_ps, log_pt), student_logits, teacher_logits, temperature)


def jsd(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, beta: float = 0.5
) -> Tensor:
    """Generalised JSD: β·KL(p_T ‖ m) + (1 − β)·KL(p_S ‖ m), m = β·p_T + (1 − β)·p_S; (..., V) -> (...).

    Bounded by the binary entropy H(β). Reduction: the sum over V; averaged over label tokens it equals TRL's
    GKDTrainer.generalized_jsd_loss(beta=β, reduction="batchmean") (huggingface/trl
    trl/trainer/gkd_trainer.py, the logsumexp mixture: same β convention, β weighting the teacher in m). TRL
    maps β = 0 to forward KL and β = 1 to reverse KL; here those ends are refused and name ``forward_kl`` /
    ``reverse_kl``, which are what TRL computes there. Early TRL (before the logsumexp mixture) mixed
    log-probabilities instead: not this. Agarwal et al. 2024, "On-Policy Distillation of Language Models:
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

    Reduction: the sum over V. The authors' skewed_forward_kl (jongwooko/distillm distillm/losses.py, lam = α,
    same convention) returns the cross-entropy form −Σ p_T log(α·p_T + (1 − α)·p_S), mean over label tokens:
    that is this + H(p_T), the teacher entropy, so the gradient with respect to the student is the same and
    the value is larger by H(p_T) (it does not go to 0 when the student matches). Ko, Kim, Chen & Yun 2024,
    "DistiLLM: Towards Streamlined Distillation for Large Language Models", arXiv 2402.03898.
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

    Reduction: the sum over V; averaged over label tokens it equals the authors' skewed_reverse_kl
    (jongwooko/distillm distillm/losses.py: mixed = (1 − lam)·p_T + lam·p_S, lam = α, and the student entropy
    subtracted, so a true KL). Ko et al. 2024 (DistiLLM), arXiv 2402.03898.
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

    Reduction: the sum over V; averaged over label tokens it equals tv_distance of jongwooko/distillm
    distillm/losses.py. As a distillation loss: Wen, Li, Du & Mou 2023, "f-Divergence Minimization for
    Sequence-Level Knowledge Distillation", arXiv 2307.15190.
    """
    return _response(
        lambda log_ps, log_pt: 0.5 * (log_pt.exp() - log_ps.exp()).abs().sum(-1),
        student_logits,
        teacher_logits,
        temperature,
    )


def soft_ce(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Soft cross-entropy −Σ_v p_T log p_S = KL(p_T ‖ p_S) + H(p_T); (..., V) -> (...).

    Reduction: the sum over V. Same gradient as forward_kl, value offset by H(p_T). It is DistiLLM's
    forward_kl (jongwooko/distillm distillm/losses.py) averaged over label tokens; TinyBERT's prediction-layer
    soft_cross_entropy (huawei-noah/Pretrained-Language-Model TinyBERT/task_distill.py) takes .mean() over
    examples AND classes, i.e. this / V. Hinton, Vinyals & Dean 2015, arXiv 1503.02531.
    """
    return _response(
        lambda log_ps, log_pt: -(log_pt.exp() * log_ps).sum(-1), student_logits, teacher_logits, temperature
    )


def logit_mse(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """mean_v (z_S/T − z_T/T)² over the entries finite on both sides; (..., V) -> (...).

    An entry that is ±inf/NaN on either side is left out of the sum and of the count (a row with no finite
    pair gives 0). Reduction: the mean over V (not the sum). Ba & Caruana's objective (1/2N)·Σ ‖z_S − z_T‖²
    is V/2 × this averaged over examples (no released code); DistilBERT's loss_mse (huggingface/transformers
    examples/research_projects/distillation/distiller.py: MSELoss(reduction="sum") / selected rows, no T) is
    V × this at T = 1. Logit matching: Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?", arXiv
    1312.6184.
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
