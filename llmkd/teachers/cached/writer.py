"""Writing a teacher-logit cache: the teacher runs once over the token ids of every split.

Layout of a cache folder (all rows of all splits share one index, `cache_index`, split by split):

    manifest.json              written last, atomically: fingerprint, components, splits, shards, teacher config
    shard-00000.safetensors    rows [0, rows_per_shard), each shard written atomically
    ...

Per shard: ``input_ids`` (all rows' ids, concatenated), ``row_offsets`` (rows + 1, int64) and
- causal LMs, per position t = 0..L-2 of a row (it predicts token t + 1): ``topk_ids`` (P, k), ``topk_logprobs``
  (P, k) = log-softmax(z / T) at those ids, ``rest_logmass`` (P,) = log of the remaining mass, and
  ``pos_offsets``; ids are uint16 when the vocabulary has at most 65,536 entries, else int32;
- sequence classifiers: ``logits`` (rows, C) float32, all of them and untempered, so any temperature works.

A restart keeps every finished shard whose fingerprint and row range are this run's, and redoes the others.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from llmkd import modeling as A
from llmkd.atomic import atomic_write, remove_leftovers, write_json
from llmkd.data.collate import pad_rows, padding_id
from llmkd.losses.bucketed import rest_log_mass
from llmkd.teachers.cached import fingerprint as F

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def id_dtype(vocab_size: int) -> torch.dtype:
    return torch.uint16 if vocab_size <= 1 << 16 else torch.int32


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@torch.no_grad()
def topk_targets(logits: torch.Tensor, k: int, temperature: float):
    """(..., V) teacher logits -> top-k ids (int64), their log-softmax(z / T) and the rest's log-mass (float32)."""
    log_p = (logits.float() / temperature).log_softmax(-1)
    values, ids = log_p.topk(k, dim=-1)
    return ids, values, rest_log_mass(log_p, ids)


def _check_settings(task: str, vocab: int, k: int, temperature: float, value_dtype: str) -> None:
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"cache_dtype={value_dtype!r}: choose one of {sorted(VALUE_DTYPES)}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if task == A.CAUSAL_LM and not (isinstance(k, int) and 1 <= k <= vocab):
        raise ValueError(f"cache_top_k must be an integer in 1..{vocab} (the vocabulary size), got {k!r}")


def components_for(teacher, tokenizer, splits, *, k, temperature, value_dtype, max_length, teacher_key=None):
    """The fingerprint components of a cache of `teacher` over `splits` ({name: tokenised Dataset})."""
    task = A.task_of(teacher)
    causal = task == A.CAUSAL_LM
    return {
        "format": f"{F.FORMAT}/{F.VERSION}",
        "task": task,
        "teacher": teacher_key or F.teacher_key(teacher),
        "teacher_dtype": str(next(teacher.parameters()).dtype).removeprefix("torch."),
        "tokenizer": F.tokenizer_key(tokenizer) if tokenizer is not None else None,
        "data": {name: F.data_key(data) for name, data in splits.items()},
        "max_length": max_length,
        "k": k if causal else None,  # classifiers keep every logit
        "temperature": float(temperature) if causal else None,  # and untempered ones
        "value_dtype": value_dtype if causal else "float32",
    }


def write_cache(
    teacher,
    tokenizer,
    splits: dict,
    out_dir: str,
    *,
    k: int = 64,
    temperature: float = 1.0,
    value_dtype: str = "float16",
    max_length: int | None = None,
    batch_size: int = 8,
    rows_per_shard: int = 1024,
    teacher_key: str | None = None,
) -> dict:
    """Runs `teacher` over `splits` ({name: Dataset with input_ids [, token_type_ids]}) and writes the cache.

    Resumable: finished shards of the same fingerprint are kept. Returns the manifest. Refuses a folder that
    holds a cache of other inputs.
    """
    task, vocab = A.task_of(teacher), A.output_rows(teacher)
    _check_settings(task, vocab, k, temperature, value_dtype)
    if not splits or any(len(d) == 0 for d in splits.values()):
        raise ValueError(f"nothing to cache: splits { ({n: len(d) for n, d in splits.items()}) }")
    comps = components_for(
        teacher,
        tokenizer,
        splits,
        k=k,
        temperature=temperature,
        value_dtype=value_dtype,
        max_length=max_length,
        teacher_key=teacher_key,
    )
    key = F.fingerprint(comps)
    _refuse_foreign(out_dir, key)
    bounds, start = {}, 0
    for name, data in splits.items():
        bounds[name] = [start, start + len(data)]
        start += len(data)
    teacher.eval()
    shards = []
    for index, row_start in enumerate(range(0, start, rows_per_shard)):
        rows = (row_start, min(row_start + rows_per_shard, start))
        path = os.path.join(out_dir, shard_name(index))
        if not _finished(path, key, rows):
            logger.info("teacher cache: shard %d, rows %d..%d of %d", index, rows[0], rows[1], start)
            settings = (task, k, temperature, value_dtype, batch_size)
            tensors = _shard_tensors(
                teacher, _rows(splits, bounds, *rows, A.forward_keys(teacher)), *settings
            )
            meta = {"fingerprint": key, "rows": f"{rows[0]},{rows[1]}"}
            atomic_write(path, lambda handle, t=tensors, m=meta: handle.write(save(t, m)), "wb")
        shards.append(_shard_entry(path, rows, task))
    manifest = _manifest(teacher, comps, key, bounds, shards, k, temperature, value_dtype, rows_per_shard)
    remove_leftovers(out_dir)  # what writers killed mid-file left: every shard is written by now
    write_json(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def _refuse_foreign(out_dir: str, key: str) -> None:
    """A folder with another fingerprint's manifest or shards is refused: never mix two caches."""
    if not os.path.isdir(out_dir):
        return
    found = set()
    path = os.path.join(out_dir, MANIFEST)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            found.add(json.load(handle).get("fingerprint"))
    for name in sorted(os.listdir(out_dir)):
        if name.startswith("shard-") and name.endswith(".safetensors"):
            found.add(_shard_meta(os.path.join(out_dir, name)).get("fingerprint"))
    foreign = found - {key, None}
    if foreign:
        raise F.CacheMismatchError(
            f"{out_dir} already holds a teacher cache of other inputs (fingerprint {sorted(foreign)[0][:12]}…, "
            f"this run {key[:12]}…); set teacher_cache to a new folder or delete the old one"
        )


def _shard_meta(path: str) -> dict:
    try:
        with safe_open(path, "pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError):  # truncated or half-written: redone, not trusted
        return {}


def _finished(path: str, key: str, rows: tuple[int, int]) -> bool:
    if not os.path.isfile(path):
        return False
    meta = _shard_meta(path)
    return meta.get("fingerprint") == key and meta.get("rows") == f"{rows[0]},{rows[1]}"


def _rows(splits: dict, bounds: dict, start: int, stop: int, inputs: set[str]) -> list[dict]:
    """Global rows [start, stop) as dicts of the model-input columns the teacher reads (all of them are in the
    cache's data key, so every one that changes the teacher's outputs reaches the teacher)."""
    out = []
    for name, (lo, hi) in bounds.items():
        a, b = max(start, lo), min(stop, hi)
        if a < b:
            data = splits[name]
            columns = [c for c in F.MODEL_INPUTS if c in data.column_names and c in inputs]
            chunk = data.select_columns(columns)[a - lo : b - lo]
            out += [dict(zip(chunk, values)) for values in zip(*chunk.values())]
    return out


@torch.no_grad()
def _shard_tensors(teacher, rows, task, k, temperature, value_dtype, batch_size) -> dict:
    device = next(teacher.parameters()).device
    lengths = [len(r["input_ids"]) for r in rows]
    order = sorted(range(len(rows)), key=lengths.__getitem__)  # similar lengths together: less padding
    per_row = [None] * len(rows)
    for i in range(0, len(order), batch_size):
        members = order[i : i + batch_size]
        # The teacher's own pad id: decoder classifiers pool the last token that is not it.
        batch = pad_rows([rows[m] for m in members], padding_id(None, A.base_model(teacher).config))
        logits = teacher(**{k: v.to(device) for k, v in batch.items()}).logits
        if task == A.SEQ_CLS:
            for j, m in enumerate(members):
                per_row[m] = (logits[j].float().cpu(),)
            continue
        ids, values, rest = topk_targets(logits[:, :-1], k, temperature)  # the causal shift
        for j, m in enumerate(members):
            n = max(lengths[m] - 1, 0)
            per_row[m] = (ids[j, :n].cpu(), values[j, :n].cpu(), rest[j, :n].cpu())
    return _assemble(rows, lengths, per_row, task, A.output_rows(teacher), value_dtype)


def _assemble(rows, lengths, per_row, task, vocab, value_dtype) -> dict:
    ids_dtype = id_dtype(vocab)
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    out = {
        "input_ids": torch.tensor([t for r in rows for t in r["input_ids"]], dtype=torch.int64).to(ids_dtype),
        "row_offsets": offsets,
    }
    if task == A.SEQ_CLS:
        out["logits"] = torch.stack([p[0] for p in per_row]).contiguous()
        return out
    dtype = VALUE_DTYPES[value_dtype]
    out["pos_offsets"] = torch.tensor([0, *(max(n - 1, 0) for n in lengths)]).cumsum(0)
    out["topk_ids"] = torch.cat([p[0] for p in per_row]).to(ids_dtype).contiguous()
    out["topk_logprobs"] = torch.cat([p[1] for p in per_row]).to(dtype).contiguous()
    out["rest_logmass"] = torch.cat([p[2] for p in per_row]).to(dtype).contiguous()
    return out


def _shard_entry(path: str, rows: tuple[int, int], task: str) -> dict:
    with safe_open(path, "pt") as handle:
        name = "pos_offsets" if task == A.CAUSAL_LM else "row_offsets"
        count = int(handle.get_slice(name)[-1:].item()) if task == A.CAUSAL_LM else rows[1] - rows[0]
        tokens = int(handle.get_slice("row_offsets")[-1:].item())
    return {
        "file": os.path.basename(path),
        "rows": list(rows),
        "positions": count,
        "tokens": tokens,
        "bytes": os.path.getsize(path),
    }


def _manifest(teacher, comps, key, bounds, shards, k, temperature, value_dtype, rows_per_shard) -> dict:
    total = sum(s["bytes"] for s in shards)
    positions = sum(s["positions"] for s in shards)
    causal = comps["task"] == A.CAUSAL_LM
    return {
        "format": F.FORMAT,
        "version": F.VERSION,
        "fingerprint": key,
        "components": comps,
        "task": comps["task"],
        "k": k if causal else None,
        "temperature": float(temperature) if causal else None,
        "value_dtype": comps["value_dtype"],
        "id_dtype": str(id_dtype(A.output_rows(teacher))).removeprefix("torch."),
        "vocab_size": A.output_rows(teacher),
        "rows_per_shard": rows_per_shard,
        "num_rows": sum(hi - lo for lo, hi in bounds.values()),
        "num_positions": positions,
        "num_tokens": sum(s["tokens"] for s in shards),
        "bytes": total,
        "bytes_per_position": round(total / max(positions, 1), 2),
        "splits": bounds,
        "shards": shards,
        "teacher_config": json.loads(A.base_model(teacher).config.to_json_string(use_diff=False)),
    }
