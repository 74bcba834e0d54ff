"""Exit knowledge: a sequence classifier's final layer teaches classifier exits on its own intermediate layers.

Deep → shallow self-distillation. Liu et al. 2020, "FastBERT: a Self-distilling BERT with Adaptive Inference Time"
(ACL, arXiv 2004.02178): the fine-tuned backbone is frozen and each exit ("student classifier") learns the final
classifier's predictions. Zhang et al. 2019, "Be Your Own Teacher: Improve the Performance of Convolutional Neural
Networks via Self Distillation" (ICCV, arXiv 1905.08094): every shallow classifier also learns the labels and, as
a hint, the deepest features through its bottleneck. One term per part, each summed over the exits E (as both
papers sum their per-classifier losses), per example (count kind "examples"; the labels part: "labelled"):

- the exit loss (``forward_kl`` by default): Σ_{l ∈ E} T²·KL(p_final ‖ p_l), p = softmax(z / T), the final
  logits detached (the final layer is the teacher, never pulled towards its exits);
- ``hint``: Σ_{l ∈ E} mean_H (bottleneck_l(x_l) − x_final)², x = the pooled state the heads read ([CLS] for
  encoders, the last real token for decoder classifiers), x_final detached;
- ``ce``: Σ_{l ∈ E} CE(z_l, y) on the gold labels (with label_smoothing_factor).

The exit heads (`llmkd.students.exits.ExitHead`) are ONE auxiliary module, owned by the first exit term: they run
in the student's forward hook (llmkd.knowledge.adapters), so DDP reduces their gradients with the student's. The
other exit terms read the owner's outputs. The scheme builds these terms from its exit_* settings; they are not
written as `terms:` in a recipe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkd.knowledge.adapters import AUX
from llmkd.knowledge.base import Knowledge, Pair, Term, TermValues
from llmkd.knowledge.labels import labelled
from llmkd.losses import LOSSES
from llmkd.modeling import is_causal, num_layers, text_config
from llmkd.students.exits import make_exit_heads, pool_states

PARTS = ("hint", "ce")  # besides the exit loss, which is any LOSSES["logits"] name


def resolve_exit_layers(spec, n_layers: int) -> list[int]:
    """Exit layers from ``exit_layers`` ('all' or a list) for a model of `n_layers`: each l in 1..L-1 reads
    hidden_states[l], the output of layer l (the last layer is the model's own head)."""
    layers = list(range(1, n_layers)) if spec == "all" else list(spec)
    bad = [layer for layer in layers if not 0 < layer < n_layers]
    if bad or not layers:
        raise ValueError(
            f"exit_layers={spec!r}: this model has {n_layers} layers, so exits go on layers 1..{n_layers - 1} "
            f"(bad: {bad or 'none given'}); the last layer's exit is the model's own classifier"
        )
    return sorted(layers)


class ExitKnowledge(Knowledge):
    kind = "exits"
    needs = frozenset()  # nothing from a teacher: the final layer is the student's own
    count = "examples"
    counts = {"labelled": labelled}

    def __init__(self, term: Term, pair: Pair, index: int = 0):
        self.term, self.index, self.name, self.source = term, index, term.name, pair.source
        if term.loss not in PARTS and term.loss not in LOSSES["logits"]:
            raise ValueError(
                f"exit term loss {term.loss!r}: use {PARTS} or one of {sorted(LOSSES['logits'])}"
            )
        self.loss = LOSSES["logits"].get(term.loss)
        self.task, config = pair.task, text_config(pair.student)
        self.layers = resolve_exit_layers(pair.args.exit_layers, num_layers(pair.student))
        own = "last" if is_causal(pair.student) else "first"  # what the model's own classifier reads
        self.pooling = own if getattr(pair.args, "exit_pooling", "auto") == "auto" else pair.args.exit_pooling
        self.shape = (int(config.hidden_size), int(config.num_labels))
        self.init_std = float(getattr(config, "initializer_range", 0.02))
        self.temperature_value = float(pair.args.temperature)
        self.scale = self.temperature_value**2 if self.loss is not None and self.loss.soft_target else 1.0
        self.smoothing = float(pair.args.label_smoothing_factor)
        self.owner = str(index)  # the scheme points every exit term at the first one, which owns the heads
        self.mask = None  # the batch's attention mask while the student runs (decoders pool their last token)

    def adapter(self) -> nn.Module | None:
        if self.owner != str(self.index):
            return None  # the heads are shared: only their owner creates them
        return make_exit_heads(*self.shape, self.layers, self.init_std)

    def adapt(self, heads, student_out) -> dict:
        """Runs inside the student's forward: every exit's (B, C) logits and (B, H) bottleneck feature."""
        outs = [
            heads[str(layer)](pool_states(student_out.hidden_states[layer], self.mask, self.pooling))
            for layer in self.layers
        ]
        return {"logits": [o[0] for o in outs], "features": [o[1] for o in outs]}

    def exits(self, student_out) -> dict:
        """The owner's outputs of this forward (see `adapt`)."""
        return student_out[AUX][self.owner]

    def values(self, student_out, teacher_out, batch, adapted) -> TermValues:
        exits = self.exits(student_out)
        if self.term.loss == "ce":
            return self._labels(exits["logits"], batch)
        if self.term.loss == "hint":
            final = pool_states(
                student_out.hidden_states[-1], batch.get("attention_mask"), self.pooling
            ).detach()
            values = sum(LOSSES["hidden"]["mse"](feature, final) for feature in exits["features"])
            return TermValues(values, None, "examples")
        final = student_out.logits.detach()
        per_exit = [self.loss(z, final, temperature=self.temperature_value) for z in exits["logits"]]
        return TermValues(sum(per_exit) * self.scale, None, "examples")

    def _labels(self, exit_logits, batch) -> TermValues:
        mask = labelled(batch, self.task)
        if "labels" not in batch:  # unlabelled evaluation data: no item, no value
            return TermValues(torch.zeros(mask.shape, device=mask.device), mask, "labelled")
        labels = batch["labels"].clamp(min=0)  # unlabelled rows are masked; clamp keeps the gather valid
        values = sum(
            F.cross_entropy(z.float(), labels, reduction="none", label_smoothing=self.smoothing)
            for z in exit_logits
        )
        return TermValues(values, mask, "labelled")

    def metric_columns(self, student_out, batch) -> dict[str, tuple]:
        """Evaluation columns per exit l: ``exit<l>_accuracy`` (correct over labelled examples) and
        ``exit<l>_agreement`` (the final layer's prediction, over all examples): {name: ((B,) sums, (B,) counts)}."""
        final = student_out.logits.argmax(-1)
        mask = labelled(batch, self.task).float()
        labels = batch.get("labels")
        columns = {}
        for layer, logits in zip(self.layers, self.exits(student_out)["logits"]):
            predicted = logits.argmax(-1)
            if labels is not None:
                columns[f"exit{layer}_accuracy"] = ((predicted == labels).float() * mask, mask)
            columns[f"exit{layer}_agreement"] = ((predicted == final).float(), torch.ones_like(mask))
        return columns


__all__ = ["ExitKnowledge", "resolve_exit_layers"]
