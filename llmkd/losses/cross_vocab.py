"""Cross-vocabulary logit loss: Universal Logit Distillation (ULD) on sorted probability vectors.

Boizard, El Haddad, Hudelot & Colombo 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit
Distillation Loss for LLMs", arXiv 2402.12030. ULD needs neither a shared vocabulary nor a token map: it compares
the *sorted* probability vectors of positions that the caller has aligned (llmkd.knowledge.cross_vocab).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor


# the loss ----------------------------------------------------
def _probs(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """softmax(logits / T) in float32 (float64 kept), and the (...) mask of fully ``-inf`` rows."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(dtype)
    dead = torch.isneginf(logits).all(-1)
    # A fully masked row would give NaN; any finite row does, its loss is zeroed afterwards.
    probs = (logits.masked_fill(dead.unsqueeze(-1), 0.0) / temperature).softmax(-1)
    return probs, dead


def uld_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """ULD = Σ_i |p_S^↓(i) − p_T^↓(i)|, (..., V_S), (..., V_T) -> (...); the vocabularies may differ.

    p = softmax(z / T); p^↓ is p sorted in decreasing order, the shorter one zero-padded to max(V_S, V_T).
    Boizard, El Haddad, Hudelot & Colombo 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit
    Distillation Loss for LLMs", arXiv 2402.12030: their closed form of the Wasserstein-1 distance between the
    two next-token distributions under uniform transport cost, the supports matched by rank. Equivalently, the
    L1 distance between p_S and p_T minimised over every one-to-one relabelling of the tokens (sorting both
    attains that minimum), so it is invariant to permuting either vocabulary and needs no token map. In [0, 2].
    Its gradient scales as 1/T, like TVD's, so the trainer applies no T² factor. Computed in float32 (float64
    kept); ``-inf`` logits have probability 0; a position whose logits are all ``-inf`` on either side gives 0.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; ULD uses 1.0 (the plain softmax)")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must have the same positions (all dimensions but the last); align them first"
        )
    p_s, dead_s = _probs(student_logits, temperature)
    p_t, dead_t = _probs(teacher_logits, temperature)
    dtype = torch.promote_types(p_s.dtype, p_t.dtype)
    p_s = p_s.to(dtype).sort(-1, descending=True).values
    p_t = p_t.to(dtype).sort(-1, descending=True).values
    k = min(p_s.shape[-1], p_t.shape[-1])
    # Zero-padding the shorter side adds |p - 0| = p for the longer side's tail; summed without the padding.
    value = (p_s[..., :k] - p_t[..., :k]).abs().sum(-1) + p_s[..., k:].sum(-1) + p_t[..., k:].sum(-1)
    return value.masked_fill(dead_s | dead_t, 0.0)


def uld_loss_chunked(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, chunk_size: int = 1024
) -> Tensor:
    """`uld_loss` on (N, V_S), (N, V_T), ``chunk_size`` positions at a time; same values and gradients.

    Each chunk runs under activation checkpointing: its softmax, sorted copies and int64 sort indices (on both
    sides, a dozen or so float32-sized (chunk_size, V) tensors; not measured) are freed after the forward and
    recomputed one chunk at a time in backward, instead of being kept for all N positions at once.
    """
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")

    def chunk(s: Tensor, t: Tensor) -> Tensor:
        return uld_loss(s, t, temperature=temperature)

    grad = torch.is_grad_enabled() and student_logits.requires_grad
    pieces = [
        checkpoint(chunk, s, t, use_reentrant=False) if grad else chunk(s, t)
        for s, t in zip(student_logits.split(chunk_size), teacher_logits.split(chunk_size))
    ]
    if not pieces:  # no aligned position in this batch
        return uld_loss(student_logits, teacher_logits, temperature=temperature)
    return torch.cat(pieces)
