"""The teacher-source contract: where the teacher's outputs for a batch come from.

A source declares what it `provides` ("logits", "hidden_states", "attentions", or "topk" for a top-k logit
cache), which batch `columns` it reads, and whether it is `trainable` or `shares_weights` with the student. The
trainer checks every term's needs against `provides` before training, places the source once the engine exists
(`place`), and asks it for `outputs(batch, flags)` at every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

Tensor = torch.Tensor


@dataclass
class TopK:
    """A cached teacher's (B, T, k) top-k ids (int64) and log-probs, and (B, T) log-mass of the other tokens."""

    ids: Tensor
    logprobs: Tensor
    rest: Tensor
    covered: Tensor | None = None  # (B, T) true where the cache holds a prediction

    def to(self, device) -> TopK:
        return TopK(
            *(None if v is None else v.to(device) for v in (self.ids, self.logprobs, self.rest, self.covered))
        )


@dataclass
class TeacherOutputs:
    """What every knowledge type reads from the teacher side (fields a source does not provide stay None)."""

    logits: Tensor | None = None  # (B, C) or (B, T, V)
    hidden_states: tuple | None = None  # L+1 of (B, T, H)
    attentions: tuple | None = None  # L of (B, heads, T, T)
    topk: TopK | None = None
    members: dict | None = None  # several teachers (an ensemble): name -> each one's TeacherOutputs

    def member(self, name: str | None) -> TeacherOutputs:
        """The outputs a term reads: the named member teacher's (a term's ``teacher:`` key) or these."""
        if name is None:
            return self
        if not self.members or name not in self.members:
            raise KeyError(
                f"no teacher named {name!r} in this batch's outputs (have {sorted(self.members or {})})"
            )
        return self.members[name]

    def predictions(self, vocab_rows: int | None = None) -> Tensor:
        """The teacher's argmax class / token per example or position (over the first `vocab_rows` rows)."""
        if self.topk is not None:
            return self.topk.ids[..., 0]
        return self.logits[..., slice(vocab_rows)].argmax(-1)


class TeacherSource:
    """Base class of teacher sources (the extension point "where do teacher outputs come from")."""

    provides: ClassVar[frozenset[str]] = frozenset()
    trainable: ClassVar[bool] = False
    shares_weights: ClassVar[bool] = False
    input_prefix: str = ""  # "teacher_": the source reads its own tokenisation of each example
    task: str
    config: Any  # the teacher's transformers config (labels, widths, layer counts)
    model: Any = None  # the module, when the source has one

    def columns(self) -> set[str]:
        """Batch columns the source reads (kept by remove_unused_columns)."""
        return set()

    def required_columns(self) -> set[str]:
        """Dataset columns without which the source cannot serve a row (checked before training)."""
        return set()

    def check(self, pair) -> None:
        """Refuses (ValueError naming the values and the fix) a pair this source cannot serve."""

    def place(self, trainer) -> None:
        """Puts the source where the engine needs it, once the trainer's accelerator exists."""

    def names(self) -> set[str]:
        """Member teachers a term may name with its ``teacher:`` key (an ensemble's); none by default."""
        return set()

    def member(self, name: str | None) -> TeacherSource:
        """The source a term with ``teacher: name`` reads (for its config, model and layer counts)."""
        if name is None:
            return self
        raise ValueError(
            f"a term names teacher {name!r}, but this run has one teacher ({type(self).__name__}); remove the "
            "term's teacher key, or list several teachers (teacher source 'ensemble')"
        )

    def save(self, folder: str, trainer) -> None:
        """Writes the source's own state (e.g. a mean teacher's weights) into a checkpoint folder."""

    def load(self, folder: str, trainer) -> None:
        """Restores what `save` wrote, when training resumes from `folder`."""

    def outputs(self, batch: dict, flags: dict) -> TeacherOutputs:
        raise NotImplementedError
