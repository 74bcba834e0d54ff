"""What counts as one supervised item: the masks behind the count kinds that normalise every term.

Each function maps a batch to a (B, ...) bool mask of its counted items; a term's value is a masked sum divided by
the number of its kind's items in the whole gradient-accumulation window (summed over processes). Labels come
from the collator (llmkd.data.collate): -100 marks what is not a target; positions past a row's end are masked.
"""

from __future__ import annotations

import torch

from llmkd.modeling import CAUSAL_LM, INPUT_COLUMNS

Tensor = torch.Tensor


def main_tensor(batch: dict) -> Tensor:
    """The student's main input of a batch (token ids, audio samples or features, or pixels)."""
    for key in INPUT_COLUMNS:
        if key in batch:
            return batch[key]
    raise KeyError(f"the batch has none of the input columns {INPUT_COLUMNS} (it has {sorted(batch)})")


def examples(batch: dict, task: str) -> Tensor:
    """(B,) all true: one item per example (classifiers, relation terms)."""
    main = main_tensor(batch)
    return torch.ones(main.shape[0], dtype=torch.bool, device=main.device)


def tokens(batch: dict, task: str) -> Tensor:
    """(B, T) real positions of the student's input: the attention mask (all of them without one)."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return mask.bool()
    main = main_tensor(batch)
    return torch.ones(main.shape[:2], dtype=torch.bool, device=main.device)


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
