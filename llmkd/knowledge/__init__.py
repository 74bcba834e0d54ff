"""Knowledge types (the extension point "what is compared"): one module each, listed in `KNOWLEDGE`.

A term ``{knowledge: K, loss: L, weight: w, layer_map: …, temperature: T, <loss parameters>}`` is parsed by
`parse_term` (every mistake is a ValueError naming the value and the fix, before any model is loaded) and built
by the scheme's trainer into ``KNOWLEDGE[K](term, pair)``. To add a knowledge type: a module with a `Knowledge`
subclass, its losses in ``llmkd.losses.LOSSES[K]``, and one entry here.
"""

from __future__ import annotations

import math

from llmkd.knowledge.adversarial import AdversarialKnowledge
from llmkd.knowledge.attention import AttentionKnowledge
from llmkd.knowledge.attention_relation import AttentionRelationKnowledge
from llmkd.knowledge.base import Knowledge, Pair, Term, TermValues
from llmkd.knowledge.cross_vocab import CrossVocabKnowledge
from llmkd.knowledge.exits import ExitKnowledge
from llmkd.knowledge.graph import FlowKnowledge, GraphKnowledge
from llmkd.knowledge.hidden import HiddenKnowledge
from llmkd.knowledge.labels import LabelKnowledge, label_term
from llmkd.knowledge.layer_maps import freeze
from llmkd.knowledge.logits import LogitKnowledge
from llmkd.knowledge.pooled import AlignedKnowledge, PooledKnowledge
from llmkd.knowledge.relation import RelationKnowledge
from llmkd.losses import get_loss

KNOWLEDGE: dict[str, type[Knowledge]] = {
    "logits": LogitKnowledge,
    "hidden": HiddenKnowledge,
    "attention": AttentionKnowledge,
    "relation": RelationKnowledge,
    "pooled": PooledKnowledge,
    "aligned": AlignedKnowledge,
    "cross_vocab": CrossVocabKnowledge,
    "exits": ExitKnowledge,  # built by trainer: early_exit from its exit_* settings, not listed in terms
    "adversarial": AdversarialKnowledge,
    "graph": GraphKnowledge,
    "flow": FlowKnowledge,
    "attention_relation": AttentionRelationKnowledge,
}

TERM_KEYS = {"knowledge", "loss", "weight", "layer_map", "temperature", "teacher"}


def parse_term(spec: dict | Term, index: int = 0) -> Term:
    """Turns a YAML/dict term into a `Term`, raising a ValueError that names the bad value and the fix."""
    if isinstance(spec, Term):
        return spec
    where = f"terms[{index}]"
    if not isinstance(spec, dict):
        raise ValueError(
            f"{where} must be a mapping like {{knowledge: logits, loss: forward_kl}}, got {spec!r}"
        )
    knowledge, name = spec.get("knowledge"), spec.get("loss")
    if knowledge not in KNOWLEDGE:
        raise ValueError(f"{where}: unknown knowledge {knowledge!r}; choose one of {', '.join(KNOWLEDGE)}")
    if knowledge == "exits":
        raise ValueError(
            f"{where}: exits terms are built by trainer: early_exit from exit_kd_weight, exit_hint_weight and "
            "exit_label_weight; remove this term and set those"
        )
    try:
        loss = get_loss(knowledge, name)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    kind = KNOWLEDGE[knowledge]
    weight = _number(spec.get("weight", 1.0), f"{where}: weight", minimum=0.0)
    temperature = spec.get("temperature")
    if temperature is not None:
        if not loss.takes_temperature:
            raise ValueError(f"{where}: the {knowledge} loss {name!r} takes no temperature; remove it")
        temperature = _number(temperature, f"{where}: temperature", minimum=0.0, strict=True)
    layer_map = spec.get("layer_map", kind.default_layer_map)
    kind.check_layer_map(layer_map, where)
    teacher = spec.get("teacher")
    if teacher is not None and (not isinstance(teacher, str) or not teacher):
        raise ValueError(f"{where}: teacher must name one of the run's teachers, got {teacher!r}")
    params = {k: v for k, v in spec.items() if k not in TERM_KEYS}
    unknown = sorted(set(params) - loss.params)
    if unknown:
        valid = sorted(loss.params | TERM_KEYS)
        raise ValueError(f"{where}: the {knowledge} loss {name!r} takes no {unknown}; valid keys: {valid}")
    _dry_run(kind, loss, params, temperature, where)
    return Term(knowledge, name, weight, freeze(layer_map), params, temperature, teacher)


def _number(value, what: str, minimum: float, strict: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        raise ValueError(
            f"{what} must be a finite number {'>' if strict else '>='} {minimum:g}, got {value!r}"
        )
    return float(value)


def _dry_run(kind: type[Knowledge], loss, params: dict, temperature, where: str) -> None:
    """Calls the loss once on tiny tensors so bad parameter values (beta=1, alpha=2) fail before training."""
    extra = {"temperature": temperature} if temperature is not None else {}
    try:
        loss(*kind.probe(), **extra, **params)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{where}: {kind.kind} loss {loss.__name__!r} rejects parameters {params}: {err}"
        ) from err


__all__ = [
    "KNOWLEDGE",
    "Knowledge",
    "LabelKnowledge",
    "Pair",
    "Term",
    "TermValues",
    "label_term",
    "parse_term",
]
