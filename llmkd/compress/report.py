"""`llmkd compress`'s last stage: score and time the teacher, the student and the control, say which is the result.

Scores come from llmkd.evaluation.any_data.evaluate_file on the validation rows (95% bootstrap intervals, and
paired intervals for each difference); speed-ups from the teacher and both students timed interleaved. Writes
OUT/report.md, OUT/report.json and OUT/compress.png (left: every candidate the search tried, its score on the
search slice against its measured speed-up, the Pareto front marked; right: the three models on the validation
rows) and returns the report dict.
"""

from __future__ import annotations

import json
import os

from llmkd.atomic import atomic_write
from llmkd.evaluation.report import _finite, markdown_table

STUDENT, CONTROL = "student (distilled)", "labels only (control)"
SPEED_ROUNDS = 20  # the 95% interval of the speed-up is then the 6th-smallest to 6th-largest paired ratio


def write_report(config, out, data, teacher, shapes, search, final, control, elapsed: float) -> dict:
    from llmkd.evaluation.any_data import evaluate_file

    files = {"teacher": teacher, STUDENT: final["folder"], CONTROL: control["folder"]}
    common = {"text_columns": data["text_columns"], "label_column": "label", "seed": config.seed}
    results = evaluate_file(
        files, data["files"]["validation"], **common,
        speed_repeats=SPEED_ROUNDS, speed_seq_len=data["max_length"], max_length=data["max_length"],
    )  # fmt: skip
    paired = evaluate_file(
        {CONTROL: control["folder"], STUDENT: final["folder"]}, data["files"]["validation"], **common,
        reference=CONTROL, speed_repeats=0, max_length=data["max_length"],
    )  # fmt: skip
    models = results["models"]
    gain = paired["models"][STUDENT]
    # Chosen on the search slice (held out from training), so that the validation scores stay unbiased.
    chosen = evaluate_file(
        {STUDENT: final["folder"], CONTROL: control["folder"]}, data["files"]["search"], **common,
        reference=None, speed_repeats=0, bootstrap=0, max_length=data["max_length"],
    )["models"]  # fmt: skip
    best = STUDENT if chosen[STUDENT]["score"] >= chosen[CONTROL]["score"] else CONTROL
    verdict = _verdict(models, gain, best, config.speedup)
    verdict += (
        f" Chosen on the {data['rows']['search']} search-slice rows: student {100 * chosen[STUDENT]['score']:.1f}, "
        f"labels only {100 * chosen[CONTROL]['score']:.1f}."
    )
    report = {
        "command": "llmkd compress",
        "settings": config.key() | {"budget_minutes": config.budget_minutes},
        "result": {"model": best, "folder": files[best], "verdict": verdict},
        "choice_on_search_slice": {name: chosen[name]["score"] for name in chosen},
        "evaluation": results,
        "distillation_vs_control": {
            "difference": gain["vs_reference"]["score"],
            "interval": gain["vs_reference"]["intervals"]["score"],
        },
        "data": {k: data[k] for k in ("files", "rows", "text_columns", "classes", "max_length")},
        "shapes": shapes["table"]["candidates"],
        "search": _search_rows(shapes, search),
        "elapsed_minutes": elapsed / 60,
        "budget_minutes": config.budget_minutes,
    }
    markdown = _markdown(config, report, results, data, shapes)
    atomic_write(os.path.join(out, "report.md"), lambda h: h.write(markdown))
    atomic_write(
        os.path.join(out, "report.json"), lambda h: json.dump(_finite(report), h, indent=2, default=str)
    )
    atomic_write(os.path.join(out, "compress.png"), lambda h: _plot(report, results, h), "wb")
    print(markdown_table(results, f"llmkd compress: {os.path.basename(out)}"))
    print(verdict)
    return _finite(report)


def _verdict(models: dict, gain: dict, best: str, target: float) -> str:
    student = models[STUDENT]
    d, interval = gain["vs_reference"]["score"], gain["vs_reference"]["intervals"]["score"]
    span = f" (95% interval {100 * interval[0]:+.1f} to {100 * interval[1]:+.1f})" if interval else ""
    pct = student.get("pct_of_reference", {}).get("macro")
    low = student.get("speedup_low")
    speed = f"×{student.get('speedup', float('nan')):.2f}" + (f", lower bound ×{low:.2f}" if low else "")
    head = (
        f"The distilled student keeps {pct:.1f}% of the teacher at {speed} (target ×{target:g}); "
        f"distillation vs labels only: {100 * d:+.1f} points{span}."
        if d is not None and pct is not None
        else "The distilled student was scored; see the table."
    )
    if best == CONTROL:
        return head + " Distillation did NOT beat the labels-only control: the control is the result."
    if d is not None and d < 0:
        return head + " On the validation rows the labels-only control scored higher."
    if interval and interval[0] <= 0:
        return head + " The difference is inside the noise of this validation set."
    return head


def _search_rows(shapes: dict, search: dict) -> list[dict]:
    """One row per candidate: its shape and speed, the score of each round it reached, its rank."""
    rows = []
    ranking = search.get("ranking", [0])
    order = search.get("candidates") or [c["name"] for c in shapes["candidates"]]  # the search's indices
    for c in shapes["candidates"]:
        i = order.index(c["name"])
        scores = {
            r["steps"]: r["scores"].get(str(i)) for r in search.get("rounds", []) if str(i) in r["scores"]
        }
        rows.append(c | {"scores_by_steps": scores, "rank": ranking.index(i) + 1 if i in ranking else None})
    return rows


def _last_score(row: dict):
    scores = [
        v for _, v in sorted(row["scores_by_steps"].items(), key=lambda kv: int(kv[0])) if v is not None
    ]
    return scores[-1] if scores else None


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (speed-up, score) that no other point beats on both (ties kept), fastest first."""
    front = [
        i for i, (x, y) in enumerate(points)
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for x2, y2 in points)
    ]  # fmt: skip
    return sorted(front, key=lambda i: -points[i][0])


def _markdown(config, report: dict, results: dict, data: dict, shapes: dict) -> str:
    table = markdown_table(results, "llmkd compress")
    lines = [table, f"**Result:** `{report['result']['folder']}` — {report['result']['verdict']}", ""]
    lines += [
        f"Every stage before this report: {report['elapsed_minutes']:.1f} min of a {config.budget_minutes:g} min "
        "budget (the log's last line gives the total). "
        f"Training rows {data['rows']['train']}, search slice {data['rows']['search']}, validation "
        f"{data['rows']['validation']}; max_length {data['max_length']}.",
        "",
        "## Candidates (search: soft-target distillation, scored on the search slice, never on validation)",
        "",
        "| candidate | layers | heads | FFN | hidden | speed-up [95%] | scores by steps | rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["search"]:
        scores = ", ".join(f"{s}: {100 * v:.1f}" for s, v in row["scores_by_steps"].items() if v is not None)
        lines.append(
            f"| {row['name']} | {row['layers']} | {row['heads_per_layer']} | {row['intermediate_size']} | "
            f"{row['hidden_size']} | ×{row['speedup']:.2f} [{row['speedup_low']:.2f}, {row['speedup_high']:.2f}] "
            f"| {scores or '–'} | {row['rank'] or '–'} |"
        )
    timed = shapes.get("timed_before", []) + shapes["table"]["candidates"]
    dropped = [r for r in timed if not r["kept"] and r["measured"]]
    if dropped:
        lines += ["", "Timed and dropped: " + "; ".join(f"{r['name']}: {r['reason']}" for r in dropped)]
    return "\n".join(lines + ["", data["markdown"], ""])


def _plot(report: dict, results: dict, handle) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    rows = [r for r in report["search"] if _last_score(r) is not None]
    points = [(r["speedup"], 100 * _last_score(r)) for r in rows]
    front = set(pareto_front(points))
    for i, (row, (x, y)) in enumerate(zip(rows, points)):
        left.scatter([x], [y], marker="*" if i in front else "o", s=90 if i in front else 30)
        left.annotate(row["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ordered = sorted(front, key=lambda i: points[i][0])
    left.plot(
        [points[i][0] for i in ordered], [points[i][1] for i in ordered], "--", color="grey", linewidth=0.8
    )
    left.axvline(report["settings"]["speedup"], color="red", linewidth=0.8, linestyle=":")
    left.set(xlabel="throughput speed-up vs teacher (CPU)", ylabel="accuracy on the search slice (%)")
    left.set_title("candidates tried (★ Pareto front, last round reached)", fontsize=9)
    for name, entry in results["models"].items():
        x, y = entry.get("speedup") or 1.0, 100 * entry["score"]
        low, high = (entry.get("intervals") or {}).get("score") or (None, None)
        yerr = [[y - 100 * low], [100 * high - y]] if low is not None else None
        right.errorbar([x], [y], yerr=yerr, fmt="o", capsize=3)
        right.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    right.set(xlabel="throughput speed-up vs teacher (CPU)", ylabel="validation accuracy (%), 95% interval")
    right.set_title("result on the validation rows", fontsize=9)
    for axes in (left, right):
        axes.grid(True, alpha=0.3)
        axes.margins(x=0.2, y=0.2)
    figure.tight_layout()
    figure.savefig(handle, format="png", dpi=120)
