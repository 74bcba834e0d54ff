"""Distillation losses as pure tensor functions, grouped by the knowledge they compare (Gou et al., 2021).

Every function returns per-item values (per position, per token, or one number per batch for relation losses,
which mix the examples of a batch); reduction happens once, in :func:`masked_mean`. ``LOSSES[knowledge][name]``
is a :class:`Loss`: the function (call it directly) plus what the trainer must know about it (whether it is a
soft-target loss scaled by T², which keyword parameters it takes).

Modules: ``response`` (logits), ``feature`` (hidden states, attention maps), ``relation`` (pooled vectors),
``cross_vocab`` (ULD, different vocabularies), ``bucketed`` (a top-k teacher cache), ``kernels`` (chunked and
fused memory-bounded versions of the response losses), ``common`` (dtype rule and the reduction).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llmkd.losses.adversarial import ADVERSARIAL_LOSSES
from llmkd.losses.attention_relation import ATTENTION_RELATION_LOSSES
from llmkd.losses.common import masked_mean
from llmkd.losses.cross_vocab import uld_loss
from llmkd.losses.feature import (
    ATTENTION_LOSSES,
    HIDDEN_LOSSES,
    attention_kl,
    attention_mse,
    hidden_cosine,
    hidden_mse,
)
from llmkd.losses.graph import FLOW_LOSSES, GRAPH_LOSSES
from llmkd.losses.kernels.chunked import chunked_logit_loss, fused_logit_distillation
from llmkd.losses.relation import RELATION_LOSSES, pkt, rkd_angle, rkd_distance, similarity_preserving
from llmkd.losses.response import (
    RESPONSE_LOSSES,
    forward_kl,
    jsd,
    logit_mse,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    soft_ce,
    tvd,
)

Tensor = torch.Tensor

# Hinton et al. 2015 (§2): soft-target gradients scale as 1/T², so their value is multiplied by T². Not "tvd" (its
# gradient scales as 1/T: T² would over-weight it) nor "mse" (a direct logit match, not a soft target).
_NOT_SOFT = {"tvd", "mse"}


@dataclass(frozen=True)
class Loss:
    """A registered loss: call it like its function; `soft_target` says whether its value is scaled by T²."""

    fn: Callable[..., Tensor]
    soft_target: bool = False
    params: frozenset = field(default=frozenset())  # keyword parameters a term may set (beta, alpha, …)

    def __call__(self, *args, **kwargs) -> Tensor:
        return self.fn(*args, **kwargs)

    @property
    def __name__(self) -> str:
        return self.fn.__name__

    @property
    def takes_temperature(self) -> bool:
        return "temperature" in inspect.signature(self.fn).parameters


def _entry(fn: Callable[..., Tensor], soft_target: bool = False) -> Loss:
    # temperature and key_mask are data the trainer passes on every call, not settings a term may choose.
    passed_by_trainer = {"temperature", "key_mask"}
    signature = inspect.signature(fn).parameters.values()
    params = frozenset(
        p.name for p in signature if p.kind == p.KEYWORD_ONLY and p.name not in passed_by_trainer
    )
    return Loss(fn, soft_target, params)


LOSSES: dict[str, dict[str, Loss]] = {
    "logits": {name: _entry(fn, name not in _NOT_SOFT) for name, fn in RESPONSE_LOSSES.items()},
    "hidden": {name: _entry(fn) for name, fn in HIDDEN_LOSSES.items()},
    # One pooled vector per example (B, H) -> (B,): the same formulas as the per-token hidden-state losses.
    "pooled": {name: _entry(fn) for name, fn in HIDDEN_LOSSES.items()},
    "aligned": {name: _entry(fn) for name, fn in HIDDEN_LOSSES.items()},  # per student frame (B, T)
    "attention": {name: _entry(fn) for name, fn in ATTENTION_LOSSES.items()},
    "relation": {name: _entry(fn) for name, fn in RELATION_LOSSES.items()},
    "cross_vocab": {"uld": _entry(uld_loss)},
    "graph": {name: _entry(fn) for name, fn in GRAPH_LOSSES.items()},
    "flow": {name: _entry(fn) for name, fn in FLOW_LOSSES.items()},
    "attention_relation": {name: _entry(fn) for name, fn in ATTENTION_RELATION_LOSSES.items()},
    "adversarial": {name: _entry(fn) for name, fn in ADVERSARIAL_LOSSES.items()},
}

SOFT_TARGET_LOSSES: frozenset[str] = frozenset(n for n, loss in LOSSES["logits"].items() if loss.soft_target)


def get_loss(knowledge: str, name: str) -> Loss:
    """The loss registered as ``LOSSES[knowledge][name]``; a ValueError names the valid choices."""
    if knowledge not in LOSSES:
        raise ValueError(f"unknown knowledge {knowledge!r}; choose one of {', '.join(LOSSES)}")
    if name not in LOSSES[knowledge]:
        raise ValueError(f"unknown {knowledge} loss {name!r}; choose one of {', '.join(LOSSES[knowledge])}")
    return LOSSES[knowledge][name]


__all__ = [
    "LOSSES",
    "SOFT_TARGET_LOSSES",
    "Loss",
    "attention_kl",
    "attention_mse",
    "chunked_logit_loss",
    "forward_kl",
    "fused_logit_distillation",
    "get_loss",
    "hidden_cosine",
    "hidden_mse",
    "jsd",
    "logit_mse",
    "masked_mean",
    "pkt",
    "reverse_kl",
    "rkd_angle",
    "rkd_distance",
    "similarity_preserving",
    "skew_kl",
    "skew_reverse_kl",
    "soft_ce",
    "tvd",
]
