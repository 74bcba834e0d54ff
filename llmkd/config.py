"""`DistillationConfig`: TrainingArguments plus the distillation terms, validated before any training."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from llmkd.losses import LOSSES, get_loss

DEFAULT_LAYER_MAP = {"logits": None, "hidden": "uniform", "attention": "uniform", "relation": "last"}
TERM_KEYS = {"knowledge", "loss", "weight", "layer_map"}
VOCAB_MISMATCH = ("error", "slice")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Term:
    """One weighted distillation term: which knowledge, which loss, how much, between which layers."""

    knowledge: str
    loss: str
    weight: float = 1.0
    layer_map: Any = None
    params: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"distill/{self.knowledge}_{self.loss}"


def parse_term(spec: dict | Term, index: int = 0) -> Term:
    """Turns a YAML/dict term into a `Term`, raising a ValueError that names the bad value and the fix."""
    if isinstance(spec, Term):
        return spec
    if not isinstance(spec, dict):
        raise ValueError(
            f"terms[{index}] must be a mapping like {{knowledge: logits, loss: forward_kl}}, got {spec!r}"
        )
    where = f"terms[{index}]"
    knowledge, loss = spec.get("knowledge"), spec.get("loss")
    try:
        get_loss(knowledge, loss)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    weight = spec.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{where}: weight must be a finite number >= 0, got {weight!r}")
    layer_map = spec.get("layer_map", DEFAULT_LAYER_MAP[knowledge])
    if knowledge == "logits" and layer_map is not None:
        raise ValueError(f"{where}: logits terms take no layer_map (got {layer_map!r}); remove it")
    if knowledge != "logits":
        _check_layer_map_shape(layer_map, where)
    params = {k: v for k, v in spec.items() if k not in TERM_KEYS}
    _dry_run(knowledge, loss, params, where)
    return Term(knowledge, loss, float(weight), _freeze(layer_map), params)


def _dry_run(knowledge: str, loss: str, params: dict, where: str) -> None:
    """Calls the loss once on tiny tensors so bad parameters (beta=1, a misspelt key) fail before training."""
    probe = {
        "logits": lambda: (torch.randn(2, 3), torch.randn(2, 3)),
        "hidden": lambda: (torch.randn(1, 2, 4), torch.randn(1, 2, 4)),
        "attention": lambda: (torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), 0.5)),
        "relation": lambda: (torch.randn(3, 2), torch.randn(3, 4)),
    }[knowledge]
    try:
        LOSSES[knowledge][loss](*probe(), **params)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {knowledge} loss {loss!r} rejects parameters {params}: {err}") from err


def _check_layer_map_shape(layer_map: Any, where: str) -> None:
    if layer_map in ("uniform", "last"):
        return
    ok = isinstance(layer_map, (list, tuple)) and len(layer_map) > 0
    ok = ok and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in layer_map)
    ok = ok and all(isinstance(i, int) and not isinstance(i, bool) for p in layer_map for i in p)
    if not ok:
        raise ValueError(
            f"{where}: layer_map must be 'uniform', 'last' or a list of [student_layer, teacher_layer] "
            f"integer pairs, got {layer_map!r}"
        )


def _freeze(layer_map: Any) -> Any:
    if isinstance(layer_map, (list, tuple)):
        return tuple(tuple(p) for p in layer_map)
    return layer_map


@dataclass
class DistillationConfig(TrainingArguments):
    """TrainingArguments for `DistillationTrainer`: the loss mix and how the teacher runs."""

    terms: list = field(
        default_factory=lambda: [{"knowledge": "logits", "loss": "forward_kl", "weight": 1.0}],
        metadata={
            "help": "Distillation terms, each {knowledge: logits|hidden|attention|relation, loss: <name>, "
            "weight: w, layer_map: uniform|last|[[s, t], ...], <loss params such as beta or alpha>}."
        },
    )
    temperature: float = field(
        default=2.0,
        metadata={
            "help": "Softmax temperature T of logit terms (> 0); their value is multiplied by T^2 (Hinton)."
        },
    )
    hard_label_weight: float = field(
        default=0.5,
        metadata={"help": "Weight (>= 0) of the task loss on gold labels; 0 distils from the teacher alone."},
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={"help": "Teacher weights dtype: auto (as loaded), float32, bfloat16 or float16."},
    )
    vocab_mismatch: str = field(
        default="error",
        metadata={
            "help": "Logit rows differ in size (padded vocab, e.g. 151936 vs 152064): 'error', or 'slice' both "
            "to the shared vocabulary and renormalise (never zero-pad)."
        },
    )
    fused_logits: bool = field(
        default=True,
        metadata={
            "help": "Causal LMs whose terms are all logit terms (hard_label_weight=0): compute them in training "
            "from the last hidden states and the lm_head weights, chunk by chunk, never materialising the "
            "(batch, length, vocab) logits (llmkd.losses.fused_logit_distillation)."
        },
    )
    logit_chunk_size: int = field(
        default=1024,
        metadata={"help": "Positions per chunk of the fused logit path (> 0); memory ~ chunk × vocab."},
    )
    shared_vocab_size: int | None = field(
        default=None,
        metadata={
            "help": "With vocab_mismatch=slice: the real vocabulary size (default: the smaller of the two)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}; 1.0 means no softening")
        if not isinstance(self.hard_label_weight, (int, float)) or not 0 <= self.hard_label_weight < math.inf:
            raise ValueError(
                f"hard_label_weight must be a finite number >= 0, got {self.hard_label_weight!r}"
            )
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype must be one of {TEACHER_DTYPES}, got {self.teacher_dtype!r}")
        if not isinstance(self.logit_chunk_size, int) or self.logit_chunk_size <= 0:
            raise ValueError(f"logit_chunk_size must be a positive integer, got {self.logit_chunk_size!r}")
        if self.vocab_mismatch not in VOCAB_MISMATCH:
            raise ValueError(f"vocab_mismatch must be one of {VOCAB_MISMATCH}, got {self.vocab_mismatch!r}")
        if not isinstance(self.terms, (list, tuple)):
            raise ValueError(f"terms must be a list of term mappings, got {self.terms!r}")
        self.terms = [parse_term(t, i) for i, t in enumerate(self.terms)]
        self._check_something_to_train()
        names = [t.name for t in self.terms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates and len(set(zip(names, (t.layer_map for t in self.terms)))) < len(names):
            raise ValueError(f"terms repeat {duplicates} with the same layer_map; merge them into one term")

    def _check_something_to_train(self) -> None:
        # A hook: trainers with a loss of their own (e.g. ULD) count that loss too.
        if not self.terms and self.hard_label_weight == 0:
            raise ValueError("nothing to train on: no distillation terms and hard_label_weight=0; add a term")

    def to_dict(self):
        # Terms are frozen dataclasses; keep the serialised TrainingArguments JSON-friendly.
        d = super().to_dict()
        d["terms"] = [
            {
                "knowledge": t.knowledge,
                "loss": t.loss,
                "weight": t.weight,
                "layer_map": t.layer_map,
                **t.params,
            }
            for t in self.terms
        ]
        return d
