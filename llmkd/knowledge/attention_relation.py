"""Attention-relation knowledge: MiniLM / MiniLMv2 query-query, key-key and value-value relations of mapped layers.

Wang et al. 2020 (MiniLM, arXiv 2002.10957) and 2021 (MiniLMv2, arXiv 2012.15828). transformers models do not
return queries, keys or values, so forward hooks on each mapped layer's attention projections keep their outputs
(`ProjectionCapture`): BERT-family `attention.self.query/key/value`, DistilBERT `attention.q_lin/k_lin/v_lin`,
Llama-like `self_attn.q_proj/k_proj/v_proj`; any other model is refused naming its class. A capture keeps only
what the model's own forward produced (armed by a pre-hook on the whole model, so activation checkpointing's
re-run of a layer in the backward pass is not kept) and is emptied when read, so nothing outlives the step.

Term keys: `relations` (default [query, key, value]), `relation_heads` (R; default: the teacher's attention
heads), `layer_map` ([student_layer, teacher_layer] attention-layer pairs, default "last": MiniLMv2 distils one
upper layer). Values are per real query token (count "tokens"). The teacher must be a live model (its forward is
hooked); the knowledge needs "attention_relations", so the trainer runs the teacher at every step.
"""

from __future__ import annotations

import re
import weakref

import torch
from torch import nn

from llmkd.knowledge.base import LayerKnowledge, Pair, Term, TermValues
from llmkd.knowledge.counts import tokens
from llmkd.losses.attention_relation import RELATIONS, relation_names
from llmkd.modeling import base_model, num_layers, text_config

Tensor = torch.Tensor

# Family -> the module names (after ".<layer index>.") of its query, key and value projections.
PROJECTIONS = {
    "BERT-like": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "DistilBERT": ("attention.q_lin", "attention.k_lin", "attention.v_lin"),
    "Llama-like": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
}


def find_projections(model: nn.Module, role: str) -> dict[int, dict[str, nn.Module]]:
    """layer index -> {"query"|"key"|"value": module} for every attention layer; ValueError if not found."""
    root = base_model(model)
    modules = dict(root.named_modules())
    for names in PROJECTIONS.values():
        found: dict[int, dict[str, nn.Module]] = {}
        for path, module in modules.items():
            for relation, suffix in zip(RELATIONS, names):
                match = re.fullmatch(rf"(?:.*\.)?(\d+)\.{re.escape(suffix)}", path)
                if match:
                    found.setdefault(int(match.group(1)), {})[relation] = module
        complete = sorted(i for i, kinds in found.items() if len(kinds) == len(RELATIONS))
        if complete and complete == list(range(num_layers(root))):
            return found
    families = "; ".join(f"{family}: {', '.join(names)}" for family, names in PROJECTIONS.items())
    raise ValueError(
        f"attention_relation terms capture each layer's query/key/value projections, but the {role} "
        f"({type(root).__name__}) has none llmkd knows ({families}; one per layer); distil its hidden states "
        "or attention maps instead"
    )


class ProjectionCapture:
    """Forward hooks keeping one model's projection outputs {(layer, relation): (B, T, D)} of its latest forward."""

    def __init__(self, model: nn.Module, wanted: dict[tuple[int, str], nn.Module], role: str):
        self.role, self.outputs, self.armed = role, {}, False
        ref = weakref.ref(self)  # the hooks must not keep the capture (and its tensors) alive

        def start(module, args):
            capture = ref()
            if capture is not None:
                capture.outputs, capture.armed = {}, True

        def stop(module, args, output):
            capture = ref()
            if capture is not None:
                capture.armed = False

        def keep(key):
            def hook(module, args, output):
                capture = ref()
                if capture is not None and capture.armed:
                    capture.outputs[key] = output

            return hook

        root = base_model(model)
        handles = [root.register_forward_pre_hook(start), root.register_forward_hook(stop)]
        handles += [module.register_forward_hook(keep(key)) for key, module in wanted.items()]
        weakref.finalize(self, _remove, handles)

    def take(self, keys) -> dict:
        """The captured outputs of `keys`, which are then dropped (a RuntimeError if the forward missed one)."""
        outputs, self.outputs = self.outputs, {}
        missing = [k for k in keys if k not in outputs]
        if missing:
            raise RuntimeError(
                f"the {self.role}'s forward did not run its hooked attention projections {missing} for this "
                "batch; attention_relation terms read them from the forward of the very model given to the trainer"
            )
        return {k: outputs[k] for k in keys}


def _remove(handles) -> None:
    for handle in handles:
        handle.remove()


def _checkpointing_reentrant(args) -> bool:
    on = getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False)
    kwargs = (
        getattr(args, "activation_checkpointing_kwargs", None)
        or getattr(args, "gradient_checkpointing_kwargs", None)
        or {}
    )
    return bool(on and isinstance(kwargs, dict) and kwargs.get("use_reentrant"))


class AttentionRelationKnowledge(LayerKnowledge):
    kind = "attention_relation"
    needs = frozenset({"attention_relations"})
    count = "tokens"
    default_layer_map = "last"
    layer_kind = "attention"

    def __init__(self, term: Term, pair: Pair, index: int = 0):
        super().__init__(term, pair, index)
        teacher = getattr(pair.source.member(term.teacher), "model", None)
        if teacher is None:
            raise ValueError(
                f"{term.name}: attention_relation terms hook the teacher's attention projections during its "
                f"forward, but the teacher source {type(pair.source.member(term.teacher)).__name__} has no model "
                "(a logit cache); use a live teacher (a model) for this term"
            )
        if _checkpointing_reentrant(pair.args):
            raise ValueError(
                f"gradient checkpointing with use_reentrant=True runs the student's layers without a gradient in "
                f"the forward pass, so {term.name} would train nothing; use use_reentrant: false (transformers' "
                "default) or drop the term"
            )
        self.relations = relation_names(term.params.get("relations", RELATIONS))
        heads = term.params.get("relation_heads", text_config(teacher).num_attention_heads)
        self.params = {**term.params, "relation_heads": heads}
        found = {
            "student": find_projections(pair.student, "student"),
            "teacher": find_projections(teacher, "teacher"),
        }
        self._check_widths(found, heads)
        self.keys = {
            role: [(layer, r) for layer in sorted({p[side] for p in self.pairs}) for r in self.relations]
            for side, role in enumerate(("student", "teacher"))
        }
        self.captures = {
            role: ProjectionCapture(
                model, {(layer, r): found[role][layer][r] for layer, r in self.keys[role]}, role
            )
            for role, model in (("student", pair.student), ("teacher", teacher))
        }

    def _check_widths(self, found, heads) -> None:
        """Every compared projection's width must split into `relation_heads` heads: said before training."""
        for side, role in enumerate(("student", "teacher")):
            for layer in {p[side] for p in self.pairs}:
                for relation in self.relations:
                    width = getattr(found[role][layer][relation], "out_features", None)
                    if isinstance(heads, int) and width is not None and width % heads:
                        raise ValueError(
                            f"{self.term.name}: relation_heads={heads} does not divide the {role}'s {relation} "
                            f"width {width} (layer {layer}); choose relation_heads dividing every compared "
                            "width (student and teacher)"
                        )

    @classmethod
    def probe(cls):
        # 8! = 40320 columns: divisible by 1-10, 12, 16, 24, 32, 48, 64, 128, so the parse-time dry run judges
        # the parameters' values, not this probe's width (the models' widths are checked when the term is built).
        student = {r: torch.randn(1, 2, 40320) for r in RELATIONS}
        return student, {r: torch.randn(1, 2, 40320) for r in RELATIONS}

    def values(self, student_out, teacher_out, batch, adapted) -> TermValues:
        student = self.captures["student"].take(self.keys["student"])
        teacher = self.captures["teacher"].take(self.keys["teacher"])
        mask = tokens(batch, self.task)
        parts = [
            self.loss(
                {r: student[(s, r)] for r in self.relations},
                {r: teacher[(t, r)] for r in self.relations},
                key_mask=mask,
                **self.params,
            )
            for s, t in self.pairs
        ]
        return TermValues(sum(parts) / len(parts), mask, "tokens", self.layer_values(parts, mask, "tokens"))
