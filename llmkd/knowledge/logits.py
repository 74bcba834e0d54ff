"""Response knowledge: the teacher's output distribution (soft targets; Hinton, Vinyals & Dean 2015, arXiv 1503.02531).

Classifiers compare one (C,) distribution per example; causal LMs one (V,) distribution per next-token target
(position t predicts token t+1). Three ways to get a causal LM's value, all equal to the plain loss:

- plain: ``LOSSES["logits"][name]`` on the (B, T-1, V) logits;
- fused (training only, when every term can do without the student's full logits): the loss computed chunk by
  chunk from the last hidden states and both lm_heads, never forming (B, T, V) (llmkd.losses.kernels) — only for
  models whose logits are exactly lm_head(last hidden state) (llmkd.students.heads.head_mismatch decides);
- bucketed: from a top-k teacher-logit cache (llmkd.losses.bucketed; exact on the k + 1 buckets).

Soft-target losses are multiplied by T² so their gradients keep their scale when T changes (Hinton §2).
"""

from __future__ import annotations

import logging

import torch

from llmkd.knowledge.base import Knowledge, Pair, Term, TermValues
from llmkd.knowledge.counts import targets
from llmkd.losses import fused_logit_distillation
from llmkd.losses.bucketed import RAW_LOGIT_LOSSES, bucketed_logit_loss
from llmkd.modeling import SEQ_CLS, output_head

logger = logging.getLogger(__name__)
Tensor = torch.Tensor


class LogitKnowledge(Knowledge):
    kind = "logits"
    needs = frozenset({"logits"})
    count = "targets"

    def __init__(self, term: Term, pair: Pair, index: int = 0):
        super().__init__(term, pair, index)
        self.task, self.regression = pair.task, pair.regression
        self.temperature_value = self.temperature(pair.args)
        self.scale = self.temperature_value**2 if self.loss.soft_target else 1.0
        self.vocab_rows = pair.vocab_rows
        self.chunk_size = pair.args.logit_chunk_size
        self.cached = "topk" in pair.source.provides
        self.fused = False  # set by the trainer once it knows no other term needs the full logits
        if self.cached and term.loss in RAW_LOGIT_LOSSES:
            raise ValueError(
                f"logit loss {term.loss!r} compares raw logits, which a top-k teacher cache does not keep; use a "
                "KL/JSD-type loss (forward_kl, reverse_kl, jsd, …)"
            )
        if self.regression and term.loss != "mse":
            logger.warning(
                "regression task (num_labels=1): the %s term is computed as MSE on the scores", term.loss
            )
        self._heads = (pair.student, getattr(pair.source, "model", None))

    @classmethod
    def probe(cls):
        return torch.randn(2, 3), torch.randn(2, 3)

    def needs_full_logits(self, training: bool) -> bool:
        return not (training and self.fused)

    def values(self, student_out, teacher_out, batch, adapted) -> TermValues:
        logits = student_out.logits
        if self.task == SEQ_CLS:
            return self._classifier(logits, teacher_out.logits)
        if self.fused and logits.shape[1] == 1 < batch["input_ids"].shape[1]:
            return self._fused(student_out, teacher_out, batch)
        mask = targets(batch, self.task)
        T, params = self.temperature_value, self.term.params
        if self.cached:  # unsliced logits: the causal shift is applied to the values
            top = teacher_out.topk
            values = bucketed_logit_loss(
                logits, top.ids, top.logprobs, top.rest, loss=self.term.loss, temperature=T, **params
            )[:, :-1]
        else:
            rows = slice(self.vocab_rows)  # padded vocabularies: the shared rows only
            s, t = logits[:, :-1, rows], teacher_out.logits[:, :-1, rows]
            values = self.loss(s, t, temperature=T, **params)
        return TermValues(values * self.scale, mask, "targets")

    def _classifier(self, student_logits: Tensor, teacher_logits: Tensor) -> TermValues:
        if self.regression:  # a regression "logit" is a score: match it directly
            values = (student_logits.float() - teacher_logits.float()).pow(2).mean(-1)
            return TermValues(values, None, "targets")
        values = self.loss(
            student_logits, teacher_logits, temperature=self.temperature_value, **self.term.params
        )
        return TermValues(values * self.scale, None, "targets")

    def _fused(self, student_out, teacher_out, batch) -> TermValues:
        """The masked SUM over the batch's targets, from hidden states and heads (the trainer divides)."""
        student, teacher = self._heads
        s_head, t_head = output_head(student), output_head(teacher)
        rows = slice(self.vocab_rows)
        h_s = student_out.hidden_states[-1][:, :-1].flatten(0, 1)  # the causal shift
        h_t = teacher_out.hidden_states[-1][:, :-1].flatten(0, 1)
        total = fused_logit_distillation(
            h_s,
            s_head.weight[rows],
            h_t,
            t_head.weight[rows],
            loss=self.term.loss,
            temperature=self.temperature_value,
            mask=targets(batch, self.task).flatten(),
            num_items=1,
            chunk_size=self.chunk_size,
            student_head_bias=None if s_head.bias is None else s_head.bias[rows],
            teacher_head_bias=None if t_head.bias is None else t_head.bias[rows],
            **self.term.params,
        )
        return TermValues(total * self.scale, None, "targets")


def agreement(student_logits: Tensor, teacher_out, batch: dict, task: str, vocab_rows: int | None) -> Tensor:
    """(B,) number of targets where the student's argmax is the teacher's (classifiers: 0/1 per example)."""
    if task == SEQ_CLS:
        return (student_logits.argmax(-1) == teacher_out.predictions()).float()
    student_ids = student_logits[:, :-1, slice(vocab_rows)].argmax(-1)  # the causal shift
    teacher_ids = teacher_out.predictions(vocab_rows)[:, :-1]
    return ((student_ids == teacher_ids) & targets(batch, task)).sum(-1).float()
