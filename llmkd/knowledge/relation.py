"""Relation knowledge: how the examples of a batch relate to each other (RKD, SP, PKT) on pooled vectors.

Park et al. 2019 (RKD, arXiv 1904.05068); Tung & Mori 2019 (SP, arXiv 1907.09682); Passalis & Tefas 2018
(PKT, arXiv 1803.10837). Each example is pooled to one vector: its first token for text encoders ([CLS]), the
mean of its real positions for decoders, classifiers included, and for audio and image encoders (each side over
its own mask: a teacher reading its own inputs, a speech student's frames) (a causal model's first token has seen nothing else; which
one a model is, is measured by `llmkd.modeling.is_causal`). A relation loss is one
number per batch by nature: it is spread over the batch's examples (count kind "examples"), so a batch weighs
by its share of the window's examples.
"""

from __future__ import annotations

import torch

from llmkd.knowledge.base import LayerKnowledge, Pair, Sides, Term, TermValues
from llmkd.knowledge.counts import main_tensor
from llmkd.modeling import CAUSAL_LM, forward_keys, is_causal

Tensor = torch.Tensor


def pool(hidden: Tensor, attention_mask: Tensor | None, causal: bool) -> Tensor:
    """(B, T, H) -> (B, H): first token for encoders, mean of valid positions for decoders (right padding)."""
    if not causal:
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


class RelationKnowledge(LayerKnowledge):
    kind = "relation"
    needs = frozenset({"hidden_states"})
    count = "examples"
    default_layer_map = "last"

    def __init__(self, term: Term, pair: Pair, index: int = 0):
        super().__init__(term, pair, index)
        # Pooling follows each model's attention, not the task: a decoder classifier's first token saw nothing.
        teacher = getattr(pair.source.member(term.teacher), "model", None)
        self.sides = Sides(pair, term)
        # Audio and image encoders have no [CLS] token: their example is the mean of their real positions.
        self.causal = (
            is_causal(pair.student) or "input_ids" not in forward_keys(pair.student),
            (is_causal(teacher) or "input_ids" not in forward_keys(teacher))
            if teacher is not None
            else pair.task == CAUSAL_LM,
        )

    @classmethod
    def probe(cls):
        return torch.randn(3, 2), torch.randn(3, 4)

    def values(self, student_out, teacher_out, batch, adapted) -> TermValues:
        s_states, t_states = student_out.hidden_states, teacher_out.hidden_states
        causal_s, causal_t = self.causal
        pooled = []
        for s, t in self.pairs:
            s_mask, t_mask = self.sides.masks(batch, s_states[s], t_states[t])
            pooled.append((pool(s_states[s], s_mask, causal_s), pool(t_states[t], t_mask, causal_t)))
        n = main_tensor(batch).shape[0]
        parts = [self.loss(s, t, **self.term.params).expand(n) for s, t in pooled]
        side = self.layer_values(parts, None, "examples")
        return TermValues(sum(parts) / len(parts), None, "examples", side)
