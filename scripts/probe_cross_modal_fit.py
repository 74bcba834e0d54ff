"""Why the demo's audio students stay near chance: can the student fit its clips, and does that generalise?

    OMP_NUM_THREADS=2 python scripts/probe_cross_modal_fit.py [--clips 800] [--epochs 12] [--lr 5e-4]

Reads the features `make demo-cross-modal` cached (runs/demo_cross_modal/features), trains the demo's student
(recipes/cross_modal/demo.yaml) on the gold labels of a random subset of the training clips with plain AdamW, and
prints the training loss and the accuracy on the held-out-voice validation clips after every epoch.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import yaml
from datasets import load_from_disk
from transformers import AutoConfig, AutoTokenizer, SeamlessM4TFeatureExtractor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))
import demo_cross_modal  # noqa: E402

from llmkd.data.collate import DistillationCollator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo_cross_modal", help="the demo's output folder")
    parser.add_argument("--teacher", default="runs/demo/teacher", help="its teacher (for the label names)")
    parser.add_argument("--clips", type=int, default=800)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=5e-4)
    args = parser.parse_args()
    folders = sorted(
        (Path(args.out) / "features").iterdir(), key=lambda p: -sum(f.stat().st_size for f in p.iterdir())
    )
    train, validation = (
        load_from_disk(str(f)).with_format("numpy", columns=["input_features"], output_all_columns=True)
        for f in folders[:2]
    )
    random.seed(0)
    rows = [train[i] for i in random.sample(range(len(train)), args.clips)]
    settings = yaml.safe_load(demo_cross_modal.SETTINGS.read_text())
    collate = DistillationCollator(
        SeamlessM4TFeatureExtractor(stride=settings["feature_stride"]),
        teacher_tokenizer=AutoTokenizer.from_pretrained(args.teacher),
    )
    model = demo_cross_modal.student(settings, AutoConfig.from_pretrained(args.teacher), 0, smoke=False)
    optimizer = torch.optim.AdamW(model.parameters(), args.lr)
    held_out = [
        collate([validation[i] for i in range(j, min(j + 32, len(validation)))])
        for j in range(0, len(validation), 32)
    ]
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        random.shuffle(rows)
        losses = []
        for i in range(0, len(rows), 16):
            batch = collate(rows[i : i + 16])
            loss = model(
                input_features=batch["input_features"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
            ).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            correct = sum(
                int(
                    (
                        model(
                            input_features=b["input_features"], attention_mask=b["attention_mask"]
                        ).logits.argmax(-1)
                        == b["labels"]
                    ).sum()
                )
                for b in held_out
            )
        print(
            f"epoch {epoch + 1}: train loss {sum(losses) / len(losses):.3f}, validation accuracy {100 * correct / len(validation):.1f}% ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
