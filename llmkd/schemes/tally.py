"""Logged numbers as sums and counts: every metric is Σ values / Σ items over everything it covers.

Training: each micro-batch adds its local sum and item count; at logging time both are summed over processes and
divided once, so a logged term is the value over every item since the last log (never a mean of per-batch
means). Evaluation: each batch's per-example sums and counts are gathered with `gather_for_metrics`, which drops
the samples a distributed sampler repeats to even out the last batch, so the result is the value over the
dataset's items exactly.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


class Tally:
    """name -> running (sum, count) per split, kept on the device until flushed: "train" (since the last log),
    "run" (since training started: `train_loss`) and "eval"."""

    def __init__(self):
        self.store: dict[str, dict[str, Tensor]] = {"train": {}, "run": {}, "eval": {}}

    def add(self, split: str, name: str, total: Tensor, count: Tensor) -> None:
        pair = torch.stack([total.detach().float().reshape(()), count.detach().float().reshape(())])
        store = self.store[split]
        store[name] = store[name] + pair.to(store[name].device) if name in store else pair

    def add_per_example(self, split: str, columns: dict[str, tuple[Tensor, Tensor]], gather) -> None:
        """`columns`: name -> ((B,) sums, (B,) counts); `gather` is accelerate's gather_for_metrics."""
        if not columns:
            return
        names = list(columns)
        table = torch.stack([t.float() for name in names for t in columns[name]], dim=1)  # (B, 2·M)
        table = gather(table).sum(0)
        for i, name in enumerate(names):
            self.add(split, name, table[2 * i], table[2 * i + 1])

    def reset(self, split: str) -> None:
        self.store[split] = {}

    def flush(self, split: str, reduce=None) -> dict[str, float]:
        """{name: Σ sum / Σ count}; `reduce` sums the (sum, count) pairs over processes first. Clears the split."""
        store, self.store[split] = self.store[split], {}
        if not store:
            return {}
        names = sorted(store)
        stacked = torch.stack([store[n] for n in names])
        if reduce is not None:
            stacked = reduce(stacked)
        # A name without items (the task loss on unlabelled data) has no value: it is left out, not logged as 0.
        return {n: _six_digits((s / c).item()) for n, (s, c) in zip(names, stacked) if c > 0}


def _six_digits(value: float) -> float:
    """Six significant digits: readable logs without losing small values (1e-5 stays 1e-5, not 0)."""
    return float(f"{value:.6g}")


def per_example_sums(values: Tensor, mask: Tensor | None, batch_size: int) -> Tensor:
    """(B,) Σ of each example's counted values (values broadcast to the mask; masked entries may be NaN)."""
    if mask is not None:
        values = torch.where(
            torch.broadcast_to(mask.to(values.device) != 0, values.shape), values.float(), 0.0
        )
    values = values.float()
    if values.dim() == 0:
        return values.expand(batch_size)
    return values.flatten(1).sum(1) if values.dim() > 1 else values
