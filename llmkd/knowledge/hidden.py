"""Feature knowledge: hidden states of mapped layers (FitNets hints, TinyBERT, DistilBERT's cosine).

Romero et al. 2015, "FitNets: Hints for Thin Deep Nets", arXiv 1412.6550; Jiao et al. 2020, "TinyBERT",
arXiv 1909.10351. When the widths differ, one learnt linear projector per term maps the student's states to the
teacher's width (TinyBERT's W_h, shared by the term's layers); it is an auxiliary module, trained with the student.
Values are per real token, averaged over the term's layer pairs; padded positions never count.
"""

from __future__ import annotations

import torch
from torch import nn

from llmkd.knowledge.adapters import linear_projector
from llmkd.knowledge.base import LayerKnowledge, Pair, Term, TermValues
from llmkd.knowledge.counts import tokens
from llmkd.modeling import hidden_width


class HiddenKnowledge(LayerKnowledge):
    kind = "hidden"
    needs = frozenset({"hidden_states"})
    count = "tokens"
    default_layer_map = "uniform"

    def __init__(self, term: Term, pair: Pair, index: int = 0):
        super().__init__(term, pair, index)
        self.widths = (
            hidden_width(pair.student),
            int(pair.source.member(term.teacher).config.get_text_config().hidden_size),
        )

    @classmethod
    def probe(cls):
        return torch.randn(1, 2, 4), torch.randn(1, 2, 4)

    def adapter(self) -> nn.Module | None:
        width_s, width_t = self.widths
        return linear_projector(width_s, width_t) if width_s != width_t else None

    def adapt(self, adapter, student_out):
        """The projected student states of the mapped layers, computed inside the student's forward."""
        return {s: adapter(student_out.hidden_states[s]) for s in {s for s, _ in self.pairs}}

    def values(self, student_out, teacher_out, batch, adapted) -> TermValues:
        s_states = adapted if adapted is not None else student_out.hidden_states
        t_states = teacher_out.hidden_states
        parts = [self.loss(s_states[s], t_states[t], **self.term.params) for s, t in self.pairs]
        mask = tokens(batch, self.task)
        return TermValues(sum(parts) / len(parts), mask, "tokens", self.layer_values(parts, mask, "tokens"))
