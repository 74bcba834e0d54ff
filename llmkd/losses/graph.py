"""Graph and flow losses: the instance relationship graph (IRG) and the flow of solution procedure (FSP).

IRG (Liu et al. 2019) compares, per batch, the graph whose vertices are the examples' pooled features and whose
edges are their pairwise distances, at several layers, plus how each example's vertex moves from one layer to the
next (IRG-t): one number per batch, since it mixes the batch's examples. FSP (Yim et al. 2017) compares, per
example, the Gram matrix between two layers' features: one value per example. Inputs are upcast to float32
(float64 stays float64).
"""

from __future__ import annotations

import math

import torch

from llmkd.losses.common import EPS, upcast

Tensor = torch.Tensor


def _weight(value, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def irg_edges(vertices: Tensor) -> Tensor:
    """(N, D) -> (N, N): squared Euclidean distances ‖v_i − v_j‖² divided by their maximum (diagonal 0).

    The maximum is clamped at 1e-12, so a batch of identical (or single) examples gives zeros, not NaN."""
    squared = (vertices.unsqueeze(0) - vertices.unsqueeze(1)).pow(2).sum(-1)
    return squared / squared.max().clamp_min(EPS)


def irg_transformation(first: Tensor, second: Tensor) -> Tensor:
    """(N, D), (N, D) -> (N,): each example's squared move ‖v_i^a − v_i^b‖² between two layers, over the max."""
    moves = (first - second).pow(2).sum(-1)
    return moves / moves.max().clamp_min(EPS)


def _irg_inputs(student, teacher, student_vertex, weights) -> tuple[Tensor, Tensor, Tensor]:
    """Checked and upcast (student, teacher, student vertex); ValueError naming what does not fit."""
    if student.dim() != 3 or teacher.dim() != 3 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"irg needs (layers, examples, width) features with the same layers and examples on both sides, got "
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    if student_vertex is None:
        student, teacher = upcast(student, teacher)
        vertex = student[-1]
    else:
        student, teacher, vertex = upcast(student, teacher, student_vertex)
    if weights[0] > 0 and vertex.shape != teacher[-1].shape:
        raise ValueError(
            f"the irg vertex term compares the top layer's features, but the student's are "
            f"{tuple(vertex.shape)} and the teacher's {tuple(teacher[-1].shape)}; project the student to the "
            "teacher's width (student_vertex) or set lambda_vertex: 0"
        )
    if weights[2] > 0 and len(student) < 2:
        raise ValueError(
            "the irg transformation term (IRG-t) compares consecutive mapped layers, but only one layer pair was "
            "given; map at least two layer pairs or set lambda_transform: 0"
        )
    return student, teacher, vertex


def irg(
    student: Tensor,
    teacher: Tensor,
    student_vertex: Tensor | None = None,
    *,
    lambda_vertex: float = 1.0,
    lambda_edge: float = 1.0,
    lambda_transform: float = 1.0,
) -> Tensor:
    """Instance relationship graph loss, vertices + edges + transformation; (L, N, D_s), (L, N, D_t) -> ().

    student[l], teacher[l]: the N examples' pooled features at the l-th mapped layer pair (layers in order).
    With Ê_l = irg_edges(·[l]) and Λ_l = irg_transformation(·[l], ·[l+1]):

        L = λ_V · mean_{i,d} (v^S_i − v^T_i)²                       vertices, at the top pair (l = L − 1)
          + λ_E · (1/L) Σ_l mean_{i,j} (Ê^S_l − Ê^T_l)²            edges, every pair
          + λ_T · (1/(L−1)) Σ_l mean_i (Λ^S_l − Λ^T_l)²            IRG-t, consecutive pairs

    The vertex term needs one width: pass `student_vertex` (N, D_t), the student's top features projected to the
    teacher's width (a learnt projector), when D_s ≠ D_t. Edges and transformations are width-free. Λ is the
    paper's vertex transformation (how far each example moves between two layers, normalised over the batch);
    its edge transformation (how the edge matrix changes between the layers) is left out: the edge term already
    matches the edge matrices at both layers, which matches their change. Distances are squared and normalised
    by their maximum, and each part is a mean squared error, as in the public PyTorch ports of the authors'
    Caffe code (yufanLIU/IRG; AberHu/Knowledge-Distillation-Zoo kd_losses/irg.py, which averages the edge terms
    over its layers as here). One number per batch: the trainer spreads it over the batch's examples.

    Raises ValueError for shapes that do not fit, a negative or non-finite λ, λ_T > 0 with fewer than two
    layers, or λ_V > 0 with different widths and no `student_vertex`. Liu, Cao, Li, Yuan, Hu, Li & Duan 2019,
    "Knowledge Distillation via Instance Relationship Graph", CVPR 2019 (no arXiv version).
    """
    weights = (
        _weight(lambda_vertex, "lambda_vertex"),
        _weight(lambda_edge, "lambda_edge"),
        _weight(lambda_transform, "lambda_transform"),
    )
    student, teacher, vertex = _irg_inputs(student, teacher, student_vertex, weights)
    loss = student.new_zeros(())
    if weights[0] > 0:
        loss = loss + weights[0] * (vertex - teacher[-1]).pow(2).mean()
    edges = [(irg_edges(s) - irg_edges(t)).pow(2).mean() for s, t in zip(student, teacher)]
    loss = loss + weights[1] * torch.stack(edges).mean()
    if weights[2] > 0:
        moves = [
            (irg_transformation(student[k], student[k + 1]) - irg_transformation(teacher[k], teacher[k + 1]))
            .pow(2)
            .mean()
            for k in range(len(student) - 1)
        ]
        loss = loss + weights[2] * torch.stack(moves).mean()
    return loss


def flow_matrix(first: Tensor, second: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """FSP matrix G = F₁ᵀ F₂ / n per example over its real tokens; (B, T, H₁), (B, T, H₂) -> (B, H₁, H₂).

    F₁, F₂: one example's features at two layers, one row per real token (attention_mask (B, T), true = real;
    None: every position is real), n: its real tokens. Padded positions reach neither the sum nor n, whatever
    they hold, so a padded batch gives each example the matrix it has alone. Yim et al. 2017 average over the
    h × w positions of a feature map; here the positions are tokens.
    """
    first, second = upcast(first, second)
    if first.dim() != 3 or second.dim() != 3 or first.shape[:2] != second.shape[:2]:
        raise ValueError(
            f"flow_matrix needs (batch, tokens, width) features of the same batch and tokens, got "
            f"{tuple(first.shape)} and {tuple(second.shape)}"
        )
    if attention_mask is None:
        return first.transpose(1, 2) @ second / first.shape[1]
    if tuple(attention_mask.shape) != tuple(first.shape[:2]):
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} does not fit features {tuple(first.shape)}; pass the "
            "(batch, tokens) mask, true for real tokens"
        )
    real = (attention_mask.to(first.device) != 0).unsqueeze(-1)
    first, second = torch.where(real, first, 0.0), torch.where(real, second, 0.0)
    count = real.sum(1, keepdim=True).to(first.dtype).clamp_min(1)  # (B, 1, 1)
    return first.transpose(1, 2) @ second / count


def fsp(student_flow: Tensor, teacher_flow: Tensor) -> Tensor:
    """FSP loss Σ_{i,j} (G^S_ij − G^T_ij)² per example; (B, H₁, H₂) and (B, H₁, H₂) FSP matrices -> (B,).

    G from `flow_matrix`. The paper's L = (1/N) Σ_x Σ_pairs λ ‖G^T(x) − G^S(x)‖²₂ with equal λ: the squared L2
    norm summed over the H₁·H₂ entries (not their mean, which the AberHu/Knowledge-Distillation-Zoo port takes:
    that is this divided by H₁·H₂), averaged over examples by the trainer (count kind "examples") and over the
    layer pairs by the knowledge. Raises ValueError if the matrices' shapes differ (project the student's
    features to the teacher's width first). Yim, Joo, Bae & Kim 2017, "A Gift from Knowledge Distillation: Fast
    Optimization, Network Minimization and Transfer Learning", CVPR 2017 (no arXiv version).
    """
    if student_flow.shape != teacher_flow.shape or student_flow.dim() != 3:
        raise ValueError(
            f"fsp compares (batch, H1, H2) matrices of one shape, got student {tuple(student_flow.shape)} and "
            f"teacher {tuple(teacher_flow.shape)}; project the student's features to the teacher's width"
        )
    g_s, g_t = upcast(student_flow, teacher_flow)
    return (g_s - g_t).pow(2).sum((1, 2))


GRAPH_LOSSES = {"irg": irg}
FLOW_LOSSES = {"fsp": fsp}
