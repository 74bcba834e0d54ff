"""Distillation losses as pure tensor functions, grouped by the knowledge they transfer (Gou et al., 2021).

Dtype: inputs are upcast before any maths to float32, or kept in float64 when given float64 (so that
``torch.autograd.gradcheck`` works); the result has that dtype.

``-inf`` logits (masked vocabulary entries) have probability 0 and their log-probability is replaced by
the log of the smallest normal number of the compute dtype (-87.3 in float32). Terms with p = 0 then
contribute nothing, and a token the teacher supports but the student masks costs a large but finite
p_T·(log p_T + 87.3) with no gradient into the masked logit. A position whose logits are all ``-inf`` on
either side has no distribution: its loss is 0 and so is its gradient.

Reduction happens once, in :func:`masked_mean`; every other function returns per-position values
(or a scalar for relation losses, which already mix the examples of a batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# Below sqrt / normalise so that duplicate examples and zero vectors keep finite gradients.
_EPS = 1e-12


# shared helpers ----------------------------------------------
def _upcast(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors in one compute dtype: float32, or float64 if any input is float64."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return tuple(tensor.to(dtype) for tensor in tensors)


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
    student_logits, teacher_logits = _upcast(student_logits, teacher_logits)
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


def _prob_kl_terms(p: Tensor, q: Tensor) -> Tensor:
    """Elementwise p·(log p − log q) for probabilities; both clamped to the smallest normal number."""
    tiny = torch.finfo(p.dtype).tiny
    return p * (p.clamp_min(tiny).log() - q.clamp_min(tiny).log())


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
    zs, zt = _upcast(student_logits, teacher_logits)
    both = torch.isfinite(zs) & torch.isfinite(zt)
    # torch.where, not a product with the mask: inf - inf and 0·inf would be NaN in value or gradient.
    squared = torch.where(both, (zs - zt) / temperature, 0.0).pow(2)
    return squared.sum(-1) / both.sum(-1).clamp_min(1)


# feature losses ----------------------------------------------
def _same_shape(student: Tensor, teacher: Tensor, what: str) -> tuple[Tensor, Tensor]:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {what} {tuple(student.shape)} and teacher {what} {tuple(teacher.shape)} differ; "
            "select matching layers and project the student to the teacher width first"
        )
    return _upcast(student, teacher)


def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor) -> Tensor:
    """mean_H (h_S − h_T)²; (B, T, H) and (B, T, H) -> (B, T).

    Romero et al. 2015, "FitNets: Hints for Thin Deep Nets", arXiv 1412.6550; Jiao et al. 2020,
    "TinyBERT: Distilling BERT for Natural Language Understanding", arXiv 1909.10351.
    """
    hs, ht = _same_shape(student_hidden, teacher_hidden, "hidden states")
    return (hs - ht).pow(2).mean(-1)


def hidden_cosine(student_hidden: Tensor, teacher_hidden: Tensor) -> Tensor:
    """1 − cos(h_S, h_T) along H, a zero vector having cosine 0; (B, T, H) and (B, T, H) -> (B, T).

    Sanh, Debut, Chaumond & Wolf 2019, "DistilBERT, a distilled version of BERT", arXiv 1910.01108.
    """
    hs, ht = _same_shape(student_hidden, teacher_hidden, "hidden states")
    return 1 - (F.normalize(hs, dim=-1, eps=_EPS) * F.normalize(ht, dim=-1, eps=_EPS)).sum(-1)


# attention losses --------------------------------------------
def _attention_pair(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    if student.dim() == teacher.dim() == 4 and student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"student has {student.shape[1]} attention heads and teacher {teacher.shape[1]}; attention "
            "distillation compares head by head, so pick a student config with the same number of heads"
        )
    return _same_shape(student, teacher, "attention maps")


def attention_kl(student_attention: Tensor, teacher_attention: Tensor) -> Tensor:
    """Σ_keys a_T (log a_T − log a_S), mean over heads; (B, heads, T, T) probabilities -> (B, T).

    Zero teacher entries (masked keys) contribute 0; a zero student entry under teacher mass counts as the
    smallest normal number (large, finite). Wang et al. 2020, "MiniLM: Deep Self-Attention Distillation for
    Task-Agnostic Compression of Pre-Trained Transformers", arXiv 2002.10957; TinyBERT, arXiv 1909.10351.
    """
    a_s, a_t = _attention_pair(student_attention, teacher_attention)
    return _prob_kl_terms(a_t, a_s).sum(-1).mean(1)


def attention_mse(student_attention: Tensor, teacher_attention: Tensor) -> Tensor:
    """mean over heads and keys of (a_S − a_T)²; (B, heads, T, T) -> (B, T).

    TinyBERT (Jiao et al. 2020, arXiv 1909.10351), here on the post-softmax maps that transformers returns.
    """
    a_s, a_t = _attention_pair(student_attention, teacher_attention)
    return (a_s - a_t).pow(2).mean(-1).mean(1)


# relation losses ---------------------------------------------
def _relation_pair(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    if student.dim() != 2 or teacher.dim() != 2 or len(student) != len(teacher) or len(student) < 2:
        raise ValueError(
            f"relation losses need (N, D_s) and (N, D_t) with the same N >= 2, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}; pool each example to one vector and use a batch of at least 2"
        )
    return _upcast(student, teacher)


def _pair_distances(x: Tensor) -> Tensor:
    """Euclidean distances of the N(N − 1) ordered pairs i ≠ j, divided by their mean."""
    off_diagonal = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    squared = (x.unsqueeze(0) - x.unsqueeze(1)).pow(2).sum(-1)[off_diagonal]
    # sqrt has an infinite derivative at 0, which duplicate examples would hit.
    distances = squared.clamp_min(_EPS).sqrt()
    return distances / distances.mean().clamp_min(_EPS)


def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """Huber_δ=1(ψ_S(i, j), ψ_T(i, j)) averaged over pairs i ≠ j, ψ = ‖x_i − x_j‖ / mean_{i≠j} ‖x_i − x_j‖.

    (N, D_s) and (N, D_t) -> scalar. Park, Kim, Lu & Cho 2019, "Relational Knowledge Distillation",
    arXiv 1904.05068.
    """
    student, teacher = _relation_pair(student, teacher)
    return F.smooth_l1_loss(_pair_distances(student), _pair_distances(teacher), beta=1.0)


def _angles(x: Tensor) -> Tensor:
    """(N, N, N) tensor whose [j, i, k] is cos∠(x_i − x_j, x_k − x_j); 0 when i = j or k = j."""
    unit = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=-1, eps=_EPS)  # unit[j, i] ∝ x_i − x_j
    return unit @ unit.transpose(1, 2)


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """Huber_δ=1 between student and teacher angle cosines, mean over all N³ triplets (i, j, k).

    The cosine at j between e_ij = unit(x_i − x_j) and e_kj = unit(x_k − x_j). Degenerate triplets (i = j or
    k = j) are 0 on both sides and count in the mean. Memory is O(N²·D + N³): meant for one batch.
    (N, D_s) and (N, D_t) -> scalar. Park et al. 2019, "Relational Knowledge Distillation", arXiv 1904.05068.
    """
    student, teacher = _relation_pair(student, teacher)
    return F.smooth_l1_loss(_angles(student), _angles(teacher), beta=1.0)


def similarity_preserving(student: Tensor, teacher: Tensor) -> Tensor:
    """‖G_T − G_S‖²_F / N², G = row-L2-normalised F·Fᵀ; (N, D_s) and (N, D_t) -> scalar.

    Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation", arXiv 1907.09682.
    """
    gram_s, gram_t = (F.normalize(x @ x.T, dim=1, eps=_EPS) for x in _relation_pair(student, teacher))
    return (gram_t - gram_s).pow(2).sum() / len(gram_s) ** 2


def _pkt_conditionals(x: Tensor) -> Tensor:
    """Rows of K = (cos + 1) / 2 normalised to sum to 1: P(j | i) from the cosine kernel."""
    unit = F.normalize(x, dim=1, eps=_EPS)
    kernel = (unit @ unit.T + 1) / 2
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt(student: Tensor, teacher: Tensor) -> Tensor:
    """mean over the N×N entries of P_T · log(P_T / P_S), P from the cosine kernel; -> scalar.

    Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer",
    arXiv 1803.10837.
    """
    p_s, p_t = (_pkt_conditionals(x) for x in _relation_pair(student, teacher))
    return _prob_kl_terms(p_t, p_s).mean()


# reduction ---------------------------------------------------
def masked_mean(values: Tensor, mask: Tensor | None = None, num_items: int | Tensor | None = None) -> Tensor:
    """Σ values[mask] / num_items (default: the mask count); 0 when there are no items.

    ``mask`` (true = supervised) broadcasts to ``values``. Pass as ``num_items`` the number of supervised
    items of the whole gradient-accumulation window, so 1 batch of 8 and 4 batches of 2 give one update.
    Masked entries may hold NaN/inf: they reach neither the value nor the gradient.
    """
    (values,) = _upcast(values)
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


# registry ----------------------------------------------------
LOSSES: dict[str, dict[str, Callable[..., Tensor]]] = {
    "logits": {
        "forward_kl": forward_kl,
        "kl": forward_kl,
        "reverse_kl": reverse_kl,
        "jsd": jsd,
        "skew_kl": skew_kl,
        "skew_reverse_kl": skew_reverse_kl,
        "tvd": tvd,
        "soft_ce": soft_ce,
        "mse": logit_mse,
    },
    "hidden": {"mse": hidden_mse, "cosine": hidden_cosine},
    "attention": {"kl": attention_kl, "mse": attention_mse},
    "relation": {
        "rkd_distance": rkd_distance,
        "rkd_angle": rkd_angle,
        "sp": similarity_preserving,
        "similarity_preserving": similarity_preserving,
        "pkt": pkt,
    },
}

# Hinton et al. 2015 (§2): soft-target gradients scale as 1/T², so the trainer multiplies these by T². Left out:
# "tvd" (its gradient scales as 1/T: T² would over-weight it) and "mse" (a direct logit match, not a soft target).
SOFT_TARGET_LOSSES: frozenset[str] = frozenset(LOSSES["logits"]) - {"tvd", "mse"}


def get_loss(knowledge: str, name: str) -> Callable[..., Tensor]:
    """The loss function registered as ``LOSSES[knowledge][name]``."""
    if knowledge not in LOSSES:
        raise ValueError(f"unknown knowledge {knowledge!r}; choose one of {', '.join(LOSSES)}")
    if name not in LOSSES[knowledge]:
        raise ValueError(f"unknown {knowledge} loss {name!r}; choose one of {', '.join(LOSSES[knowledge])}")
    return LOSSES[knowledge][name]


def __getattr__(name: str):
    # The memory-bounded variants, re-exported lazily (PEP 562): llmkd.chunked imports this module.
    if name in ("chunked_logit_loss", "fused_logit_distillation"):
        from llmkd import chunked

        return getattr(chunked, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
