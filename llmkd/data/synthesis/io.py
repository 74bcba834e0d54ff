"""Resumable synthesis output: JSONL shards, progress.json, then an Arrow dataset and provenance.json.

Layout of output_dir:
  progress.json        the run's settings fingerprint, with a content hash of every model / tokenizer folder
                       (`content_keyed`), and the shards written so far (rewritten atomically)
  shard-00000.jsonl    rows of sample indices [0, shard_size), shard-00001.jsonl the next range, ...
  dataset/             the final `datasets` dataset (`datasets.load_from_disk`)
  provenance.json      who generated it, how, with what budgets and filter statistics

A shard is written to a temporary file and renamed, and only then recorded in progress.json; a run killed in
between rewrites the same shard (same sample indices, same per-sample seeds, same rows), so nothing is ever
duplicated or skipped. The shard files themselves are written, read back and checked by
llmkd.data.synthesis.shards; this module keeps the run's progress records, the merge and the final dataset.

Under N processes (torchrun / accelerate launch, torch.distributed initialised), process r writes shards
r, r + N, r + 2N, ... and records them in progress-rank-0000r.json; after a barrier the main process merges
every rank's record into progress.json (with the world size) and alone writes dataset/ and provenance.json.
A shard is the same batches of the same sample indices whichever process writes it, so the merged dataset
equals a one-process run's, and a resume (with any number of processes) skips every shard recorded anywhere."""

from __future__ import annotations

import datetime
import glob
import json
import logging
import os
import shutil
import time

import datasets
import torch
import transformers
from tqdm.auto import tqdm

from llmkd import __version__
from llmkd.atomic import write_json
from llmkd.content import content_keyed
from llmkd.data.synthesis.common import SEEDING
from llmkd.data.synthesis.shards import fill_shard, fit_rows, read_rows, remove_temporaries, write_shard

logger = logging.getLogger(__name__)
PROGRESS = "progress.json"
PROVENANCE = "provenance.json"
DATASET = "dataset"


def process_group() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed run, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if process_group()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def _rank_path(output_dir: str, rank: int) -> str:
    return os.path.join(output_dir, f"progress-rank-{rank:05d}.json")


def _rank_files(output_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(output_dir), "progress-rank-*.json")))


def _sharded(output_dir: str) -> bool:
    """Whether this run (or the one it resumes) writes per-process progress files."""
    return process_group()[1] > 1 or bool(_rank_files(output_dir))


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _check_fingerprint(output_dir: str, saved: dict, fingerprint: dict) -> None:
    differing = differing_keys(saved, fingerprint)
    if differing:
        details = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, a, b in differing)
        raise ValueError(
            f"cannot resume into {output_dir}: its run used different settings or model files ({details}). "
            "Use the saved settings and models to resume, or a new output_dir"
        )


def _fresh(fingerprint: dict) -> dict:
    blank = {"shards": [], "rows": 0, "tokens": 0, "complete": False}
    return {"fingerprint": fingerprint, **blank, "started_at": _now()}


def _refuse_foreign(output_dir: str) -> None:
    # Every process writes its progress file before its first shard, so shards without one are foreign.
    if os.path.isdir(output_dir) and any(n.startswith("shard-") for n in os.listdir(output_dir)):
        raise ValueError(
            f"{output_dir} has shard files but no {PROGRESS}; it was not written by this run. "
            "Use an empty output_dir"
        )


def open_run(output_dir: str, fingerprint: dict) -> dict:
    """The saved progress of output_dir, or a fresh one; refuses a folder written with other settings or from
    other model / tokenizer files (`content_keyed`) — a finished dataset too, so it is never served stale.

    Under several processes: the merged progress.json once it is complete, else this rank's own record."""
    fingerprint = json.loads(json.dumps(content_keyed(fingerprint), default=str))  # as it reads back
    path = os.path.join(output_dir, PROGRESS)
    if _sharded(output_dir):
        return _open_rank(output_dir, fingerprint, path)
    if not os.path.exists(path):
        _refuse_foreign(output_dir)
        progress = _fresh(fingerprint)
        write_json(path, progress)
        return progress
    progress = _read_json(path)
    _check_fingerprint(output_dir, progress["fingerprint"], fingerprint)
    return progress


def _open_rank(output_dir: str, fingerprint: dict, merged_path: str) -> dict:
    existing = ([merged_path] if os.path.exists(merged_path) else []) + _rank_files(output_dir)
    records = {p: _read_json(p) for p in existing}
    for record in records.values():
        _check_fingerprint(output_dir, record["fingerprint"], fingerprint)
    if records.get(merged_path, {}).get("complete"):
        return records[merged_path]
    own = _rank_path(output_dir, process_group()[0])
    if own in records:
        return records[own]
    if not records:
        _refuse_foreign(output_dir)
    progress = _fresh(fingerprint)
    write_json(own, progress)
    return progress


def differing_keys(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, current value) for every setting that differs."""
    flat_saved, flat_current = _flatten(saved), _flatten(current)
    keys = sorted(set(flat_saved) | set(flat_current))
    return [
        (k, flat_saved.get(k), flat_current.get(k)) for k in keys if flat_saved.get(k) != flat_current.get(k)
    ]


def _flatten(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_shards(
    output_dir: str,
    fingerprint: dict,
    produce,
    *,
    shard_size: int,
    num_samples: int | None = None,
    max_total_tokens: int | None = None,
    row_tokens=None,
    progress_bar: bool = True,
    desc: str = "synthesis",
) -> dict:
    """Writes shard after shard until a budget is met, skipping shards already written; returns progress.

    produce(indices) yields batches: lists of row dicts, one per sample index, in index order. With
    max_total_tokens, rows are kept in index order while their `row_tokens` fit the budget; the first row
    that does not fit ends the run (it is not truncated)."""
    if num_samples is None and max_total_tokens is None:
        raise ValueError("no budget: set num_samples, max_total_tokens or both")
    fingerprint = content_keyed(fingerprint)  # once: the merge records it as open_run does
    if _sharded(output_dir):
        return _run_rank_shards(
            output_dir,
            fingerprint,
            produce,
            shard_size,
            num_samples,
            max_total_tokens,
            row_tokens,
            progress_bar,
            desc,
        )
    progress = open_run(output_dir, fingerprint)
    counter = row_tokens or (lambda row: 0)
    bar = tqdm(
        total=num_samples, initial=progress["rows"], unit="sample", desc=desc, disable=not progress_bar
    )
    meter = {"start": time.perf_counter(), "rows": 0, "tokens": 0}
    try:
        while not progress["complete"]:
            index = len(progress["shards"])
            first = index * shard_size
            last = first + shard_size if num_samples is None else min(first + shard_size, num_samples)
            budget = None if max_total_tokens is None else max_total_tokens - progress["tokens"]
            rows, tokens, exhausted = fill_shard(produce(range(first, last)), budget, counter, bar, meter)
            progress["complete"] = exhausted or last == num_samples
            _store_shard(
                output_dir, progress, (index, first, rows, tokens), os.path.join(output_dir, PROGRESS)
            )
    finally:
        bar.close()
    return progress


def _store_shard(output_dir: str, progress: dict, shard: tuple, progress_path: str) -> None:
    """Writes one shard's rows, then records it in `progress` (saved to progress_path): the shard exists first."""
    index, first, rows, tokens = shard
    write_shard(output_dir, index, rows)
    progress["shards"].append({"index": index, "first": first, "rows": len(rows), "tokens": tokens})
    progress["rows"] += len(rows)
    progress["tokens"] += tokens
    write_json(progress_path, progress | {"updated_at": _now()})


def _run_rank_shards(
    output_dir,
    fingerprint,
    produce,
    shard_size,
    num_samples,
    max_total_tokens,
    row_tokens,
    progress_bar,
    desc,
) -> dict:
    """This rank's shards (index = rank mod world), a barrier, then the main process merges; returns the merge."""
    if num_samples is None:
        raise ValueError(
            "several processes need a sample budget to split: set num_samples (max_total_tokens may stay and is "
            "applied when the shards are merged), or run in one process"
        )
    rank, world = process_group()
    progress = open_run(output_dir, fingerprint)
    if progress.get("complete"):
        return progress  # already merged (and maybe saved)
    done = {s["index"] for s in _recorded_shards(output_dir)}
    total = -(-num_samples // shard_size)
    mine = [i for i in range(rank, total, world) if i not in done]
    counter = row_tokens or (lambda row: 0)
    bar = tqdm(
        total=len(mine) * shard_size,
        unit="sample",
        desc=f"{desc} [rank {rank}/{world}]",
        disable=not progress_bar or rank,
    )
    meter = {"start": time.perf_counter(), "rows": 0, "tokens": 0}
    try:
        for index in mine:
            first, last = index * shard_size, min(index * shard_size + shard_size, num_samples)
            rows, tokens, _ = fill_shard(produce(range(first, last)), None, counter, bar, meter)
            _store_shard(output_dir, progress, (index, first, rows, tokens), _rank_path(output_dir, rank))
    finally:
        bar.close()
    _barrier()
    if rank == 0:
        _merge(output_dir, fingerprint, total, max_total_tokens, counter, world)
    _barrier()
    return _read_json(os.path.join(output_dir, PROGRESS))


def _recorded_shards(output_dir: str) -> list[dict]:
    """Every shard recorded by any progress file, once each, in index order."""
    paths = [os.path.join(output_dir, PROGRESS)] + _rank_files(output_dir)
    shards = {}
    for path in paths:
        if os.path.exists(path):
            for shard in _read_json(path)["shards"]:
                shards.setdefault(shard["index"], shard)
    return [shards[i] for i in sorted(shards)]


def _merge(output_dir, fingerprint, total, max_total_tokens, counter, world) -> None:
    """progress.json over every rank's shards, the token budget applied in sample-index order."""
    shards = _recorded_shards(output_dir)
    missing = sorted(set(range(total)) - {s["index"] for s in shards})
    if missing:
        raise ValueError(f"shards {missing} of {output_dir} were written by no process; run again to resume")
    merged, used = [], 0
    for shard in shards[:total]:
        record = shard | {"written": shard.get("written", shard["rows"])}
        if max_total_tokens is not None:
            kept, record["tokens"] = fit_rows(
                read_rows(output_dir, {"shards": [shard]}), max_total_tokens - used, counter
            )
            record["rows"] = kept
        merged.append(record)
        used += record["tokens"]
        if record["rows"] < record["written"]:
            break  # the first row that does not fit the token budget ends the dataset
    progress = _fresh(fingerprint) | {
        "shards": merged,
        "rows": sum(s["rows"] for s in merged),
        "tokens": used,
    }
    write_json(os.path.join(output_dir, PROGRESS), progress | {"complete": True, "world_size": world})


def finished_dataset(output_dir: str, progress: dict):
    """The saved dataset of a run that already completed, else None."""
    path = os.path.join(output_dir, DATASET)
    if progress.get("saved") and os.path.isdir(path):
        logger.info("%s is complete; loading the saved dataset", output_dir)
        return datasets.load_from_disk(path)
    return None


def save_dataset(output_dir: str, dataset, provenance: dict, progress: dict):
    """Saves the Arrow dataset and provenance.json, marks the run saved, and returns the loaded dataset."""
    if len(dataset) == 0:
        raise ValueError(
            f"no rows to save in {output_dir} (statistics: {provenance.get('filter_stats')}); raise the budget "
            "or loosen the filters"
        )
    path = os.path.join(output_dir, DATASET)
    rank, world = process_group()
    if rank == 0:  # every process holds the same dataset; one writes it
        remove_temporaries(output_dir)  # of writers killed earlier; every shard is written by now
        staging = path + ".tmp"
        shutil.rmtree(staging, ignore_errors=True)
        dataset.save_to_disk(staging)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(staging, path)
        content = {
            k: v["content"]
            for k, v in progress["fingerprint"].items()
            if isinstance(v, dict) and "content" in v
        }
        provenance = provenance | {"num_rows": len(dataset), "dataset_path": path, "world_size": world}
        provenance["content_keys"] = content  # the model / tokenizer files the rows came from, by hash
        write_json(os.path.join(output_dir, PROVENANCE), provenance)
        progress["saved"] = True
        write_json(os.path.join(output_dir, PROGRESS), progress | {"updated_at": _now()})
    _barrier()
    return datasets.load_from_disk(path)


def provenance(method: str, config, models: dict, **extra) -> dict:
    """The provenance record: what made the data, with which settings, versions and seeding scheme."""
    return {
        "method": method,
        **models,
        "config": config.to_dict(),
        "seed": config.seed,
        "seeding": SEEDING,
        "llmkd_version": __version__,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
        },
        "created_at": _now(),
        **extra,
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
