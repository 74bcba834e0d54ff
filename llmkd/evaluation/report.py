"""The teacher-vs-student report: Markdown table, JSON and a score-vs-speed-up plot, written atomically."""

from __future__ import annotations

import json
import math
import os

from llmkd.atomic import atomic_write
from llmkd.data.glue import get_task

SHORT = {"accuracy": "acc", "f1": "F1", "matthews_correlation": "MCC", "pearson": "P", "spearmanr": "S"}
SPLIT_SHORT = {"validation_matched": "m", "validation_mismatched": "mm"}  # as on the GLUE leaderboard


def _column(task: str, split: str, n_splits: int) -> str:
    name = f"{task}-{SPLIT_SHORT.get(split, split)}" if n_splits > 1 else task
    return f"{name} ({'/'.join(SHORT[m] for m in get_task(task).metrics)})"


def _fmt(value, spec: str = ".1f", scale: float = 1.0, prefix: str = "", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{prefix}{value * scale:{spec}}{suffix}"


def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def markdown_table(results: dict, title: str) -> str:
    """The report as Markdown: metrics ×100 (GLUE convention), speed on CPU, comparisons against the reference."""
    reference, speed = results.get("reference"), results["speed"]
    metric_columns = [(t, s) for t in results["tasks"] for s in results["examples"][t]]
    header = ["model", "params"]
    header += [_column(t, s, len(results["examples"][t])) for t, s in metric_columns]
    header += ["macro", f"% of {reference}", "agreement", "latency ms", "throughput seq/s", "speed-up"]
    rows = [header, ["---"] * len(header)]
    for name, entry in results["models"].items():
        row = [name, _params(entry["params"])]
        for task, split in metric_columns:
            values = entry["metrics"][task][split]
            row.append("/".join(_fmt(values[m], scale=100) for m in get_task(task).metrics))
        row += [
            _fmt(entry["score"], scale=100),
            _fmt(entry.get("pct_of_reference", {}).get("macro"), suffix="%"),
            _fmt(entry.get("mean_agreement"), ".3f"),
            _fmt(entry.get("latency_ms"), ".2f"),
            _fmt(entry.get("throughput"), ".1f"),
            _fmt(entry.get("speedup"), ".2f", prefix="×"),
        ]
        rows.append(row)
    examples = ", ".join(
        f"{t}/{s}: {n}" for t, splits in results["examples"].items() for s, n in splits.items()
    )
    notes = [
        f"Validation examples: {examples}. Macro = mean over tasks of each task's metric mean (GLUE leaderboard).",
        f"Speed on CPU with {speed['threads']} thread(s), seq len {speed['seq_len']}: latency at batch "
        f"{speed['latency_batch_size']}, throughput at batch {speed['throughput_batch_size']} (median of "
        f"{speed['repeats']} after {speed['warmup']} warm-up); speed-up = throughput / {reference}'s.",
    ]
    table = "\n".join("| " + " | ".join(row) + " |" for row in rows)
    return f"# {title}\n\n{table}\n\n" + "\n".join(notes) + "\n"


def _finite(value):
    """NaN/inf (e.g. a correlation of constant predictions) become null: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def plot_score_vs_speedup(results: dict, handle, title: str) -> None:
    """One labelled point per model: throughput speed-up against % of the reference's macro score."""
    # The object-oriented API with the Agg canvas touches no global pyplot state or backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    relative = results.get("reference") is not None
    for i, (name, entry) in enumerate(results["models"].items()):
        x = entry.get("speedup") or 1.0
        y = entry.get("pct_of_reference", {}).get("macro") if relative else 100 * entry["score"]
        if y is None:
            continue
        axes.scatter([x], [y])
        # Alternate label heights: students of one size land close together.
        axes.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5 - 14 * (i % 2)), fontsize=8)
    if relative:
        axes.axhline(100.0, color="grey", linewidth=0.8, linestyle="--")
    axes.margins(x=0.25, y=0.15)
    axes.set_xlabel(f"throughput speed-up vs {results.get('reference')} (CPU)")
    axes.set_ylabel(f"% of {results['reference']} macro score" if relative else "macro score")
    axes.set_title(title, fontsize=9)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(handle, format="png", dpi=120)


def write_report(results: dict, out_dir: str, title: str = "llmkd evaluation") -> str:
    """Writes report.md, report.json and score_vs_speedup.png into out_dir; returns the Markdown."""
    os.makedirs(out_dir, exist_ok=True)
    markdown = markdown_table(results, title)
    atomic_write(os.path.join(out_dir, "report.md"), lambda h: h.write(markdown))
    payload = _finite({"title": title, **results})
    atomic_write(os.path.join(out_dir, "report.json"), lambda h: json.dump(payload, h, indent=2, default=str))
    atomic_write(
        os.path.join(out_dir, "score_vs_speedup.png"),
        lambda h: plot_score_vs_speedup(results, h, title),
        "wb",
    )
    return markdown
