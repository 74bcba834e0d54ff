"""Pooled feature knowledge: each example's mean representation, aligned through a learnt projector.

For pairs whose inputs do not share positions (a spoken sentence and its transcript, an image and its caption,
two tokenisations of one text), hidden states cannot be compared token by token; one vector per example can. Each
side's mapped layer is mean-pooled over its own real positions — the student's frames from its attention mask
(`llmkd.modeling.position_mask`: speech front ends shorten the input), the teacher's tokens from its own
``teacher_attention_mask`` when it reads its own stream — which for a sentence-transformers encoder such as
all-MiniLM-L6-v2 is its sentence embedding. A linear projector W (student width -> teacher width, always learnt:
the two spaces are unrelated even at equal widths) maps the student's states first; since mean pooling is linear,
W(mean h) = mean(W h). Loss per example: ``mse`` = mean_H (W h̄_S − h̄_T)² or ``cosine`` = 1 − cos(W h̄_S, h̄_T),
count kind "examples".

``aligned`` (same losses, per student frame, then the mean over the frames) compares the teacher's token states
stretched linearly over the student's real frames (`align_positions`): a dense target for inputs that unfold in
the same order, such as speech and its transcript, whose speaking rate is roughly even.

Gupta, Hoffman & Malik 2016, "Cross Modal Distillation for Supervision Transfer", arXiv 1507.00448 (matching a
paired teacher's mid-level representation); the projector is FitNets' regressor (Romero et al. 2015, arXiv
1412.6550).
"""

from __future__ import annotations

import torch
from torch import nn

from llmkd.knowledge.adapters import linear_projector
from llmkd.knowledge.base import LayerKnowledge, Pair, Sides, Term, TermValues
from llmkd.modeling import hidden_width

Tensor = torch.Tensor


def mean_pool(states: Tensor, mask: Tensor) -> Tensor:
    """(B, T, H) states and (B, T) bool mask -> (B, H): the mean over each row's real positions (float32)."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    return (states.float() * weights).sum(1) / weights.sum(1).clamp(min=1)


class PooledKnowledge(LayerKnowledge):
    kind = "pooled"
    needs = frozenset({"hidden_states"})
    count = "examples"
    default_layer_map = "last"

    def __init__(self, term: Term, pair: Pair, index: int = 0):
        super().__init__(term, pair, index)
        self.sides = Sides(pair, term)
        teacher_config = pair.source.member(term.teacher).config.get_text_config()
        self.widths = (hidden_width(pair.student), int(teacher_config.hidden_size))

    @classmethod
    def probe(cls):
        return torch.randn(3, 4), torch.randn(3, 4)

    def adapter(self) -> nn.Module:
        return linear_projector(*self.widths)

    def adapt(self, adapter, student_out):
        """The projected student states of the mapped layers, computed inside the student's forward."""
        return {s: adapter(student_out.hidden_states[s]) for s in {s for s, _ in self.pairs}}

    def values(self, student_out, teacher_out, batch, adapted) -> TermValues:
        parts = []
        for s, t in self.pairs:
            s_states, t_states = adapted[s], teacher_out.hidden_states[t]
            parts.append(self.compare(s_states, t_states, *self.sides.masks(batch, s_states, t_states)))
        return TermValues(
            sum(parts) / len(parts), None, "examples", self.layer_values(parts, None, "examples")
        )

    def compare(self, s_states: Tensor, t_states: Tensor, s_mask: Tensor, t_mask: Tensor) -> Tensor:
        """(B,) loss between the two sides' pooled states of one layer pair."""
        return self.loss(mean_pool(s_states, s_mask), mean_pool(t_states, t_mask), **self.term.params)


def align_positions(teacher: Tensor, t_lengths: Tensor, s_lengths: Tensor, width: int) -> Tensor:
    """(B, T_t, H) right-padded teacher states -> (B, width, H): each example's real tokens stretched linearly
    over its `s_lengths[b]` real student positions (position j reads the teacher at relative place (j + ½)/n_s,
    interpolated between its two nearest tokens); positions past a row's length repeat its last token."""
    B, _, H = teacher.shape
    j = torch.arange(width, device=teacher.device, dtype=torch.float32).expand(B, width)
    n_s, n_t = s_lengths.clamp(min=1).float()[:, None], t_lengths.clamp(min=1).float()[:, None]
    place = ((j + 0.5) / n_s * n_t - 0.5).clamp(min=0).minimum(n_t - 1)
    low = place.floor().long()
    high = (low + 1).minimum(n_t.long() - 1)
    weight = (place - low).unsqueeze(-1)
    states = teacher.float()
    gather = lambda index: states.gather(1, index.unsqueeze(-1).expand(B, width, H))  # noqa: E731
    return gather(low) * (1 - weight) + gather(high) * weight


class AlignedKnowledge(PooledKnowledge):
    """Teacher token states stretched over the student's frames (`align_positions`), compared frame by frame
    through the learnt projector: a dense, monotonic alignment for inputs that unfold in the same order (speech
    and its transcript). Per example: the mean over its real frames (count kind "examples")."""

    kind = "aligned"

    def compare(self, s_states: Tensor, t_states: Tensor, s_mask: Tensor, t_mask: Tensor) -> Tensor:
        target = align_positions(t_states, t_mask.sum(1), s_mask.sum(1), s_states.shape[1])
        per_frame = self.loss(s_states.float(), target, **self.term.params) * s_mask
        return per_frame.sum(1) / s_mask.sum(1).clamp(min=1)
