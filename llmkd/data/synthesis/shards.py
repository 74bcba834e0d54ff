"""Shard files of a synthesis run (see llmkd.data.synthesis.io for the run's layout and resume logic).

A shard, shard-00000.jsonl, holds the rows of one range of sample indices, one JSON object a line.
`fill_shard` takes produced batches into one shard under a token budget (updating the progress bar),
`write_shard` writes it atomically, `read_rows` reads recorded shards back and checks them, and `fit_rows`
applies a token budget to rows already written (the multi-process merge)."""

from __future__ import annotations

import json
import os
import time

from llmkd.atomic import atomic_write, remove_leftovers


def shard_path(output_dir: str, index: int) -> str:
    return os.path.join(output_dir, f"shard-{index:05d}.jsonl")


def fit_rows(rows: list[dict], budget: int, counter) -> tuple[int, int]:
    """(rows kept, their tokens): the longest prefix of rows whose `counter` tokens fit the budget."""
    kept = tokens = 0
    for row in rows:
        if tokens + counter(row) > budget:
            break
        kept, tokens = kept + 1, tokens + counter(row)
    return kept, tokens


def fill_shard(batches, budget, counter, bar, meter) -> tuple[list[dict], int, bool]:
    """(rows, tokens, budget exhausted) of one shard's batches; rows are kept in order while they fit."""
    rows, tokens, exhausted = [], 0, False
    for batch in batches:
        for row in batch:
            needed = counter(row)
            if budget is not None and tokens + needed > budget:
                exhausted = True
                break
            rows.append(row)
            tokens += needed
        _tick(bar, meter, len(batch), sum(counter(r) for r in batch))
        # Every row has at least one token, so a spent budget cannot take another row.
        if exhausted or (budget is not None and tokens >= budget):
            return rows, tokens, True
    return rows, tokens, False


def _tick(bar, meter, rows: int, tokens: int) -> None:
    meter["rows"] += rows
    meter["tokens"] += tokens
    elapsed = max(time.perf_counter() - meter["start"], 1e-9)
    bar.update(rows)
    bar.set_postfix(
        samples_per_s=f"{meter['rows'] / elapsed:.2f}", tokens_per_s=f"{meter['tokens'] / elapsed:.1f}"
    )


def write_shard(output_dir: str, index: int, rows: list[dict]) -> None:
    """Written to a temporary file, flushed to disk and renamed: a killed run leaves the whole shard or none."""
    lines = [json.dumps(row) + "\n" for row in rows]
    atomic_write(shard_path(output_dir, index), lambda handle: handle.writelines(lines))


def remove_temporaries(output_dir: str) -> None:
    """Deletes what killed writers left: llmkd.atomic's `.NAME.XXXX.tmp` files and older `shard-*.jsonl.tmp` ones.
    Only call it when no process of the run writes any more (the final save)."""
    remove_leftovers(output_dir, also=lambda name: name.startswith("shard-"))


def read_rows(output_dir: str, progress: dict) -> list[dict]:
    """Every row of the recorded shards, in sample-index order; a damaged folder fails loudly."""
    rows = []
    for shard in progress["shards"]:
        with open(shard_path(output_dir, shard["index"]), encoding="utf-8") as handle:
            shard_rows = [json.loads(line) for line in handle if line.strip()]
        written = shard.get("written", shard["rows"])  # a merge may keep only a prefix (token budget)
        if len(shard_rows) != written:
            raise ValueError(
                f"{shard_path(output_dir, shard['index'])} has {len(shard_rows)} rows, progress.json says "
                f"{written}; the folder was modified, start again in a new output_dir"
            )
        rows.extend(shard_rows[: shard["rows"]])
    indices = [row["sample_index"] for row in rows]
    if any(b <= a for a, b in zip(indices, indices[1:])):
        raise ValueError(
            f"sample indices in {output_dir} are not strictly increasing: duplicated or reordered rows"
        )
    return rows
