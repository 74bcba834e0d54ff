"""Feature knowledge: self-attention maps of mapped layers, head by head (TinyBERT; MiniLM's attention transfer).

Jiao et al. 2020, "TinyBERT", arXiv 1909.10351; Wang et al. 2020, "MiniLM", arXiv 2002.10957. Only the eager
attention implementation returns the maps, so both models are switched to it (with a warning). Values are per
real query token; the losses see the key mask, so padded keys count neither in sums nor in means.
"""

from __future__ import annotations

import inspect
import logging

import torch

from llmkd.knowledge.base import LayerKnowledge, Pair, Term, TermValues
from llmkd.knowledge.counts import tokens
from llmkd.modeling import base_model, text_config

logger = logging.getLogger(__name__)


def ensure_attention_weights(model, role: str) -> None:
    """Attention terms need the probabilities; sdpa/flash kernels return an empty tuple instead."""
    config = base_model(model).config
    current = getattr(config, "_attn_implementation", None)
    if current != "eager":
        logger.warning(
            "attention distillation: switching the %s from attn_implementation=%r to 'eager', the only "
            "implementation that returns attention weights (slower; load it with attn_implementation='eager' "
            "to silence this)",
            role,
            current,
        )
        base_model(model).set_attn_implementation("eager")


class AttentionKnowledge(LayerKnowledge):
    kind = "attention"
    needs = frozenset({"attentions"})
    count = "tokens"
    default_layer_map = "uniform"
    layer_kind = "attention"

    def __init__(self, term: Term, pair: Pair, index: int = 0):
        super().__init__(term, pair, index)
        teacher_config = pair.source.member(term.teacher).config.get_text_config()
        heads_s, heads_t = text_config(pair.student).num_attention_heads, teacher_config.num_attention_heads
        if heads_s != heads_t:
            raise ValueError(
                f"attention terms compare maps head by head, but the student has {heads_s} heads and the teacher "
                f"{heads_t}; use a student with the teacher's head count, or distil hidden states instead"
            )
        self._key_mask = "key_mask" in inspect.signature(self.loss.fn).parameters
        ensure_attention_weights(pair.student, "student")
        teacher = getattr(pair.source.member(term.teacher), "model", None)
        if teacher is not None:
            ensure_attention_weights(teacher, "teacher")

    @classmethod
    def probe(cls):
        return torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), 0.5)

    def values(self, student_out, teacher_out, batch, adapted) -> TermValues:
        mask = tokens(batch, self.task)
        extra = {"key_mask": mask} if self._key_mask else {}
        s_maps, t_maps = student_out.attentions, teacher_out.attentions
        parts = [self.loss(s_maps[s], t_maps[t], **extra, **self.term.params) for s, t in self.pairs]
        return TermValues(sum(parts) / len(parts), mask, "tokens", self.layer_values(parts, mask, "tokens"))
