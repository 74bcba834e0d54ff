"""Training curves as a PNG beside the report: each term, agreement and entropies against the step.

Read from `trainer.state.log_history` (what `Trainer.log` recorded: the terms and llmkd.schemes.diagnostics'
values of the training logs, the eval_* metrics of the evaluations). Drawn with matplotlib's object API on an Agg
canvas — no pyplot, so no global backend is changed and no display is needed — and written atomically.
"""

from __future__ import annotations

import os
import re

from llmkd.atomic import atomic_write

CURVES = "training_curves.png"

_PEER = r"(?:peer\d+/)?"
# panel title -> the keys it draws (matched without the eval_ prefix; eval curves are dashed).
PANELS = {
    "loss and terms": re.compile(rf"^(?:loss|{_PEER}(?:distill/[^/]+|loss_ce))$"),
    "agreement and top-k mass": re.compile(rf"^{_PEER}(?:agreement|topk_mass)(?:@.+)?$"),
    "entropy of the soft targets (nats)": re.compile(rf"^{_PEER}(?:teacher|student)_entropy(?:@.+)?$"),
    "per layer pair": re.compile(r"/layer\d+->\d+$"),
}


def curve_series(log_history: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{panel: {key: [(step, value), …]}} of the numeric entries of a Trainer's log history (empty panels left
    out). Training keys are as logged; evaluation keys keep their ``eval_`` prefix."""
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        for key, value in entry.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            base = key.removeprefix("eval_")
            panel = next((title for title, rule in PANELS.items() if rule.search(base)), None)
            if panel is not None:
                panels.setdefault(panel, {}).setdefault(key, []).append((int(step), float(value)))
    return {title: panels[title] for title in PANELS if title in panels}


def write_training_curves(log_history: list[dict], path: str | os.PathLike) -> str | None:
    """Draws `curve_series(log_history)` (one panel each) into the PNG `path`, atomically; returns the path, or
    None (nothing written) when the history holds no term, agreement or entropy value."""
    panels = curve_series(log_history)
    if not panels:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # here: the CLI starts without matplotlib
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 3.2 * len(panels)), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, (title, lines) in zip(figure.subplots(len(panels), 1, squeeze=False)[:, 0], panels.items()):
        for key, points in sorted(lines.items()):
            steps, values = zip(*points)
            style = "--" if key.startswith("eval_") else "-"
            axes.plot(steps, values, style, marker="o" if len(points) == 1 else None, label=key)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=100), mode="wb")
    return os.fspath(path)
