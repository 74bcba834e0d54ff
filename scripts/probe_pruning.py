"""Pruned shapes of a classifier teacher WITHOUT retraining: validation accuracy and parameters when the kept
layers, FFN neurons and heads are chosen by teacher importance (llmkd.students.importance) or naively
(first-k, uniform spacing). Shows whether importance picks better than a fixed rule before any distillation.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/probe_pruning.py --teacher runs/demo/teacher \
        --data_dir runs/demo/data --out /tmp/probe_pruning.json

Reads train.jsonl (a seeded sample of --calibration sentences) and validation.jsonl ("sentence", "label") from
--data_dir; prints a Markdown table and writes it as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from llmkd.students.importance import calibration_batches, importance_scores
from llmkd.students.pruning import encoder_shape, prune_encoder


def read_jsonl(path: Path) -> tuple[list[str], list[int]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


@torch.no_grad()
def accuracy(model, batches) -> float:
    right = total = 0
    for batch in batches:
        labels = batch.pop("labels")
        right += int((model(**batch).logits.argmax(-1) == labels).sum())
        total += len(labels)
        batch["labels"] = labels
    return right / total


def first(n: int, *shape: int) -> torch.Tensor:
    """Scores that make pruning keep the lowest indices (the naive choice): descending in the index."""
    return -torch.arange(n, dtype=torch.float32).expand(*shape, n).clone()


def runs(scores: dict, shape: dict) -> list[tuple[str, str, dict]]:
    """(shape, choice, prune_encoder arguments) of every probe."""
    L, H, F, D = shape["layers"], shape["heads"], shape["intermediate"], shape["hidden"]
    naive = {"heads": first(H, L), "neurons": first(F, L), "hidden": first(D), "layers": first(L)}
    by_cos = scores | {"layers": scores["layer_cosine"]}
    by_act = scores | {"heads": scores["heads_activation"]}
    ffn, heads, depth = F // 2, 2 * H // 3, 2 * L // 3
    narrow = dict(heads_per_layer=heads, hidden_size=heads * shape["head_dim"])
    uniform = sorted({round(i * (L - 1) / (depth - 1)) for i in range(depth)})
    return [
        ("teacher", "-", {}),
        (f"FFN {F}->{ffn}", "importance (activation)", dict(intermediate_size=ffn, importance=scores)),
        (f"FFN {F}->{ffn}", "first-k", dict(intermediate_size=ffn, importance=naive)),
        (f"FFN {F}->{ffn // 2}", "importance (activation)", dict(intermediate_size=ffn // 2, importance=scores)),
        (f"FFN {F}->{ffn // 2}", "first-k", dict(intermediate_size=ffn // 2, importance=naive)),
        (f"heads {H}->{heads}, hidden {D}->{narrow['hidden_size']}", "importance (gradient heads)", narrow | dict(importance=scores)),
        (f"heads {H}->{heads}, hidden {D}->{narrow['hidden_size']}", "importance (activation heads)", narrow | dict(importance=by_act)),
        (f"heads {H}->{heads}, hidden {D}->{narrow['hidden_size']}", "first-k", narrow | dict(importance=naive)),
        (f"layers {L}->{depth}", "importance (removal KL)", dict(layers=depth, importance=scores)),
        (f"layers {L}->{depth}", "importance (block cosine)", dict(layers=depth, importance=by_cos)),
        (f"layers {L}->{depth}", f"uniform {uniform}", dict(layers=uniform)),
        (f"layers {L}->{depth}", "first-k", dict(layers=f"first:{depth}")),
        (f"layers {L}->{depth}, FFN {F}->{ffn}", "importance", dict(layers=depth, intermediate_size=ffn, importance=scores)),
        (f"layers {L}->{depth}, FFN {F}->{ffn}", "uniform + first-k", dict(layers=uniform, intermediate_size=ffn, importance=naive)),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="runs/demo/teacher")
    parser.add_argument("--data_dir", default="runs/demo/data")
    parser.add_argument(
        "--calibration", type=int, default=256, help="training sentences scored (seeded sample)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file for the table")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher).eval()
    texts, labels = read_jsonl(Path(args.data_dir) / "train.jsonl")
    pick = sorted(random.Random(args.seed).sample(range(len(texts)), args.calibration))
    calibration = calibration_batches(tokenizer, [texts[i] for i in pick], [labels[i] for i in pick])
    validation = calibration_batches(
        tokenizer, *read_jsonl(Path(args.data_dir) / "validation.jsonl"), batch_size=64
    )
    start = time.perf_counter()
    scores = importance_scores(teacher, calibration)
    seconds = time.perf_counter() - start
    print(f"importance on {args.calibration} sentences: {seconds:.1f}s; layer scores (removal KL) "
          f"{[round(float(x), 4) for x in scores['layers']]}, block cosine "
          f"{[round(float(x), 4) for x in scores['layer_cosine']]}")  # fmt: skip
    full = sum(p.numel() for p in teacher.parameters())
    rows = []
    print("| shape | choice | parameters | validation accuracy |\n|---|---|---|---|")
    for shape, choice, kwargs in runs(scores, encoder_shape(teacher)):
        model = prune_encoder(teacher, **kwargs).eval()
        params = sum(p.numel() for p in model.parameters())
        row = {
            "shape": shape,
            "choice": choice,
            "parameters": params,
            "accuracy": accuracy(model, validation),
        }
        rows.append(row)
        print(f"| {shape} | {choice} | {params / 1e6:.2f}M ({params / full:.0%}) | {row['accuracy']:.4f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"importance_seconds": seconds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
