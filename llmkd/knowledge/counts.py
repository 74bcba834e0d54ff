"""What counts as one supervised item: the masks behind the count kinds that normalise every term.

Each function maps a batch to a (B, ...) bool mask of its counted items; a term's value is a masked sum divided by
the number of its kind's items in the whole gradient-accumulation window (summed over processes). Labels come
from the collator (llmkd.data.collate): -100 marks what is not a target; positions past a row's end are masked.
"""

from __future__ import annotations

import torch

from llmkd.modeling import CAUSAL_LM

Tensor = torch.Tensor


def examples(batch: dict, task: str) -> Tensor:
    """(B,) all true: one item per example (classifiers, relation terms)."""
    ids = batch["input_ids"]
    return torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)


def tokens(batch: dict, task: str) -> Tensor:
    """(B, T) real tokens: the attention mask."""
    mask = batch.get("attention_mask")
    return mask.bool() if mask is not None else torch.ones_like(batch["input_ids"], dtype=torch.bool)


def targets(batch: dict, task: str) -> Tensor:
    """Positions that carry a prediction: (B,) examples for classifiers; (B, T-1) next-token targets for causal
    LMs (position t predicts token t+1; a -100 label or a padded position is no target)."""
    if task != CAUSAL_LM:
        return examples(batch, task)
    real = tokens(batch, task)[:, 1:]
    labels = batch.get("labels")
    return real if labels is None else real & (labels[:, 1:] != -100)


COUNTS = {"examples": examples, "tokens": tokens, "targets": targets}


def per_example(mask: Tensor) -> Tensor:
    """(B,) number of counted items of each example, as float32."""
    return mask.flatten(1).sum(1).float() if mask.dim() > 1 else mask.float()
