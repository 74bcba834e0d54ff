"""The task loss on gold labels, as one more term of the mix (weight `hard_label_weight`, logged as `loss_ce`).

Classifiers: cross-entropy per example (with `label_smoothing_factor`, as transformers' Trainer applies it);
regression (num_labels = 1): squared error of the score. Causal LMs: cross-entropy per next-token target.
Examples without a gold label (no `labels` column, a negative class id as in GLUE's test splits, a NaN score) are
no items of this term (count kind "labelled"): evaluating or predicting on unlabelled data just leaves it out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkd.knowledge.base import Knowledge, Pair, Term, TermValues
from llmkd.knowledge.counts import examples, targets
from llmkd.modeling import SEQ_CLS


def labelled(batch: dict, task: str) -> torch.Tensor:
    """The items that carry a gold label: (B,) for classifiers (class id >= 0, finite score), else the targets."""
    labels = batch.get("labels")
    if labels is None:
        return torch.zeros_like(examples(batch, task))
    if task != SEQ_CLS:
        return targets(batch, task)
    return torch.isfinite(labels) & (labels >= 0) if labels.is_floating_point() else labels >= 0


class LabelKnowledge(Knowledge):
    kind = "labels"
    needs = frozenset()  # the student's logits and the batch's labels only
    count = "labelled"
    counts = {"labelled": labelled}

    def __init__(self, term: Term, pair: Pair, index: int = 0):
        self.term, self.index, self.name = term, index, "loss_ce"
        self.task, self.regression = pair.task, pair.regression
        self.smoothing = float(pair.args.label_smoothing_factor)

    def needs_full_logits(self, training: bool) -> bool:
        return True

    def values(self, student_out, teacher_out, batch, adapted) -> TermValues:
        logits, mask = student_out.logits, labelled(batch, self.task)
        if "labels" not in batch:  # unlabelled evaluation data: no item, no value
            return TermValues(logits.new_zeros(mask.shape, dtype=torch.float32), mask, "labelled")
        labels = batch["labels"]
        if self.task == SEQ_CLS:
            if self.regression:
                values = (logits.float().squeeze(-1) - labels.float().nan_to_num()).pow(2)
                return TermValues(values, mask, "labelled")
            values = F.cross_entropy(
                logits.float(), labels.clamp(min=0), reduction="none", label_smoothing=self.smoothing
            )
            return TermValues(values, mask, "labelled")
        shifted = labels[:, 1:].clamp(min=0)  # -100 rows are masked; clamp keeps the gather valid
        values = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), shifted, reduction="none", label_smoothing=self.smoothing
        )
        return TermValues(values, mask, "labelled")


def label_term(weight: float) -> Term:
    return Term("labels", "ce", weight)
