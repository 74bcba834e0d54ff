"""The speed / accuracy curve of an early-exit classifier: accuracy and measured CPU latency per threshold.

`exit_curve` runs every example at batch 1 (the latency case FastBERT reports), once with the full model and once
with the exits at each threshold, timing each forward with a wall clock. The two are timed interleaved, example by
example (`llmkd.evaluation.speed.time_interleaved`), so a change of machine load hits both alike; each latency is
the median over `repeats` passes of the mean per-example time, and the speed-up is the median over passes of the
full model's time over the early-exit one's in the same pass. It writes exit_curve.json and exit_curve.png
(accuracy against speed-up, one labelled point per threshold).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence

import torch
from transformers import AutoTokenizer

from llmkd.atomic import atomic_write, write_json
from llmkd.evaluation.checkpoints import trained_length
from llmkd.evaluation.speed import time_interleaved
from llmkd.students.exits import EarlyExitClassifier, check_threshold

THRESHOLDS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def exit_curve(
    folder,
    rows: Sequence[dict],
    thresholds: Sequence[float] = THRESHOLDS,
    *,
    text_columns: Sequence[str] = ("sentence",),
    label_column: str = "label",
    max_length: int | None = None,
    repeats: int = 3,
    warmup: int = 5,
    out_dir=None,
) -> dict:
    """Accuracy, average exit layer and CPU latency at batch 1 for each threshold, with the full model's.

    Args:
        folder: a model folder with exits (trainer: early_exit; llmkd_exits.json beside the model).
        rows: the examples, mappings with `text_columns` and `label_column` (class ids of the model), e.g. a
            `datasets.Dataset` or a list of dicts.
        thresholds: uncertainty thresholds (>= 0); 0 is the full model, >= 1 always the first exit.
        max_length: truncation (default: the length the model was trained with, saved in its tokenizer).
        repeats, warmup: timed passes over all rows (median taken), untimed forwards first.
        out_dir: where exit_curve.json / exit_curve.png go (None: nothing is written).

    Returns {"full": {...}, "points": [{threshold, accuracy, average_exit_layer, exits, latency_ms,
    full_latency_ms, speedup, speedup_low, speedup_high (95% interval of the median over passes; None under 6
    repeats)}, ...], ...}. Runs on CPU with the current torch thread count (recorded).
    Raises ValueError for empty rows, labels outside the model's classes, bad thresholds or repeats.
    """
    thresholds = [check_threshold(t) for t in thresholds]
    if not thresholds or repeats < 1 or warmup < 0:
        raise ValueError(
            f"need thresholds, repeats >= 1 and warmup >= 0; got {thresholds}, {repeats}, {warmup}"
        )
    classifier = EarlyExitClassifier.from_pretrained(folder).to("cpu")
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(folder))
    inputs, labels = _encode(rows, tokenizer, text_columns, label_column, max_length, classifier)
    with torch.inference_mode():
        for x in inputs[:warmup]:  # allocator and kernel selection, untimed
            _runner(classifier, 0.0, [])(**x)
            _runner(classifier, 1.0, [])(**x)
    points, full_accuracy = [], None
    for threshold in thresholds:
        point, full_accuracy = _point(classifier, inputs, labels, threshold, repeats)
        points.append(point)
    result = {
        "folder": os.fspath(folder),
        "examples": len(inputs),
        "num_hidden_layers": classifier.num_layers,
        "exit_layers": classifier.exit_layers,
        "full": {"accuracy": full_accuracy, "layers": classifier.num_layers},
        "points": points,
        "batch_size": 1,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }
    if out_dir is not None:
        write_json(os.path.join(out_dir, "exit_curve.json"), result)
        atomic_write(os.path.join(out_dir, "exit_curve.png"), lambda h: plot_exit_curve(result, h), "wb")
    return result


def _encode(rows, tokenizer, text_columns, label_column, max_length, classifier) -> tuple[list, list[int]]:
    """One (1, T) input per row, and the rows' class ids (checked against the model's classes)."""
    rows = list(rows)
    if not rows:
        raise ValueError("exit_curve needs at least one row")
    classes = classifier.model.config.num_labels
    labels = [row[label_column] for row in rows]
    bad = [
        y
        for y in labels
        if not isinstance(y, numbers.Integral) or isinstance(y, bool) or not 0 <= y < classes
    ]
    if bad:
        raise ValueError(
            f"{label_column} must hold class ids 0..{classes - 1} of the model; got e.g. {bad[:3]} (map the "
            "dataset's labels to the model's label2id first)"
        )
    length = max_length or trained_length(tokenizer)
    inputs = []
    for row in rows:
        texts = [row[c] for c in text_columns]
        encoded = tokenizer(*texts, truncation=True, max_length=length, return_tensors="pt")
        inputs.append(
            {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        )
    return inputs, [int(y) for y in labels]


def _runner(classifier: EarlyExitClassifier, threshold: float, seen: list):
    """A forward at `threshold` (0: the plain model's forward) that appends (predicted class, exit layer)."""

    def run(**x):
        classifier.threshold = threshold
        out = classifier(**x)
        seen.append((int(out.logits.argmax(-1)), int(out.exit_layer)))

    return run


def _point(classifier, inputs, labels, threshold: float, repeats: int) -> tuple[dict, float]:
    """One threshold: the full model and the exits, timed example by example, `repeats` times."""
    seen = {"full": [], "exit": []}
    runs = {name: _runner(classifier, t, seen[name]) for name, t in (("full", 0.0), ("exit", threshold))}
    timing = time_interleaved(runs, inputs, reference="full", rounds=repeats, warmup=0)["models"]
    # Each pass runs the inputs in order: the last len(inputs) predictions are the last pass's, one per row.
    full, early = seen["full"][-len(inputs) :], seen["exit"][-len(inputs) :]
    correct = [p == y for (p, _), y in zip(early, labels)]
    full_correct = [p == y for (p, _), y in zip(full, labels)]
    layers = [layer for _, layer in early]
    point = {
        "threshold": threshold,
        "accuracy": sum(correct) / len(correct),
        "average_exit_layer": sum(layers) / len(layers),
        "exits": {str(layer): layers.count(layer) for layer in sorted(set(layers))},
        "latency_ms": timing["exit"]["ms"],
        "full_latency_ms": timing["full"]["ms"],
    }
    point |= {k: timing["exit"][k] for k in ("speedup", "speedup_low", "speedup_high")}
    return point, sum(full_correct) / len(full_correct)


def plot_exit_curve(result: dict, handle) -> None:
    """Accuracy (%) against measured speed-up, one point per threshold, the full model's accuracy dashed."""
    # The object-oriented API with the Agg canvas touches no global pyplot state or backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    xs = [p["speedup"] for p in result["points"]]
    ys = [100 * p["accuracy"] for p in result["points"]]
    axes.plot(xs, ys, marker="o")
    for i, (point, x, y) in enumerate(zip(result["points"], xs, ys)):
        label = f"t={point['threshold']:g}, layer {point['average_exit_layer']:.1f}"
        # Staggered label heights: thresholds where no example leaves early land on the same spot.
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5 - 11 * (i % 3)), fontsize=7)
    axes.axhline(100 * result["full"]["accuracy"], color="grey", linewidth=0.8, linestyle="--")
    axes.set_xlabel(f"CPU speed-up vs the full model (batch 1, torch threads: {result['threads']})")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"early exits of {os.path.basename(result['folder'].rstrip('/'))}", fontsize=9)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(handle, format="png", dpi=120)
