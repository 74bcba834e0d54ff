"""Graph knowledge (IRG) and flow knowledge (FSP): how examples relate across layers, how features flow between them.

`graph` (Liu et al. 2019): the instance relationship graph of the batch at each mapped layer pair — vertices are
the examples pooled like `relation` terms ([CLS] for encoders, the mean of the real tokens for decoders), edges
their normalised distances — plus how each vertex moves between consecutive mapped layers (IRG-t). One number per
batch by nature, spread over its examples (count "examples"), like relation terms. When the widths differ and the
vertex term is on, a learnt linear projector maps the student's top mapped layer to the teacher's width (an
auxiliary module, trained with the student).

`flow` (Yim et al. 2017): per example, the FSP matrix G = F₁ᵀ F₂ / n of two layers' features over its n real
tokens, student vs teacher; one value per example (count "examples"), averaged over the mapped pairs. Layer map:
`[[[s1, s2], [t1, t2]], ...]` (hidden-state indices, 0 = embeddings) or "uniform" (each consecutive pair of
TinyBERT's uniform map: the flow through each student block against the flow through the teacher blocks it
replaces). Widths that differ go through one learnt linear projector per term (TinyBERT's W_h), applied to every
mapped student layer.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from llmkd.knowledge import layer_maps
from llmkd.knowledge.adapters import linear_projector
from llmkd.knowledge.base import Knowledge, Pair, Term, TermValues
from llmkd.knowledge.counts import main_tensor
from llmkd.knowledge.relation import RelationKnowledge, pool
from llmkd.losses.graph import flow_matrix
from llmkd.modeling import hidden_width, num_layers

Tensor = torch.Tensor


def _teacher_width(pair: Pair, term: Term) -> int:
    return int(pair.source.member(term.teacher).config.get_text_config().hidden_size)


def _setting(loss, params: dict, name: str):
    """A loss parameter's value for this term: the term's, else the loss function's default."""
    return params.get(name, inspect.signature(loss.fn).parameters[name].default)


class GraphKnowledge(RelationKnowledge):
    kind = "graph"
    needs = frozenset({"hidden_states"})
    count = "examples"
    default_layer_map = "uniform"

    def __init__(self, term: Term, pair: Pair, index: int = 0):
        super().__init__(term, pair, index)
        if _setting(self.loss, term.params, "lambda_transform") > 0 and len(self.pairs) < 2:
            raise ValueError(
                f"{term.name}: the IRG transformation term (lambda_transform) compares consecutive mapped layers, "
                f"but layer_map {term.layer_map!r} maps one pair {self.pairs}; map at least two layer pairs "
                "(e.g. layer_map: uniform) or set lambda_transform: 0"
            )
        batch = getattr(pair.args, "per_device_train_batch_size", 3)
        if _setting(self.loss, term.params, "lambda_edge") > 0 and batch < 3:
            # Edges are divided by the batch's largest distance: with 2 examples both graphs are [[0, 1], [1, 0]].
            raise ValueError(
                f"{term.name}: the IRG edge term compares the distances between the examples of one micro-batch on "
                f"one process, normalised by the largest, so per_device_train_batch_size={batch} (< 3) leaves it "
                "exactly 0; use a per-device batch of at least 3 (accumulate fewer steps) or set lambda_edge: 0"
            )
        self.widths = (hidden_width(pair.student), _teacher_width(pair, term))
        self.project = (
            self.widths[0] != self.widths[1] and _setting(self.loss, term.params, "lambda_vertex") > 0
        )

    @classmethod
    def probe(cls):
        return torch.randn(2, 3, 4), torch.randn(2, 3, 4)

    def adapter(self) -> nn.Module | None:
        return linear_projector(*self.widths) if self.project else None

    def adapt(self, adapter, student_out):
        """The student's top mapped layer at the teacher's width (pooling is linear, so project then pool)."""
        return adapter(student_out.hidden_states[self.pairs[-1][0]])

    def values(self, student_out, teacher_out, batch, adapted) -> TermValues:
        causal_s, causal_t = self.causal
        s_states, t_states = student_out.hidden_states, teacher_out.hidden_states
        masks = [self.sides.masks(batch, s_states[s], t_states[t]) for s, t in self.pairs]
        student = torch.stack([pool(s_states[s], m[0], causal_s) for (s, _), m in zip(self.pairs, masks)])
        teacher = torch.stack([pool(t_states[t], m[1], causal_t) for (_, t), m in zip(self.pairs, masks)])
        vertex = pool(adapted, masks[-1][0], causal_s) if adapted is not None else None
        per = self.loss(student, teacher, vertex, **self.term.params)
        return TermValues(per.expand(main_tensor(batch).shape[0]), None, "examples")


def check_flow_map(layer_map: Any, where: str) -> None:
    """'uniform' or a non-empty list of [[s1, s2], [t1, t2]] integer pairs; else a ValueError naming it."""
    if layer_map == "uniform":
        return
    ok = isinstance(layer_map, (list, tuple)) and len(layer_map) > 0
    ok = ok and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in layer_map)
    ok = ok and all(isinstance(s, (list, tuple)) and len(s) == 2 for p in layer_map for s in p)
    ok = ok and all(
        isinstance(i, int) and not isinstance(i, bool) for p in layer_map for side in p for i in side
    )
    if not ok:
        raise ValueError(
            f"{where}: a flow (FSP) layer_map is 'uniform' or a list of [[student_from, student_to], "
            f"[teacher_from, teacher_to]] hidden-state index pairs (0 = embeddings), e.g. [[[0, 1], [0, 3]]], "
            f"got {layer_map!r}"
        )


def resolve_flow_map(
    layer_map, n_student: int, n_teacher: int
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """((s1, s2), (t1, t2)) pairs: consecutive entries of the uniform map, or the given ones checked in range."""
    if layer_map == "uniform":
        hidden = layer_maps.resolve("uniform", n_student, n_teacher, "hidden")
        return [((s1, s2), (t1, t2)) for (s1, t1), (s2, t2) in zip(hidden, hidden[1:])]
    pairs = [(tuple(s), tuple(t)) for s, t in layer_map]
    for (s1, s2), (t1, t2) in pairs:  # each end is a [student, teacher] index pair: the same range checks
        layer_maps.resolve([[s1, t1], [s2, t2]], n_student, n_teacher, "hidden")
    return pairs


class FlowKnowledge(Knowledge):
    kind = "flow"
    needs = frozenset({"hidden_states"})
    count = "examples"
    default_layer_map = "uniform"

    def __init__(self, term: Term, pair: Pair, index: int = 0):
        super().__init__(term, pair, index)
        n_teacher = int(pair.source.member(term.teacher).config.get_text_config().num_hidden_layers)
        self.pairs = resolve_flow_map(term.layer_map, num_layers(pair.student), n_teacher)
        self.widths = (hidden_width(pair.student), _teacher_width(pair, term))

    @classmethod
    def check_layer_map(cls, layer_map, where: str) -> None:
        check_flow_map(layer_map, where)

    @classmethod
    def probe(cls):
        return torch.randn(1, 3, 3), torch.randn(1, 3, 3)

    def adapter(self) -> nn.Module | None:
        width_s, width_t = self.widths
        return linear_projector(width_s, width_t) if width_s != width_t else None

    def adapt(self, adapter, student_out):
        """The mapped student layers at the teacher's width, computed inside the student's forward."""
        layers = {s for (s1, s2), _ in self.pairs for s in (s1, s2)}
        return {s: adapter(student_out.hidden_states[s]) for s in layers}

    def values(self, student_out, teacher_out, batch, adapted) -> TermValues:
        mask = batch.get("attention_mask")
        s_states = adapted if adapted is not None else student_out.hidden_states
        t_states = teacher_out.hidden_states
        per = sum(
            self.loss(
                flow_matrix(s_states[s1], s_states[s2], mask), flow_matrix(t_states[t1], t_states[t2], mask)
            )
            for (s1, s2), (t1, t2) in self.pairs
        )
        return TermValues(per / len(self.pairs), None, "examples")
