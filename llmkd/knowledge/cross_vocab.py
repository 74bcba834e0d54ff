"""Response knowledge across tokenizers: ULD on positions aligned between the two tokenisations of each example.

Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs",
arXiv 2402.12030. Every example is tokenised by both tokenizers (`teacher_*` columns, read by a teacher source
with the ``teacher_`` prefix); the i-th completion target of the student is paired with the i-th of the teacher,
for the first min(n_S, n_T) targets of the example (the paper's alignment). Nothing else is aligned, so pairs
drift apart where the tokenizers split text differently: the loss matches the confidence profile of the teacher's
predictions at roughly the same place, and the student's cross-entropy on its own tokens carries their identity.
The value is normalised by the window's aligned pairs (count kind "aligned"); no T² factor.
"""

from __future__ import annotations

import torch

from llmkd.knowledge.base import Knowledge, Pair, Term, TermValues
from llmkd.losses.cross_vocab import uld_loss_chunked

Tensor = torch.Tensor


def aligned_targets(student_labels: Tensor, teacher_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Masks (B, T_S − 1), (B, T_T − 1) over the shifted positions pairing the i-th targets of each row.

    Position t predicts token t + 1 (the causal shift); of each row's n_S and n_T supervised targets the first
    min(n_S, n_T) are kept, so ``s_logits[s_mask]`` and ``t_logits[t_mask]`` line up row by row.
    """
    s_mask, t_mask = student_labels[:, 1:] != -100, teacher_labels[:, 1:] != -100
    n = torch.minimum(s_mask.sum(1), t_mask.sum(1)).unsqueeze(1)
    return s_mask & (s_mask.cumsum(1) <= n), t_mask & (t_mask.cumsum(1) <= n)


def aligned(batch: dict, task: str) -> Tensor:
    """(B, T_S − 1) the student's aligned targets: the items ULD is normalised by."""
    return aligned_targets(batch["labels"], batch["teacher_labels"])[0]


class CrossVocabKnowledge(Knowledge):
    kind = "cross_vocab"
    needs = frozenset({"logits"})
    count = "aligned"
    counts = {"aligned": aligned}

    def __init__(self, term: Term, pair: Pair, index: int = 0):
        super().__init__(term, pair, index)
        if getattr(pair.source, "input_prefix", "") != "teacher_":
            raise ValueError(
                "cross_vocab (ULD) terms need the teacher to read its own tokenisation of each example (teacher_* "
                "columns): use `trainer: cross_tokenizer` (llmkd.schemes.CrossTokenizerTrainer)"
            )
        self.temperature_value = self.temperature(pair.args)
        self.chunk_size = getattr(pair.args, "uld_chunk_size", 1024)

    @classmethod
    def probe(cls):
        return torch.randn(2, 3), torch.randn(2, 5)

    def values(self, student_out, teacher_out, batch, adapted) -> TermValues:
        s_mask, t_mask = aligned_targets(batch["labels"], batch["teacher_labels"])
        s = student_out.logits[:, :-1][s_mask]  # (N, V_S): only aligned rows reach the softmax and sort
        t = teacher_out.logits[:, :-1][t_mask]  # (N, V_T)
        values = uld_loss_chunked(s, t, temperature=self.temperature_value, chunk_size=self.chunk_size)
        per_position = values.new_zeros(s_mask.shape).masked_scatter(s_mask, values)  # back to (B, T_S − 1)
        return TermValues(per_position, s_mask, "aligned")
