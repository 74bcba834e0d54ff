"""`llmkd compress` stage "shapes": which student shapes meet the speed-up, each pruned from the teacher.

Teacher-guided importance (llmkd.students.importance, on up to CALIBRATION_ROWS training rows) picks the layers,
heads and FFN neurons each candidate keeps (Minitron-style: Muralidharan et al. 2024, "Compact Language Models
via Pruning and Knowledge Distillation"); llmkd.compress.search times the shapes against the teacher, interleaved,
and keeps those whose 95% lower bound meets the speed-up. Every kept shape is written as a plain checkpoint
folder (OUT/students/NAME, the teacher's tokenizer beside it): the search and the final runs start from it.
"""

from __future__ import annotations

import logging
import os

import torch
from datasets import load_dataset
from safetensors.torch import load_file, save_file

from llmkd.compress.search import shapes_meeting_speedup
from llmkd.students.importance import calibration_batches, importance_scores
from llmkd.students.pruning import prune_encoder

logger = logging.getLogger("llmkd.compress")
CALIBRATION_ROWS = 512
SPEED_BATCH = 32
RETRIES = 3  # more rounds of timing when none of the shapes timed met the speed-up


def importance(teacher, tokenizer, data: dict, out: str) -> dict[str, torch.Tensor]:
    """Importance scores of the teacher on the first CALIBRATION_ROWS (shuffled) training rows; cached in
    OUT/shapes/importance.safetensors."""
    path = os.path.join(out, "shapes", "importance.safetensors")
    if os.path.isfile(path):
        return load_file(path)
    rows = load_dataset("json", data_files=data["files"]["train"], split="train")
    rows = rows.select(range(min(CALIBRATION_ROWS, len(rows))))
    columns = data["text_columns"]
    texts = list(zip(*(rows[c] for c in columns))) if len(columns) > 1 else rows[columns[0]]
    batches = calibration_batches(tokenizer, texts, rows["label"], max_length=data["max_length"])
    scores = importance_scores(teacher, batches)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in scores.items()}, tmp)
    os.replace(tmp, path)
    return scores


def shapes_stage(config, teacher, tokenizer, data: dict, out: str) -> dict:
    """Times the candidate shapes, prunes the kept ones into folders; the stage record.

    Raises ValueError when no shape meets the speed-up (naming the fastest measured and the fix)."""
    first = table = _timed(config, teacher, data, out, None, 0)
    tried = {r["name"] for r in table["candidates"] if r["measured"]}
    # The cost model can over-predict: when no timed shape meets the speed-up, time the faster ones it passed over.
    for attempt in range(1, RETRIES + 1):
        faster = [] if table["kept"] else _untimed_faster(first, tried, config.speedup)
        if not faster:
            break
        logger.info("compress: no timed shape met ×%g; timing %d faster ones", config.speedup, len(faster))
        table = _timed(config, teacher, data, out, faster, attempt)
        tried |= {r["name"] for r in table["candidates"] if r["measured"]}
    if not table["kept"]:
        timed = [r for t in (first, table) for r in t["candidates"] if r["measured"]]
        best = max(timed, key=lambda r: r["speedup_low"] or 0.0, default=None)
        fastest = (
            f"; the fastest timed, {best['name']}, reached ×{best['speedup_low']:.2f} (95% lower bound)"
            if best
            else ""
        )
        raise ValueError(
            f"no student shape meets ×{config.speedup:g} over the teacher on this machine{fastest}: lower --speedup "
            "(the same --output_dir takes the new value: nothing was trained yet)"
        )
    scores = importance(teacher, tokenizer, data, out)
    rows = {r["name"]: r for r in table["candidates"]}
    candidates = []
    for name in table["kept"]:
        row = rows[name]
        folder = os.path.abspath(os.path.join(out, "students", name))
        if not os.path.isfile(os.path.join(folder, "config.json")):
            _write_student(teacher, tokenizer, row, scores, folder, data["max_length"])
        candidates.append(
            {"name": name, "folder": folder}
            | {k: row[k] for k in ("layers", "heads_per_layer", "intermediate_size", "hidden_size")}
            | {k: row[k] for k in ("speedup", "speedup_low", "speedup_high", "latency_speedup")}
        )
    earlier = [r for r in first["candidates"] if r["measured"]] if table is not first else []
    return {"table": table, "candidates": candidates, "timed_before": earlier}


def _timed(config, teacher, data: dict, out: str, shapes, attempt: int) -> dict:
    name = "speed.json" if attempt == 0 else f"speed-{attempt + 1}.json"
    return shapes_meeting_speedup(
        teacher,
        shapes,
        config.speedup,
        seq_len=data["max_length"],
        batch_size=SPEED_BATCH,
        max_candidates=config.max_candidates,
        seed=config.seed,
        threads=config.threads,
        state_path=os.path.join(out, "shapes", name),
    )


def _untimed_faster(first: dict, tried: set[str], speedup: float) -> list[dict]:
    """Shapes of the first (screened) table not timed yet that its cost model predicts faster than every timed
    one (and than `speedup`), the slowest of them first, at most max_candidates of them."""
    rows = first["candidates"]
    floor = max([speedup] + [r["predicted_speedup"] or 0.0 for r in rows if r["name"] in tried])
    faster = [r for r in rows if r["name"] not in tried and (r["predicted_speedup"] or 0.0) > floor]
    faster.sort(key=lambda r: r["predicted_speedup"])
    keys = ("layers", "heads_per_layer", "intermediate_size", "hidden_size")
    return [{k: r[k] for k in keys} for r in faster[: first["settings"]["max_candidates"]]]


def _write_student(teacher, tokenizer, row: dict, scores: dict, folder: str, max_length: int) -> None:
    student = prune_encoder(
        teacher,
        layers=int(row["layers"]),
        heads_per_layer=int(row["heads_per_layer"]),
        intermediate_size=int(row["intermediate_size"]),
        hidden_size=int(row["hidden_size"]),
        importance=scores,
    )
    tmp = folder + ".tmp"
    student.save_pretrained(tmp)
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(tmp)
    if os.path.isdir(folder):  # a half-renamed earlier attempt
        import shutil

        shutil.rmtree(folder)
    os.replace(tmp, folder)
    logger.info("compress: student %s written to %s", row["name"], folder)
