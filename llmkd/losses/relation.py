"""Relation losses on pooled example vectors (N, D): one number per batch, since they mix its examples.

Each reduction below is the one of the authors' released code, stated in the docstring with the repository and
file it was checked against (tests/test_losses_reference.py re-implements that code line by line in float64).
The student and teacher widths may differ. A relation loss is per batch by nature: the trainer weights the one
number by the batch's share of the accumulation window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkd.losses.common import EPS, upcast

Tensor = torch.Tensor

# passalis/probabilistic_kt nn/pkt.py cosine_similarity_loss(eps=0.0000001): kept so values match theirs.
PKT_EPS = 1e-7


def _relation_pair(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    if student.dim() != 2 or teacher.dim() != 2 or len(student) != len(teacher) or len(student) < 2:
        raise ValueError(
            f"relation losses need (N, D_s) and (N, D_t) with the same N >= 2, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}; pool each example to one vector and use a batch of at least 2"
        )
    return upcast(student, teacher)


def _pair_distances(x: Tensor) -> Tensor:
    """(N, N) Euclidean distances, diagonal 0, divided by the mean over the N(N − 1) pairs i ≠ j."""
    off_diagonal = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    squared = (x.unsqueeze(0) - x.unsqueeze(1)).pow(2).sum(-1)
    # The clamp is the authors' pdist(eps=1e-12); it also keeps sqrt's derivative finite for duplicate rows.
    distances = torch.where(off_diagonal, squared.clamp_min(EPS).sqrt(), 0.0)
    # Their mean over d > 0 is the mean over i ≠ j: the clamp makes every off-diagonal distance >= 1e-6.
    return distances / (distances.sum() / off_diagonal.sum())


def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD distance loss: mean over all N² ordered pairs (i, j) of Huber_δ=1(ψ_S(i, j) − ψ_T(i, j)).

    ψ(i, j) = ‖x_i − x_j‖ / μ with μ = mean over the N(N − 1) pairs i ≠ j of ‖x_i − x_j‖, and ψ(i, i) = 0.
    Huber_δ=1(d) = d²/2 if |d| < 1 else |d| − 1/2. (N, D_s) and (N, D_t) -> scalar.

    Reduction: Σ_{i,j} Huber / N² — the diagonal pairs (0 on both sides) count in the divisor, as in the
    authors' code (lenscloth/RKD metric/loss.py RkdDistance: pdist with the diagonal set to 0 and squared
    distances clamped at 1e-12, normalised by mean(d[d > 0]), then F.smooth_l1_loss over the N×N matrix).
    Equal to it in value (ours takes differences instead of the ‖a‖² + ‖b‖² − 2ab expansion, which is more
    accurate). The mean over pairs i ≠ j alone would be N/(N − 1) × this. Their teacher term is under no_grad;
    here the teacher gets a gradient only if it requires one. Park, Kim, Lu & Cho 2019, "Relational Knowledge
    Distillation", arXiv 1904.05068.
    """
    student, teacher = _relation_pair(student, teacher)
    return F.smooth_l1_loss(_pair_distances(student), _pair_distances(teacher), beta=1.0)


def _angles(x: Tensor) -> Tensor:
    """(N, N, N) tensor whose [j, i, k] is cos∠(x_i − x_j, x_k − x_j); 0 when i = j or k = j."""
    unit = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=-1, eps=EPS)  # unit[j, i] ∝ x_i − x_j
    return unit @ unit.transpose(1, 2)


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD angle loss: mean over all N³ triplets (i, j, k) of Huber_δ=1(cos_S(i, j, k) − cos_T(i, j, k)).

    cos(i, j, k) = ⟨e_ij, e_kj⟩ with e_ij = (x_i − x_j) / max(‖x_i − x_j‖, 1e-12): the angle at x_j.
    Degenerate triplets (i = j or k = j) are 0 on both sides and count in the divisor. (N, D_s) and (N, D_t)
    -> scalar.

    Reduction: Σ_{i,j,k} Huber / N³, exactly the authors' code (lenscloth/RKD metric/loss.py RKdAngle:
    F.normalize of the N×N×D differences, bmm, F.smooth_l1_loss over the N³ cosines). Memory is O(N²·D + N³):
    meant for one batch. Park et al. 2019, "Relational Knowledge Distillation", arXiv 1904.05068.
    """
    student, teacher = _relation_pair(student, teacher)
    return F.smooth_l1_loss(_angles(student), _angles(teacher), beta=1.0)


def similarity_preserving(student: Tensor, teacher: Tensor) -> Tensor:
    """Similarity-preserving loss ‖G_T − G_S‖²_F / N², G = row-L2-normalised F·Fᵀ; (N, D_s), (N, D_t) -> ().

    Reduction: the sum over the N×N entries divided by N², exactly the code verified by the authors
    (HobbitLong/RepDistiller distiller_zoo/SP.py: F.normalize(G) along rows, (G_diff²).sum() / bsz²) for one
    layer pair. Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation", arXiv 1907.09682.
    """
    gram_s, gram_t = (F.normalize(x @ x.T, dim=1, eps=EPS) for x in _relation_pair(student, teacher))
    return (gram_t - gram_s).pow(2).sum() / len(gram_s) ** 2


def _pkt_conditionals(x: Tensor) -> Tensor:
    """Rows of K = (cos + 1) / 2 normalised to sum to 1: P(j | i), with the authors' eps in the cosine."""
    # vector_norm, not sqrt(Σ x²): same value, but a finite gradient for a zero vector.
    unit = x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + PKT_EPS)
    kernel = (unit @ unit.T + 1) / 2
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt(student: Tensor, teacher: Tensor) -> Tensor:
    """Probabilistic knowledge transfer: mean over the N×N entries of P_T · log((P_T + ε) / (P_S + ε)).

    P(j | i) = K_ij / Σ_j K_ij with K = (cos + 1) / 2 of the vectors x / (‖x‖ + ε), ε = 1e-7; the diagonal
    (i = j) counts. (N, D_s) and (N, D_t) -> scalar.

    Reduction: Σ_{i,j} / N² (not Σ / N, the per-row KL): exactly the authors' code, ε included
    (passalis/probabilistic_kt nn/pkt.py cosine_similarity_loss). ε keeps every term finite, so a student
    probability of 0 costs P_T·log((P_T + ε) / ε), not infinity. Passalis & Tefas 2018, "Learning Deep
    Representations with Probabilistic Knowledge Transfer", arXiv 1803.10837.
    """
    p_s, p_t = (_pkt_conditionals(x) for x in _relation_pair(student, teacher))
    return (p_t * ((p_t + PKT_EPS) / (p_s + PKT_EPS)).log()).mean()


RELATION_LOSSES = {
    "rkd_distance": rkd_distance,
    "rkd_angle": rkd_angle,
    "sp": similarity_preserving,
    "similarity_preserving": similarity_preserving,
    "pkt": pkt,
}
