"""Adversarial knowledge: a discriminator D learns to tell the teacher's outputs from the student's, and the
student learns to make D take its outputs for the teacher's.

Xu, Hsu & Huang 2018, "Training Shallow and Thin Networks for Acceleration via Knowledge Distillation with
Conditional Adversarial Networks", arXiv 1709.00513 (D on logits); Belagiannis, Farshad & Galasso 2018,
"Adversarial Network Compression", arXiv 1803.10750 (D on features); Wang et al. 2018, "KDGAN", NeurIPS 2018.
Losses in llmkd.losses.adversarial: L_D = −[log D(t) + log(1 − D(s))] trains D only, the student's term
L_adv = −log D(s) (non-saturating) trains the student only.

What D sees (``what``): ``logits``: softmax(z / T) per target (one per example for classifiers; one per
next-token target for causal LMs, over the shared vocabulary rows), count kind "examples" / "targets";
``pooled``: the first-token ([CLS]) hidden state of one mapped layer (``layer_map``, default ``last``), count kind
"examples" — encoders only, with the teacher's width (no projector: a learnt map in front of D could fool D for
the student). D is a two-layer MLP (Linear → LeakyReLU(0.2) → Linear) of width ``discriminator_width``, an
auxiliary module (it lives in the student's ``llmkd_aux``: DDP reduces its gradients, checkpoints keep it beside
the student, never in the student's folder) with an Adam of its own (``discriminator_lr``, betas (0.5, 0.999) as
in DCGAN, Radford et al. 2016, arXiv 1511.06434; no weight decay, no schedule).

One optimizer step, in order:
1. each micro-batch, inside the student's forward: a_s = D(s.detach()) with D's parameters, for L_D; â_s = D(s)
   with D's parameters detached (torch.func.functional_call), for L_adv. After the teacher's forward:
   a_t = D(t.detach()), for L_D.
2. loss = Σ weight · terms (this term: weight · L_adv(â_s)) + L_D(a_t, a_s) as a side value (unweighted, logged
   as `<term>/discriminator_loss`, not part of the logged `loss`), each a sum over the items divided by the
   items of the whole accumulation window (all processes). One backward gives disjoint gradients: the student's
   from the terms only, D's from L_D only.
3. at the optimizer step: clipping (D's gradients apart from the student's), the student's optimizer steps, then
   D's Adam (llmkd.schemes.own_optimizers). Both were computed at the same (student, D) parameters: a
   simultaneous update, D's from the window's detached features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkd.knowledge import layer_maps
from llmkd.knowledge.base import Knowledge, Pair, Term, TermValues
from llmkd.knowledge.counts import targets
from llmkd.losses.adversarial import discriminator_accuracy, discriminator_bce
from llmkd.modeling import CAUSAL_LM, SEQ_CLS, hidden_width, is_causal, num_layers, output_rows, text_config

Tensor = torch.Tensor
DEFAULTS = {"what": "logits", "discriminator_width": 64, "discriminator_lr": 2e-4}
BETAS = (0.5, 0.999)


class Discriminator(nn.Module):
    """D: (..., F) features -> (...) logits a, D(x) = σ(a) the probability that x is the teacher's."""

    def __init__(self, width_in: int, width: int):
        super().__init__()
        self.hidden = nn.Linear(width_in, width)
        self.out = nn.Linear(width, 1)

    def forward(self, features: Tensor) -> Tensor:
        features = features.to(self.hidden.weight.dtype)
        return self.out(F.leaky_relu(self.hidden(features), 0.2)).squeeze(-1)


class AdversarialKnowledge(Knowledge):
    kind = "adversarial"
    needs = frozenset({"logits"})  # what: pooled needs hidden states instead (set per term)
    count = "examples"
    default_layer_map = None

    @classmethod
    def needs_for(cls, term: Term) -> frozenset[str]:
        pooled = (DEFAULTS | term.params).get("what") == "pooled"
        return frozenset({"hidden_states"}) if pooled else cls.needs

    def __init__(self, term: Term, pair: Pair, index: int = 0):
        super().__init__(term, pair, index)
        settings = DEFAULTS | term.params
        self.what, self.width, self.lr = (settings[k] for k in DEFAULTS)
        self.task = pair.task
        self.discriminator: Discriminator | None = None
        where = f"adversarial term {term.name!r}"
        if pair.source.input_prefix or "topk" in pair.source.provides:
            raise ValueError(
                f"{where}: D compares both models' outputs on the same tokens, but the teacher source "
                f"{type(pair.source).__name__} reads its own tokens or keeps only top-k logits; use a live teacher"
            )
        self.count = "targets" if self.what == "logits" and self.task == CAUSAL_LM else "examples"
        if self.what == "logits":
            self.width_in = self._logit_width(pair, where)
        else:
            self.width_in = self._pooled_layer(pair, where)

    def _logit_width(self, pair: Pair, where: str) -> int:
        if self.term.layer_map is not None:
            raise ValueError(
                f"{where}: what: logits takes no layer_map (got {self.term.layer_map!r}); remove it"
            )
        if pair.regression:
            raise ValueError(
                f"{where}: a regression score has no distribution to tell apart; use what: pooled"
            )
        self.temperature_value = self.temperature(pair.args)
        self.rows = pair.vocab_rows
        if self.task == SEQ_CLS:
            return int(text_config(pair.student).num_labels)
        teacher = getattr(self.source, "model", None)
        rows = (
            output_rows(pair.student),
            output_rows(teacher)
            if teacher is not None
            else int(self.source.config.get_text_config().vocab_size),
        )
        if rows[0] != rows[1] and self.rows is None:
            raise ValueError(
                f"{where}: the student has {rows[0]} logit rows, the teacher {rows[1]}; set vocab_mismatch: slice "
                "so that D compares the shared rows"
            )
        return self.rows or rows[0]

    def _pooled_layer(self, pair: Pair, where: str) -> int:
        if self.term.temperature is not None:
            raise ValueError(
                f"{where}: what: pooled compares hidden states, it takes no temperature; remove it"
            )
        teacher = getattr(self.source, "model", None)
        if is_causal(pair.student) or (teacher is not None and is_causal(teacher)):
            raise ValueError(
                f"{where}: what: pooled reads each example's first-token state, which only a bidirectional "
                "encoder fills with the whole input; for decoder models use what: logits"
            )
        n_teacher = int(self.source.config.get_text_config().num_hidden_layers)
        layer_map = self.term.layer_map if self.term.layer_map is not None else "last"
        pairs = layer_maps.resolve(layer_map, num_layers(pair.student), n_teacher, "hidden")
        widths = (hidden_width(pair.student), int(self.source.config.get_text_config().hidden_size))
        if len(pairs) != 1 or widths[0] != widths[1]:
            raise ValueError(
                f"{where}: what: pooled needs one [student_layer, teacher_layer] pair (got {pairs}) of equal widths "
                f"(student {widths[0]}, teacher {widths[1]}); use layer_map: last or [[s, t]], or what: logits"
            )
        self.needs = frozenset({"hidden_states"})
        self.layers = pairs[0]
        return widths[0]

    @classmethod
    def check_layer_map(cls, layer_map, where: str) -> None:
        if layer_map is not None:
            layer_maps.check_shape(layer_map, where)

    @classmethod
    def probe(cls):
        return (torch.randn(3),)

    def needs_full_logits(self, training: bool) -> bool:
        return self.what == "logits"

    def adapter(self) -> nn.Module:
        self.discriminator = Discriminator(self.width_in, self.width)
        return self.discriminator

    def own_optimizer(self, adapter: nn.Module, args) -> torch.optim.Optimizer:
        return torch.optim.Adam(adapter.parameters(), lr=self.lr, betas=BETAS, weight_decay=0.0)

    # -- per batch ---------------------------------------------------------------------------------
    def features(self, out, side: int) -> Tensor:
        """(B, F) or (B, T-1, F) what D reads of one side's outputs (side 0: student, 1: teacher)."""
        if self.what == "pooled":
            return out.hidden_states[self.layers[side]][:, 0]
        logits = out.logits if self.task == SEQ_CLS else out.logits[:, :-1, slice(self.rows)]
        return torch.softmax(logits.float() / self.temperature_value, dim=-1)

    def adapt(self, adapter, student_out) -> dict:
        """Inside the student's forward: D on the detached student features (for D's loss) and D, detached, on
        the student features (for the student's term), so D's parameters are used in the forward (DDP)."""
        student = self.features(student_out, 0)
        frozen = {name: p.detach() for name, p in adapter.named_parameters()}
        return {
            "fake": adapter(student.detach()),
            "student": torch.func.functional_call(adapter, frozen, (student,)),
        }

    def values(self, student_out, teacher_out, batch, adapted) -> TermValues:
        if not adapted:
            raise ValueError(
                f"{self.name}: the discriminator runs inside the student's forward (llmkd_aux), which this scheme "
                "does not run; use the adversarial term with the distill trainer"
            )
        real = self.discriminator(self.features(teacher_out, 1).detach())
        fake = adapted["fake"]
        mask = targets(batch, self.task) if self.count == "targets" else None
        side = {
            "discriminator_loss": TermValues(discriminator_bce(real, fake), mask, self.count),
            "discriminator_accuracy": TermValues(discriminator_accuracy(real, fake), mask, self.count),
        }
        student_term = self.loss(adapted["student"], **self.term.params)
        return TermValues(student_term, mask, self.count, side)
