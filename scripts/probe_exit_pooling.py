"""Which pooling should early exits read on the demo teacher? A linear probe per layer, [CLS] vs token mean.

    python scripts/probe_exit_pooling.py [--teacher runs/demo/teacher] [--fit runs/methods/data/held-out.jsonl]

Fits a logistic regression (scikit-learn) on 1,500 rows the bench's students never saw (`make bench-methods`
writes them) and scores it on the demo's validation split, for the first token and for the mean of the real
tokens of every layer of the frozen teacher. Measured (2026-11-29): [CLS] 0.519 0.560 0.504 0.810 0.832 0.833,
mean 0.772 0.784 0.802 0.834 0.848 0.837 for layers 1-6: exits below layer 4 need `exit_pooling: mean`.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def features(model, tokenizer, rows, max_length=64):
    """{pooling: (N, layers + 1, H)} of every hidden state, and the labels."""
    out, labels = {"first": [], "mean": []}, []
    for i in range(0, len(rows), 64):
        chunk = rows[i : i + 64]
        enc = tokenizer([r["sentence"] for r in chunk], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            states = model(**enc, output_hidden_states=True).hidden_states
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out["first"].append(torch.stack([h[:, 0] for h in states], 1))
        out["mean"].append(torch.stack([(h * mask).sum(1) / mask.sum(1) for h in states], 1))
        labels += [r["label"] for r in chunk]
    return {k: torch.cat(v).numpy() for k, v in out.items()}, np.array(labels)


def read(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="runs/demo/teacher")
    parser.add_argument("--fit", default="runs/methods/data/held-out.jsonl")
    parser.add_argument("--validation", default="runs/demo/data/validation.jsonl")
    args = parser.parse_args()
    model = AutoModelForSequenceClassification.from_pretrained(args.teacher).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    (fit_x, fit_y), (val_x, val_y) = (
        features(model, tokenizer, rows) for rows in (read(args.fit)[:1500], read(args.validation))
    )
    for pooling in ("first", "mean"):
        scores = [
            LogisticRegression(max_iter=2000)
            .fit(fit_x[pooling][:, layer], fit_y)
            .score(val_x[pooling][:, layer], val_y)
            for layer in range(1, fit_x[pooling].shape[1])
        ]
        print(pooling, " ".join(f"{s:.3f}" for s in scores))


if __name__ == "__main__":
    main()
