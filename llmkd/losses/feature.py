"""Feature losses: hidden states (FitNets, TinyBERT, DistilBERT) and attention maps (TinyBERT, MiniLM)."""

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
    return 1 - (F.normalize(hs, dim=-1, eps=EPS) * F.normalize(ht, dim=-1, eps=EPS)).sum(-1)


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
    return prob_kl_terms(a_t, a_s).sum(-1).mean(1)


def attention_mse(student_attention: Tensor, teacher_attention: Tensor) -> Tensor:
    """mean over heads and keys of (a_S − a_T)²; (B, heads, T, T) -> (B, T).

    TinyBERT (Jiao et al. 2020, arXiv 1909.10351), here on the post-softmax maps that transformers returns.
    """
    a_s, a_t = _attention_pair(student_attention, teacher_attention)
    return (a_s - a_t).pow(2).mean(-1).mean(1)


HIDDEN_LOSSES = {"mse": hidden_mse, "cosine": hidden_cosine}
ATTENTION_LOSSES = {"kl": attention_kl, "mse": attention_mse}
