"""Self-attention relation losses (MiniLM's value relation, MiniLMv2's query/key/value relations).

A relation of one projection X (the queries, keys or values of a layer, all heads concatenated, (B, T, D)) is
split into R relation heads X_r (B, T, D/R) and turned into R_r = softmax(X_r X_rᵀ / √(D/R)) over the real keys:
a (T × T) distribution per query token that does not depend on the width, so a student and a teacher with
different widths and head counts compare head r with head r whenever R divides both widths. Inputs are upcast to
float32 (float64 stays float64).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

Tensor = torch.Tensor

RELATIONS = ("query", "key", "value")


def relation_names(relations) -> tuple[str, ...]:
    """The relation types as a tuple (a single name is accepted); ValueError for unknown or repeated ones."""
    names = (relations,) if isinstance(relations, str) else relations
    ok = isinstance(names, Sequence) and len(names) > 0 and all(n in RELATIONS for n in names)
    if not ok or len(set(names)) != len(names):
        raise ValueError(
            f"relations must be a non-empty list of distinct names from {list(RELATIONS)}, got {relations!r}"
        )
    return tuple(names)


def _check_heads(relation_heads) -> int:
    if isinstance(relation_heads, bool) or not isinstance(relation_heads, int) or relation_heads < 1:
        raise ValueError(f"relation_heads must be a positive integer, got {relation_heads!r}")
    return relation_heads


def relation_log_probs(states: Tensor, relation_heads: int, key_mask: Tensor | None = None) -> Tensor:
    """log softmax(X_r X_rᵀ / √d_r) over the real keys; (B, T, D) -> (B, R, T_query, T_key).

    d_r = D / R. key_mask (B, T), true = a real token: other keys get probability exactly 0 (their score is the
    dtype's lowest number, not -inf, so a row without real keys stays finite). Raises ValueError if R does not
    divide D or the mask does not fit.
    """
    if states.dim() != 3:
        raise ValueError(f"relation states must be (batch, tokens, width), got {tuple(states.shape)}")
    batch, length, width = states.shape
    if width % relation_heads:
        raise ValueError(
            f"relation_heads={relation_heads} does not divide the projection width {width}; choose a number of "
            "relation heads that divides every compared width (student and teacher, queries, keys and values)"
        )
    size = width // relation_heads
    heads = states.view(batch, length, relation_heads, size).transpose(1, 2)  # (B, R, T, d_r)
    scores = heads @ heads.transpose(-1, -2) / size**0.5
    if key_mask is not None:
        if tuple(key_mask.shape) != (batch, length):
            raise ValueError(
                f"key_mask {tuple(key_mask.shape)} does not fit states {tuple(states.shape)}; pass the (batch, "
                "tokens) attention mask, true for real tokens"
            )
        real = (key_mask.to(scores.device) != 0)[:, None, None, :]
        scores = torch.where(real, scores, torch.finfo(scores.dtype).min)
    return scores.log_softmax(-1)


def relation_kl(
    student: Tensor, teacher: Tensor, relation_heads: int, key_mask: Tensor | None = None
) -> Tensor:
    """(1/R) Σ_r KL(R^T_r ‖ R^S_r) of each query row over its real keys; (B, T, D_s), (B, T, D_t) -> (B, T)."""
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"student states {tuple(student.shape)} and teacher states {tuple(teacher.shape)} must cover the "
            "same batch and tokens"
        )
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    log_s = relation_log_probs(student.to(dtype), relation_heads, key_mask)
    log_t = relation_log_probs(teacher.to(dtype), relation_heads, key_mask)
    terms = log_t.exp() * (log_t - log_s)
    if key_mask is not None:  # padded keys: p_T = 0 exactly; where() keeps them out of values and gradients
        terms = torch.where((key_mask.to(terms.device) != 0)[:, None, None, :], terms, 0.0)
    return terms.sum(-1).mean(1)


def self_attention_relations(
    student: Mapping[str, Tensor],
    teacher: Mapping[str, Tensor],
    *,
    relations: Sequence[str] = RELATIONS,
    relation_heads: int = 1,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Mean over relation types and heads of KL(R_T ‖ R_S) per query token; {name: (B, T, D)} -> (B, T).

    student / teacher map "query", "key", "value" to one layer's projection outputs (all heads concatenated;
    keys and values of grouped-query attention are narrower than queries, which is fine). For each name in
    `relations` and each relation head r of `relation_heads` (R):

        R_r = softmax(X_r X_rᵀ / √d_r) over the real keys,  d_r = D / R (each side its own D),
        value(b, t) = (1 / (|relations| · R)) Σ_relations Σ_r Σ_{real keys k} R^T_r[t, k] log(R^T_r[t, k] / R^S_r[t, k]).

    key_mask (B, T), true = a real token, removes padded keys from the softmax and from the sum (padded query
    rows get values too: the trainer counts only real query tokens). For one sequence, the trainer's mean over
    its |x| real tokens gives MiniLMv2's L_ij = 1/(A_r |x|) Σ_a Σ_t KL(R^T_ij,a,t ‖ R^S_ij,a,t) averaged over
    the relation types; the paper sums them (α = 1 each: `weight: 3` with Q-Q, K-K, V-V gives its loss). With
    relations [value] and R = the attention heads it is MiniLM's value-relation loss L_VR (D/R = d_k). The
    authors released checkpoints, not training code, so this follows the papers.

    Raises ValueError for an unknown or repeated relation name, relation_heads < 1 or not dividing a width, a
    missing projection, or batch and tokens that differ. Wang, Wei, Dong, Bao, Yang & Zhou 2020, "MiniLM: Deep
    Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained Transformers", arXiv 2002.10957;
    Wang, Bao, Huang, Dong & Wei 2021, "MiniLMv2: Multi-Head Self-Attention Relation Distillation for Compressing
    Pretrained Transformers", arXiv 2012.15828.
    """
    names, heads = relation_names(relations), _check_heads(relation_heads)
    missing = [n for n in names if n not in student or n not in teacher]
    if missing:
        raise ValueError(
            f"no {missing} states given (student has {sorted(student)}, teacher {sorted(teacher)}); capture "
            "the attention projections of the relations compared"
        )
    per = [relation_kl(student[n], teacher[n], heads, key_mask) for n in names]
    return torch.stack(per).mean(0)


ATTENTION_RELATION_LOSSES = {"kl": self_attention_relations}
