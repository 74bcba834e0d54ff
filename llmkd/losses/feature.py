"""Feature losses: hidden states (FitNets, TinyBERT, DistilBERT) and attention maps (TinyBERT, MiniLM).

Each returns one value per token, (B, T); the trainer averages them over the real tokens (the attention mask)
of the accumulation window. The docstrings state how that relates to the authors' reductions, which often
average over padded positions too (tests/test_losses_reference.py checks each relation in float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkd.losses.common import EPS, prob_kl_terms, upcast

Tensor = torch.Tensor


def _same_shape(student: Tensor, teacher: Tensor, what: str) -> tuple[Tensor, Tensor]:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {what} {tuple(student.shape)} and teacher {what} {tuple(teacher.shape)} differ; "
            "select matching layers and project the student to the teacher width first"
        )
    return upcast(student, teacher)


def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor) -> Tensor:
    """mean_H (h_S − h_T)²; (B, T, H) and (B, T, H) -> (B, T).

    Reduction: the mean over the H features here; the trainer then averages over real tokens, giving
    Σ_{real t} Σ_h (h_S − h_T)² / (n_real · H). TinyBERT's code (huawei-noah/Pretrained-Language-Model
    TinyBERT/task_distill.py, rep_loss = MSELoss()(student_rep, teacher_rep)) averages over all B·T·H entries,
    padded positions included: equal to ours when there is no padding. Romero et al. 2015, "FitNets: Hints for
    Thin Deep Nets", arXiv 1412.6550; Jiao et al. 2020, "TinyBERT: Distilling BERT for Natural Language
    Understanding", arXiv 1909.10351.
    """
    hs, ht = _same_shape(student_hidden, teacher_hidden, "hidden states")
    return (hs - ht).pow(2).mean(-1)


def hidden_cosine(student_hidden: Tensor, teacher_hidden: Tensor) -> Tensor:
    """1 − cos(h_S, h_T) along H, a zero vector having cosine 0; (B, T, H) and (B, T, H) -> (B, T).

    cos = ⟨h_S, h_T⟩ / (max(‖h_S‖, 1e-12) · max(‖h_T‖, 1e-12)). Reduction: none over T here; the trainer
    averages over real tokens, which is DistilBERT's (huggingface/transformers examples/research_projects/
    distillation/distiller.py: masked_select by the attention mask, nn.CosineEmbeddingLoss(reduction="mean")
    with target 1). Torch's cosine there divides by sqrt((‖h_S‖² + 1e-12)(‖h_T‖² + 1e-12)): the values agree
    to a relative 1e-12 / ‖h‖². Sanh, Debut, Chaumond & Wolf 2019, "DistilBERT, a distilled version of BERT",
    arXiv 1910.01108.
    """
    hs, ht = _same_shape(student_hidden, teacher_hidden, "hidden states")
    return 1 - (F.normalize(hs, dim=-1, eps=EPS) * F.normalize(ht, dim=-1, eps=EPS)).sum(-1)


def _attention_pair(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    if student.dim() == teacher.dim() == 4 and student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"student has {student.shape[1]} attention heads and teacher {teacher.shape[1]}; attention "
            "distillation compares head by head, so pick a student config with the same number of heads"
        )
    return _same_shape(student, teacher, "attention maps")


def _real_keys(key_mask: Tensor | None, maps: Tensor) -> Tensor | None:
    """key_mask (B, T_k), true = a real key, as bool (B, 1, 1, T_k): broadcasts over heads and queries."""
    if key_mask is None:
        return None
    if maps.dim() != 4 or tuple(key_mask.shape) != (maps.shape[0], maps.shape[-1]):
        raise ValueError(
            f"key_mask of shape {tuple(key_mask.shape)} does not fit attention maps of shape "
            f"{tuple(maps.shape)}; pass the (batch, keys) attention mask, true for real tokens"
        )
    return (key_mask.to(maps.device) != 0)[:, None, None, :]


def attention_kl(
    student_attention: Tensor, teacher_attention: Tensor, *, key_mask: Tensor | None = None
) -> Tensor:
    """(1/heads)·Σ_h Σ_{real keys} a_T (log a_T − log a_S); (B, heads, T_q, T_k) probabilities -> (B, T_q).

    ``key_mask`` (B, T_k), true = a real key, leaves the other keys out of the sum, whatever either map holds
    there; without it every key counts. Zero teacher entries contribute 0; a zero student entry under teacher
    mass counts as the smallest normal number (large, finite). The value with and without ``key_mask`` is the
    same when the teacher puts no mass on padded keys, as transformers' masked softmax does.

    Reduction: the sum over keys, the mean over heads; the trainer averages over real query tokens. For one
    sequence that is MiniLM's L_AT = 1/(A_h·|x|) Σ_a Σ_t KL(A^T_{a,t} ‖ A^S_{a,t}), |x| its real tokens; over
    a batch every real token weighs the same (the paper defines L_AT per sequence). The authors released
    checkpoints, not training code (microsoft/unilm minilm/ holds none), so this follows the paper.
    Wang et al. 2020, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained
    Transformers", arXiv 2002.10957.
    """
    a_s, a_t = _attention_pair(student_attention, teacher_attention)
    keep = _real_keys(key_mask, a_s)
    if keep is not None:
        # Masked keys become p_T = 0, p_S = 1: a term of exactly 0 with no gradient, even over NaN.
        a_t, a_s = torch.where(keep, a_t, 0.0), torch.where(keep, a_s, 1.0)
    return prob_kl_terms(a_t, a_s).sum(-1).mean(1)


def attention_mse(
    student_attention: Tensor, teacher_attention: Tensor, *, key_mask: Tensor | None = None
) -> Tensor:
    """Σ_h Σ_{real keys} (a_S − a_T)² / (heads · n_real_keys); (B, heads, T_q, T_k) -> (B, T_q).

    ``key_mask`` (B, T_k), true = a real key: n_real_keys is its count per example (a row with none gives 0).
    Without it every key is real (the mean over heads and all T_k keys), and a short example padded into a
    long batch would be scaled by n_real_keys / T_k.

    Reduction: the mean over heads and real keys; the trainer averages over real query tokens, so the term is
    the mean over real (query, key) pairs and heads. TinyBERT's code (huawei-noah/Pretrained-Language-Model
    TinyBERT/task_distill.py) applies MSELoss() to attention SCORES (pre-softmax, values <= -1e2 — the masked
    keys — set to 0) and averages over all B·heads·T·T entries, padded queries and keys included. Here the
    maps are the post-softmax probabilities that transformers returns, so the values differ; given the same
    maps and no padding, the reductions agree. Jiao et al. 2020, "TinyBERT", arXiv 1909.10351.
    """
    a_s, a_t = _attention_pair(student_attention, teacher_attention)
    keep = _real_keys(key_mask, a_s)
    if keep is None:
        return (a_s - a_t).pow(2).mean(-1).mean(1)
    # torch.where before squaring: padded keys may hold anything (even NaN) and must reach no gradient.
    squared = torch.where(keep, a_s - a_t, 0.0).pow(2)
    return squared.sum(-1).mean(1) / keep.sum(-1)[:, 0].clamp_min(1)


HIDDEN_LOSSES = {"mse": hidden_mse, "cosine": hidden_cosine}
ATTENTION_LOSSES = {"kl": attention_kl, "mse": attention_mse}
