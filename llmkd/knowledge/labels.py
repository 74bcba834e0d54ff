"""The task loss on gold labels, as one more term of the mix (weight `hard_label_weight`, logged as `loss_ce`).

Classifiers: cross-entropy per example (with `label_smoothing_factor`, as transformers' Trainer applies it);
regression (num_labels = 1): squared error of the score. Causal LMs: cross-entropy per next-token target.
"""

from __future__ import annotations

import torch.nn.functional as F

from llmkd.knowledge.base import Knowledge, Pair, Term, TermValues
from llmkd.knowledge.counts import targets
from llmkd.losses import Loss
from llmkd.modeling import SEQ_CLS


class LabelKnowledge(Knowledge):
    kind = "labels"
    needs = frozenset()  # the student's logits and the batch's labels only
    count = "targets"

    def __init__(self, term: Term, pair: Pair, index: int = 0):
        self.term, self.index, self.name = term, index, "loss_ce"
        self.loss = Loss(F.cross_entropy)
        self.task, self.regression = pair.task, pair.regression
        self.smoothing = float(pair.args.label_smoothing_factor)

    def needs_full_logits(self, training: bool) -> bool:
        return True

    def values(self, student_out, teacher_out, batch, adapted) -> TermValues:
        labels, logits = batch["labels"], student_out.logits
        if self.task == SEQ_CLS:
            if self.regression:
                return TermValues((logits.float().squeeze(-1) - labels.float()).pow(2), None, "targets")
            values = F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=self.smoothing)
            return TermValues(values, None, "targets")
        mask = targets(batch, self.task)
        shifted = labels[:, 1:].clamp(min=0)  # -100 rows are masked below; clamp keeps the gather valid
        values = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), shifted, reduction="none", label_smoothing=self.smoothing
        )
        return TermValues(values, mask, "targets")


def label_term(weight: float) -> Term:
    return Term("labels", "ce", weight)
