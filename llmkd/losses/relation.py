"""Relation losses on pooled example vectors (N, D): one number per batch, since they mix its examples."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkd.losses.common import EPS, prob_kl_terms, upcast

Tensor = torch.Tensor


def _relation_pair(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    if student.dim() != 2 or teacher.dim() != 2 or len(student) != len(teacher) or len(student) < 2:
        raise ValueError(
            f"relation losses need (N, D_s) and (N, D_t) with the same N >= 2, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}; pool each example to one vector and use a batch of at least 2"
        )
    return upcast(student, teacher)


def _pair_distances(x: Tensor) -> Tensor:
    """Euclidean distances of the N(N − 1) ordered pairs i ≠ j, divided by their mean."""
    off_diagonal = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    squared = (x.unsqueeze(0) - x.unsqueeze(1)).pow(2).sum(-1)[off_diagonal]
    # sqrt has an infinite derivative at 0, which duplicate examples would hit.
    distances = squared.clamp_min(EPS).sqrt()
    return distances / distances.mean().clamp_min(EPS)


def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """Huber_δ=1(ψ_S(i, j), ψ_T(i, j)) averaged over pairs i ≠ j, ψ = ‖x_i − x_j‖ / mean_{i≠j} ‖x_i − x_j‖.

    (N, D_s) and (N, D_t) -> scalar. Park, Kim, Lu & Cho 2019, "Relational Knowledge Distillation",
    arXiv 1904.05068.
    """
    student, teacher = _relation_pair(student, teacher)
    return F.smooth_l1_loss(_pair_distances(student), _pair_distances(teacher), beta=1.0)


def _angles(x: Tensor) -> Tensor:
    """(N, N, N) tensor whose [j, i, k] is cos∠(x_i − x_j, x_k − x_j); 0 when i = j or k = j."""
    unit = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=-1, eps=EPS)  # unit[j, i] ∝ x_i − x_j
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
    gram_s, gram_t = (F.normalize(x @ x.T, dim=1, eps=EPS) for x in _relation_pair(student, teacher))
    return (gram_t - gram_s).pow(2).sum() / len(gram_s) ** 2


def _pkt_conditionals(x: Tensor) -> Tensor:
    """Rows of K = (cos + 1) / 2 normalised to sum to 1: P(j | i) from the cosine kernel."""
    unit = F.normalize(x, dim=1, eps=EPS)
    kernel = (unit @ unit.T + 1) / 2
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt(student: Tensor, teacher: Tensor) -> Tensor:
    """mean over the N×N entries of P_T · log(P_T / P_S), P from the cosine kernel; -> scalar.

    Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer",
    arXiv 1803.10837.
    """
    p_s, p_t = (_pkt_conditionals(x) for x in _relation_pair(student, teacher))
    return prob_kl_terms(p_t, p_s).mean()


RELATION_LOSSES = {
    "rkd_distance": rkd_distance,
    "rkd_angle": rkd_angle,
    "sp": similarity_preserving,
    "similarity_preserving": similarity_preserving,
    "pkt": pkt,
}
