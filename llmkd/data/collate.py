"""The one padder and the one pad-id rule of llmkd.

Training batches are right-padded, so a row keeps positions 0..n-1 whatever its neighbours (models without
explicit position ids would otherwise see a left-padded row at other positions). Labels of plain causal-LM text
come from the attention mask, never from comparing ids with the pad id: with a tokenizer whose pad token is its
EOS that comparison would mask every real EOS, and the student would never learn to stop.

- :func:`padding_id`: the id written into padded slots (masked everywhere, so any valid id works);
- :func:`pad_rows`: rows of token lists -> right- (or left-) padded tensors, with attention masks;
- :func:`pad_signals`: rows of audio samples, audio features or pixels -> right-padded float tensors, with
  attention masks when the lengths differ (each row's values were computed alone; a model that normalises over
  the padded length, such as wav2vec 2.0 with group norm, still sees the padding);
- :class:`DistillationCollator`: the collator every llmkd trainer uses by default (classifier rows, plain LM text,
  prompt/completion rows, and the teacher's own token stream under the ``teacher_`` prefix);
- :class:`RightPadded`: wraps any other collator so its batches are right-aligned and plain-LM labels come from
  the mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DataCollatorForLanguageModeling

IGNORE_INDEX = -100
# Inputs that are not token ids: raw audio (T,), audio features (T, D) with time first, pixels (C, H, W).
SIGNAL_COLUMNS = ("input_values", "input_features", "pixel_values")
# Fill values of the padded slots by column; token-id columns take the pad id.
FILL = {"attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX, "special_tokens_mask": 1}
TOKEN_COLUMNS = ("input_ids",)


def padding_id(tokenizer, config=None) -> int:
    """The model config's pad id, else the tokenizer's pad id, else its EOS id, else 0.

    Padded slots are masked for every term, but decoder classifiers (Llama, GPT-2, … *ForSequenceClassification)
    pool their last token by comparing ids with ``config.pad_token_id``: any other pad id would make them pool a
    padded slot. So the model's own pad id comes first.
    """
    candidates = (getattr(config, "pad_token_id", None), getattr(tokenizer, "pad_token_id", None))
    for value in (*candidates, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            return int(value)
    return 0


def _width(lengths: Sequence[int], multiple: int | None) -> int:
    width = max(lengths, default=0)
    return -(-width // multiple) * multiple if multiple else width


def pad_rows(
    rows: Sequence[dict],
    pad_id: int,
    *,
    prefix: str = "",
    side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pads the ``{prefix}*`` sequence columns of `rows` (lists of ints, as long as ``{prefix}input_ids``).

    Returns (B, L) long tensors: ``input_ids`` filled with `pad_id`, ``attention_mask`` (built from the row lengths
    when the rows have none) with 0, ``labels`` with -100, other sequence columns with 0. Keys keep the prefix.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    ids_key = f"{prefix}input_ids"
    lengths = [len(row[ids_key]) for row in rows]
    width = _width(lengths, pad_to_multiple_of)
    keys = [k for k in rows[0] if _in_stream(k, prefix) and _is_sequence(rows[0][k], lengths[0])]
    mask_key = f"{prefix}attention_mask"
    out = {}
    for key in [*keys, *([mask_key] if mask_key not in keys else [])]:
        column = key[len(prefix) :]
        fill = pad_id if column in TOKEN_COLUMNS else FILL.get(column, 0)
        batch = torch.full((len(rows), width), fill, dtype=torch.long)
        for i, (row, n) in enumerate(zip(rows, lengths)):
            values = torch.as_tensor(row[key] if key in row else _missing(row, ids_key, column, fill))
            (batch[i, :n] if side == "right" else batch[i, width - n :]).copy_(values)
        out[key] = batch
    return out


def pad_signals(
    rows: Sequence[dict], prefix: str = "", padding_value: float = 0.0
) -> dict[str, torch.Tensor]:
    """Right-pads the ``{prefix}`` signal column of `rows` along its first (time) axis.

    Returns the (B, T_max, ...) float32 column and, when the rows differ in length (or carry one), the (B, T_max)
    long ``{prefix}attention_mask`` (1 on real frames). Rows of equal shape without a mask are stacked as they are
    (images, fixed-length features). Raises ValueError when rows differ in more than the first axis."""
    key = next(f"{prefix}{c}" for c in SIGNAL_COLUMNS if f"{prefix}{c}" in rows[0])
    values = [torch.as_tensor(row[key], dtype=torch.float32) for row in rows]
    shapes = {tuple(v.shape[1:]) for v in values}
    if len(shapes) > 1:
        raise ValueError(f"{key}: rows differ in more than their length: shapes {sorted(shapes)}")
    lengths = [v.shape[0] for v in values]
    mask_key = f"{prefix}attention_mask"
    if len(set(lengths)) == 1 and mask_key not in rows[0]:
        return {key: torch.stack(values)}
    batch = torch.full((len(rows), max(lengths), *values[0].shape[1:]), padding_value, dtype=torch.float32)
    mask = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    for i, (v, n) in enumerate(zip(values, lengths)):
        batch[i, :n] = v
        mask[i, :n] = torch.as_tensor(rows[i][mask_key])[:n] if mask_key in rows[i] else 1
    return {key: batch, mask_key: mask}


def _missing(row: dict, ids_key: str, column: str, fill: int) -> list[int]:
    """A column one row lacks: a full attention mask, its ids as plain-LM labels, else the fill value."""
    n = len(row[ids_key])
    if column == "attention_mask":
        return [1] * n
    return list(row[ids_key]) if column == "labels" else [fill] * n


# Column prefixes of other token streams: a teacher's own tokenisation ("teacher_"), each ensemble member's
# ("teacher@<name>.", llmkd.teachers.ensemble, which writes each member's pad id into the padded slots).
STREAMS = ("teacher_", "teacher@")


def member_streams(row: dict) -> list[str]:
    """The ``teacher@<name>.`` prefixes of the ensemble members' own token streams in a row."""
    return sorted(
        k.removesuffix("input_ids") for k in row if k.startswith("teacher@") and k.endswith(".input_ids")
    )


def _in_stream(key: str, prefix: str) -> bool:
    if prefix:
        return key.startswith(prefix)
    return not key.startswith(STREAMS)


def _is_sequence(value, length: int) -> bool:
    return isinstance(value, (list, tuple, torch.Tensor)) and len(value) == length


def lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Plain causal-LM labels: the ids on real tokens, -100 on padding (from the mask, not the pad id)."""
    return torch.where(attention_mask.bool(), input_ids, IGNORE_INDEX)


@dataclass
class DistillationCollator:
    """Right-pads each token stream of a batch and turns the other columns into tensors.

    Streams: the student's (no prefix) and, when present, the teacher's own inputs (``teacher_`` prefix, for
    teachers with another tokenizer or another modality: llmkd.data.paired). Token streams are padded with the
    pad id, signal streams (audio, features, pixels) by `pad_signals` with the processor's padding value. Classifier rows: ``label`` becomes ``labels``. Causal-LM rows without labels
    get labels from the attention mask; rows with labels (prompt/completion: -100 on the prompt) keep them.
    Scalar columns (``prompt_length``, ``cache_index``, …) become (B,) tensors; strings are dropped.
    """

    tokenizer: Any = None
    causal_lm: bool = False
    teacher_tokenizer: Any = None
    pad_to_multiple_of: int | None = None
    config: Any = None  # the student's config (its pad id wins, see padding_id)
    teacher_config: Any = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        features = [dict(f) for f in features]
        batch = {}
        streams = (
            ("", self.tokenizer, self.config),
            ("teacher_", self.teacher_tokenizer, self.teacher_config),
            *((prefix, None, None) for prefix in member_streams(features[0])),
        )
        for prefix, tokenizer, config in streams:
            if any(f"{prefix}{c}" in features[0] for c in SIGNAL_COLUMNS):
                batch |= pad_signals(features, prefix, float(getattr(tokenizer, "padding_value", 0.0) or 0.0))
                continue
            if f"{prefix}input_ids" not in features[0]:
                continue
            pad_id = padding_id(tokenizer, config)
            padded = pad_rows(features, pad_id, prefix=prefix, pad_to_multiple_of=self.pad_to_multiple_of)
            if self.causal_lm and f"{prefix}labels" not in padded:
                padded[f"{prefix}labels"] = lm_labels(
                    padded[f"{prefix}input_ids"], padded[f"{prefix}attention_mask"]
                )
            batch |= padded
        for key, value in features[0].items():
            if key in batch or value is None or isinstance(value, (str, list, tuple)):
                continue
            if getattr(value, "ndim", 0) > 0:  # tensors and arrays of other columns
                continue
            batch["labels" if key == "label" else key] = torch.tensor([f[key] for f in features])
        return batch


def right_align(batch: dict) -> dict:
    """Moves left-padded rows to the right (ids, masks, labels alike), so every row starts at position 0."""
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or not mask.numel():
        return batch
    leading = (mask.cumsum(-1) == 0).sum(-1)  # padded slots before the first real token
    if not bool(leading.any()):
        return batch
    width = mask.shape[1]
    order = (torch.arange(width).unsqueeze(0) + leading.unsqueeze(1)) % width
    for key, value in list(batch.items()):
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == mask.shape:
            batch[key] = value.gather(1, order.view(*order.shape, *[1] * (value.dim() - 2)).expand_as(value))
    return batch


@dataclass
class RightPadded:
    """Any collator, made to follow llmkd's padding contract (see the module docstring).

    Rows it left-pads are moved right, and padded slots hold `pad_id` (the model's, see `padding_id`). For a
    `transformers.DataCollatorForLanguageModeling` (plain causal LM, which masks every token equal to the pad id),
    labels are recomputed from the attention mask.
    """

    collator: Callable
    pad_id: int | None = None

    def __call__(self, features):
        batch = right_align(dict(self.collator(features)))
        if self.pad_id is not None and "attention_mask" in batch and "input_ids" in batch:
            batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, self.pad_id)
        inner = self.collator
        # Exactly transformers' class: a subclass may mask labels on purpose (a completion-only loss).
        plain_lm = type(inner) is DataCollatorForLanguageModeling and not inner.mlm
        if plain_lm and "labels" in batch and "attention_mask" in batch:
            batch["labels"] = lm_labels(batch["input_ids"], batch["attention_mask"])
        return batch
