"""The teacher-vs-student report: Markdown table, JSON and a score-vs-speed-up plot, written atomically."""

from __future__ import annotations

import json
import math
import os

from llmkd.atomic import atomic_write
from llmkd.data.glue import get_task

SHORT = {"accuracy": "acc", "f1": "F1", "matthews_correlation": "MCC", "pearson": "P", "spearmanr": "S"}
SHORT["macro_f1"] = "macro-F1"  # a user's data (llmkd.evaluation.any_data)
SPLIT_SHORT = {"validation_matched": "m", "validation_mismatched": "mm"}  # as on the GLUE leaderboard


def _column(task: str, split: str, n_splits: int, metrics=None) -> str:
    name = f"{task}-{SPLIT_SHORT.get(split, split)}" if n_splits > 1 else task
    return f"{name} ({'/'.join(SHORT[m] for m in metrics or get_task(task).metrics)})"


def _fmt(value, spec: str = ".1f", scale: float = 1.0, prefix: str = "", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{prefix}{value * scale:{spec}}{suffix}"


def _metric_names(results: dict, task: str) -> list[str]:
    """The task's metrics as the results record them (a user's data file is no GLUE task), else GLUE's."""
    return results.get("task_metrics", {}).get(task) or list(get_task(task).metrics)


def _points(value: float, signed: bool = False) -> str:
    """A 0–1 figure in points with a real minus sign: "83.5", "−1.2", "+0.4" (signed)."""
    text = f"{100 * value:{'+' if signed else ''}.1f}"
    return ("0.0" if text.lstrip("+-") == "0.0" else text).replace("-", "\u2212")


def _with_interval(value, interval, signed: bool = False) -> str:
    """ "83.5 (81.3–85.7)"; the value alone without an interval, "–" without a value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if not interval:
        return _points(value, signed)
    return f"{_points(value, signed)} ({_points(interval[0])}–{_points(interval[1])})"


def _metric_cell(entry: dict, task: str, split: str, names: list[str]) -> str:
    values = entry["metrics"][task][split]
    intervals = entry.get("intervals", {}).get("metrics", {}).get(task, {}).get(split, {})
    return "/".join(_with_interval(values[m], intervals.get(m)) for m in names)


def _delta(entry: dict, is_reference: bool) -> str:
    """The macro score minus the reference's, in points, with its paired interval: "−1.2 (−2.4–−0.1)"."""
    versus = entry.get("vs_reference")
    if is_reference or not versus:
        return "–"
    return _with_interval(versus["score"], versus["intervals"]["score"], signed=True)


def _interval_note(results: dict, reference) -> str | None:
    settings = results.get("intervals")
    if not settings:
        return None
    return (
        f"In brackets: {100 * settings['confidence']:.0f}% intervals, percentile bootstrap over the validation "
        f"examples ({settings['resamples']} resamples, seed {settings['seed']}); Δ vs {reference} = macro − "
        f"{reference}'s macro in points, its interval paired (both models scored on the same resamples). "
        "The macro's own interval is in report.json."
    )


def _data_note(results: dict) -> str | None:
    data = results.get("data")
    if not data:
        return None
    scored = [SHORT[m] for m in data.get("score", [])]
    score = scored[0] if len(scored) == 1 else f"the mean of {' and '.join(scored)}"
    return (
        f"Data: {data['validation_file']}, text {data['text_columns']}, labels {data['label_column']!r} "
        f"{data['label_names'] or '(regression)'} (columns from {data['columns_from']}); the score (macro, "
        f"% and Δ) is {score}."
    )


def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _speedup(entry: dict) -> str:
    """The median per-round speed-up and its interval when the timing gave one, e.g. "×2.91 (2.80–3.02)"."""
    low, high = entry.get("speedup_low"), entry.get("speedup_high")
    # The reference against itself is exactly 1 in every round: no interval worth printing.
    interval = f" ({low:.2f}–{high:.2f})" if low is not None and high is not None and low < high else ""
    return _fmt(entry.get("speedup"), ".2f", prefix="×") + interval


def _speed_note(speed: dict, reference) -> str:
    if not speed.get("repeats"):
        return "Speed was not measured (speed_repeats 0)."
    how = f"Speed on CPU with {speed['threads']} thread(s), seq len {speed['seq_len']}: latency at batch "
    how += f"{speed['latency_batch_size']}, throughput at batch {speed['throughput_batch_size']}"
    return how + (
        f", all models timed interleaved in {speed['repeats']} rounds after {speed['warmup']} warm-up (medians); "
        f"speed-up = {reference}'s batch time / the model's, per round, median over rounds "
        f"({100 * speed['confidence']:.0f}% interval of the median in brackets, from 6 rounds on)."
    )


def markdown_table(results: dict, title: str) -> str:
    """The report as Markdown: metrics ×100 (GLUE convention), speed on CPU, comparisons against the reference."""
    reference, speed = results.get("reference"), results["speed"]
    metric_columns = [(t, s) for t in results["tasks"] for s in results["examples"][t]]
    header = ["model", "params"]
    names = {t: _metric_names(results, t) for t in results["tasks"]}
    header += [_column(t, s, len(results["examples"][t]), names[t]) for t, s in metric_columns]
    header += ["macro", f"Δ vs {reference}", f"% of {reference}", "agreement", "latency ms"]
    header += ["throughput seq/s", "speed-up"]
    rows = [header, ["---"] * len(header)]
    for name, entry in results["models"].items():
        row = [name, _params(entry["params"])]
        for task, split in metric_columns:
            row.append(_metric_cell(entry, task, split, names[task]))
        row += [
            _fmt(entry["score"], scale=100),
            _delta(entry, name == reference),
            _fmt(entry.get("pct_of_reference", {}).get("macro"), suffix="%"),
            _fmt(entry.get("mean_agreement"), ".3f"),
            _fmt(entry.get("latency_ms"), ".2f"),
            _fmt(entry.get("throughput"), ".1f"),
            _speedup(entry),
        ]
        rows.append(row)
    examples = ", ".join(
        f"{t}/{s}: {n}" for t, splits in results["examples"].items() for s, n in splits.items()
    )
    notes = [
        f"Validation examples: {examples}. Macro = mean over tasks of each task's metric mean (GLUE leaderboard).",
        _speed_note(speed, reference),
    ]
    notes += [n for n in (_interval_note(results, reference), _data_note(results)) if n]
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
        low, high = entry.get("speedup_low"), entry.get("speedup_high")
        if low is not None and high is not None:  # the speed-up's interval as a horizontal bar
            axes.errorbar([x], [y], xerr=[[x - low], [high - x]], fmt="o", capsize=3)
        else:
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
