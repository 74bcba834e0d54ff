"""The knowledge contract: what a term compares, which outputs it needs, and how its values are counted.

A term is one knowledge type with one loss (`Term`). Its `Knowledge` object, built once per run from the student
and the teacher source (`Pair`), validates the pair (layer maps, widths, heads, vocabularies), owns its trainable
adapters (projectors), and turns one batch into `TermValues`: per-item values, the mask of the items that count,
and the name of the count that normalises them ("examples", "tokens", "targets" or a kind it adds itself). The
scheme's base trainer does the one reduction: Σ_terms weight · Σ values[mask] / count of the whole window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from llmkd.knowledge import layer_maps
from llmkd.losses import LOSSES, Loss
from llmkd.modeling import num_layers, position_mask

Tensor = torch.Tensor


@dataclass(frozen=True)
class Term:
    """One weighted distillation term: which knowledge, which loss, how much, between which layers."""

    knowledge: str
    loss: str
    weight: float = 1.0
    layer_map: Any = None
    params: dict = field(default_factory=dict)
    temperature: float | None = None  # this term's softmax temperature; None: the config's
    teacher: str | None = None  # with several teachers (an ensemble): the member this term reads; None: all

    @property
    def name(self) -> str:
        return f"distill/{self.knowledge}_{self.loss}" + (f"@{self.teacher}" if self.teacher else "")

    def to_dict(self) -> dict:
        out = {"knowledge": self.knowledge, "loss": self.loss, "weight": self.weight}
        if self.layer_map is not None:
            out["layer_map"] = (
                [list(p) for p in self.layer_map] if isinstance(self.layer_map, tuple) else self.layer_map
            )
        if self.temperature is not None:
            out["temperature"] = self.temperature
        if self.teacher is not None:
            out["teacher"] = self.teacher
        return out | self.params


@dataclass
class TermValues:
    """Per-item values (any shape the mask broadcasts to, or a 0-dim sum), the items that count, the count kind."""

    values: Tensor
    mask: Tensor | None
    count: str
    # Logged beside the term as `<term name>/<key>` and never part of its weighted mix nor of the logged `loss`.
    # One with a gradient (the loss of an adapter that has its own optimizer: a discriminator's) is also added,
    # unweighted and normalised like a term, to the loss that is backpropagated; it must reach only parameters
    # that own optimizer steps (`Knowledge.own_optimizer`).
    side: dict[str, TermValues] = field(default_factory=dict)


@dataclass
class Pair:
    """What a knowledge object may look at while it is built: the two models and the run's settings."""

    student: nn.Module
    source: Any  # a llmkd.teachers TeacherSource
    args: Any  # the scheme's config (DistillationConfig or a subclass)
    task: str
    regression: bool = False
    student_tokenizer: Any = None
    teacher_tokenizer: Any = None
    vocab_rows: int | None = None  # logit rows both sides share (padded vocabularies); None: all


class Knowledge:
    """Base class of the knowledge types (the extension point "what is compared").

    Subclasses set `kind`, `needs` (model outputs both sides must provide: "logits", "hidden_states",
    "attentions"), `count` and `default_layer_map`, and implement `values`. Those with trainable parts return
    them from `adapter()` and use them in `adapt`, which runs inside the student's forward (so DDP, FSDP and
    DeepSpeed see the adapter's parameters as part of the student).
    """

    kind: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    count: ClassVar[str] = "tokens"
    default_layer_map: ClassVar[Any] = None
    # Extra count kinds this knowledge introduces: kind -> fn(batch, task) -> (B, ...) mask of counted items.
    counts: ClassVar[dict[str, Callable]] = {}

    def __init__(self, term: Term, pair: Pair, index: int = 0):
        self.term, self.index = term, index
        self.loss: Loss = LOSSES[self.kind][term.loss]
        self.source = pair.source.member(
            term.teacher
        )  # the teacher this term reads (a named ensemble member)
        self.name = term.name  # the name it is logged under

    # -- set-up ------------------------------------------------------------------------------------
    @classmethod
    def check_layer_map(cls, layer_map, where: str) -> None:
        """Parse-time check of the layer map's shape (indices are checked against the models later)."""
        if layer_map is not None:
            raise ValueError(f"{where}: {cls.kind} terms take no layer_map (got {layer_map!r}); remove it")

    @classmethod
    def probe(cls) -> tuple[Tensor, Tensor]:
        """Tiny (student, teacher) inputs for the parse-time dry run of a term's loss and parameters."""
        raise NotImplementedError

    @classmethod
    def needs_for(cls, term: Term) -> frozenset[str]:
        """What a term of this kind needs from both sides (its parameters may change it: adversarial
        `what: pooled` reads hidden states). Read by sources that check terms before they are built."""
        return cls.needs

    def adapter(self) -> nn.Module | None:
        return None

    def own_optimizer(self, adapter: nn.Module, args) -> torch.optim.Optimizer | None:
        """An optimizer of this term's own for (part of) its adapter, or None (default: it trains with the student).

        Its parameters are left out of the trainer's optimizer; it is stepped once per optimizer step, right
        after the trainer's optimizer and from the same gradients (clipped apart from the student's to
        max_grad_norm), its gradients are zeroed with the student's, and its state is checkpointed beside the
        auxiliary modules. Its parameters must get gradients only from the term's side losses
        (`TermValues.side`). Called once, after the adapter has the student's device and dtype.
        """
        return None

    def needs_full_logits(self, training: bool) -> bool:
        """Whether the student must return (B, T, V) logits for this term (the fused path avoids them)."""
        return False

    # -- per batch ---------------------------------------------------------------------------------
    def adapt(self, adapter: nn.Module, student_out) -> Any:
        """Runs inside the student's forward: the adapter applied to the student's outputs."""
        return None

    def values(self, student_out, teacher_out, batch: dict, adapted: Any) -> TermValues:
        raise NotImplementedError

    def temperature(self, args) -> float:
        return self.term.temperature if self.term.temperature is not None else args.temperature


class LayerKnowledge(Knowledge):
    """Knowledge compared between mapped layers (hidden states, attention maps, pooled states): the layer map's
    shape is checked when the term is parsed and its indices against both models here (`self.pairs`)."""

    layer_kind: ClassVar[str] = (
        "hidden"  # which list the indices address: "hidden" (L + 1) or "attention" (L)
    )

    def __init__(self, term: Term, pair: Pair, index: int = 0):
        super().__init__(term, pair, index)
        n_teacher = int(pair.source.member(term.teacher).config.get_text_config().num_hidden_layers)
        self.pairs = layer_maps.resolve(term.layer_map, num_layers(pair.student), n_teacher, self.layer_kind)
        self.task = pair.task
        self.per_layer = getattr(pair.args, "diagnostics", True)  # log each layer pair's value (layer_values)

    @classmethod
    def check_layer_map(cls, layer_map, where: str) -> None:
        layer_maps.check_shape(layer_map, where)

    def layer_values(self, parts: list, mask: Tensor | None, count: str) -> dict[str, TermValues]:
        """Side values (`TermValues.side`) of each layer pair: `parts[i]` is the term's values for `self.pairs[i]`,
        logged as `<term>/layer<t>-><s>` (teacher layer t into student layer s; a term's value is their mean).
        Detached: diagnostics only, never backpropagated. None with one pair (it is the term) or diagnostics off."""
        if not self.per_layer or len(parts) < 2:
            return {}
        return {f"layer{t}->{s}": TermValues(v.detach(), mask, count) for (s, t), v in zip(self.pairs, parts)}


class Sides:
    """Which positions of each side's hidden states are real, when the two sides may read different inputs: a
    teacher reading its own columns (``teacher_`` prefix: another tokenizer or modality) has its own attention
    mask, a speech student's frames come from its front end (llmkd.modeling.position_mask)."""

    def __init__(self, pair: Pair, term: Term):
        source = pair.source.member(term.teacher)
        self.student, self.teacher = pair.student, getattr(source, "model", None)
        self.prefix = getattr(source, "input_prefix", "")

    def masks(self, batch: dict, s_states: Tensor, t_states: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T_s) and (B, T_t) bool masks of the real positions of (B, T_s, H_s) and (B, T_t, H_t) states."""
        return (
            position_mask(self.student, batch.get("attention_mask"), s_states),
            position_mask(self.teacher, batch.get(self.prefix + "attention_mask"), t_states),
        )
