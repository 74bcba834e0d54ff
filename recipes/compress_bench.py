"""`make bench-compress`: `llmkd compress`, unchanged, on the demo task and on tasks of other kinds, several seeds.

    python recipes/compress_bench.py [--tasks demo genre amazon-sentiment] [--seeds 3] [--budget-minutes 30]

- demo: Rotten Tomatoes sentiment, the fine-tuned MiniLM teacher of `make demo` (made first if missing);
- genre: which of four sources (tweet, Amazon review, NYT editorial, movie review) a text comes from
  (`llmkd data genre`), teacher: the base all-MiniLM-L6-v2 encoder, which compress fine-tunes first;
- amazon-sentiment: Amazon review snippets, positive or negative (`llmkd data amazon-sentiment`), same teacher.

Each (task, seed) runs `llmkd compress` into runs/compress/TASK-seedN (a finished one is reused, an interrupted one
resumed); then runs/compress/summary-TASKS-NseedS.md holds, per task: the teacher, the student (% of the teacher, speed-up with
its 95% lower bound), the labels-only control of the same shape, their paired difference, minutes, and for the
demo task the demo recipe's students from runs/demo/report.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from llmkd.atomic import write_json

ROOT = Path(__file__).resolve().parent.parent
RUNS = Path("runs/compress")
LLMKD = str(Path(sys.executable).parent / "llmkd")  # the console script installed beside this interpreter


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["demo", "genre", "amazon-sentiment"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget-minutes", type=float, default=30.0)
    parser.add_argument("--speedup", type=float, default=2.5)
    return parser.parse_args(argv)


def task_flags(task: str) -> list[str]:
    if task == "demo":
        if not Path("runs/demo/teacher/model.safetensors").is_file():
            subprocess.run([sys.executable, str(ROOT / "recipes" / "demo.py")], check=True)
        return [str(ROOT / "recipes" / "compress" / "demo.yaml")]
    data = Path("runs/tasks") / task
    if not (data / "validation.jsonl").is_file():
        subprocess.run([LLMKD, "data", task, str(data)], check=True)
    return [
        "--teacher", "embedded:all-minilm-l6-v2", "--train_file", str(data / "train.jsonl"),
        "--validation_file", str(data / "validation.jsonl"), "--text_columns", "text", "--label_column", "label",
    ]  # fmt: skip


def run(task: str, seed: int, args) -> dict:
    out = RUNS / f"{task}-seed{seed}"
    command = [LLMKD, "compress", *task_flags(task), "--seed", str(seed)]
    command += ["--output_dir", str(out), "--budget_minutes", str(args.budget_minutes)]
    command += ["--speedup", str(args.speedup)]
    subprocess.run(command, check=True)
    return json.loads((out / "report.json").read_text())


def _mean(values, unit: str = "") -> str:
    values = [100 * v for v in values]
    spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.1f}{unit}{spread}"


def summarise(task: str, reports: list[dict]) -> list[str]:
    models = [r["evaluation"]["models"] for r in reports]
    teacher = [m["teacher"]["score"] for m in models]
    student = [m["student (distilled)"]["score"] for m in models]
    control = [m["labels only (control)"]["score"] for m in models]
    kept = [s / t for s, t in zip(student, teacher)]
    speed = [m["student (distilled)"]["speedup"] for m in models]
    low = [m["student (distilled)"].get("speedup_low") or float("nan") for m in models]
    gains = [r["distillation_vs_control"] for r in reports]
    shapes = sorted({Path(r["evaluation"]["models"]["student (distilled)"]["source"]).name for r in reports})
    winners = [Path(r["result"]["folder"]).name for r in reports]
    lines = [
        f"| {task} ({len(reports)} seed{'s' if len(reports) > 1 else ''}) | {_mean(teacher)} | {_mean(student)} | "
        f"{_mean(kept, '%')} | "
        f"×{statistics.mean(speed):.2f} (lowest bound ×{min(low):.2f}) | {_mean(control)} | "
        + ", ".join(
            f"{100 * g['difference']:+.1f} [{100 * g['interval'][0]:+.1f}, {100 * g['interval'][1]:+.1f}]"
            for g in gains
        )
        + f" | {max(r['elapsed_minutes'] for r in reports):.0f} | {', '.join(winners)} |"
    ]
    lines.append(
        f"|  | shapes: {', '.join(_shape(r) for r in reports)} | | | | | | | {len(shapes)} folder(s) |"
    )
    return lines


def _shape(report: dict) -> str:
    search = report["search"]
    ranked = [r for r in search if r.get("rank") == 1]
    return ranked[0]["name"] if ranked else "?"


def demo_recipe_line() -> str | None:
    path = Path("runs/demo/report.json")
    if not path.is_file():
        return None
    models = json.loads(path.read_text())["models"]
    distilled = [m["score"] for n, m in models.items() if n.startswith("distilled")]
    baseline = [m["score"] for n, m in models.items() if n.startswith("labels only")]
    return (
        f"The demo recipe (runs/demo/report.json, 2-layer student): distilled {_mean(distilled)}, "
        f"labels only {_mean(baseline)}, teacher {100 * models['teacher']['score']:.1f}."
    )


def side_by_side(reports: list[dict]) -> str | None:
    """The demo task's compress students and controls next to the demo recipe's students (runs/demo), scored and
    timed together in one `evaluate_file` call (interleaved speed, paired intervals vs the teacher)."""
    from llmkd.evaluation.any_data import evaluate_file
    from llmkd.evaluation.report import markdown_table

    checkpoints = {"teacher": "runs/demo/teacher"}
    for r in reports:
        seed = r["settings"]["seed"]
        checkpoints[f"compress student (seed {seed})"] = r["evaluation"]["models"]["student (distilled)"][
            "source"
        ]
        checkpoints[f"compress labels only (seed {seed})"] = r["evaluation"]["models"][
            "labels only (control)"
        ]["source"]
    for folder in sorted(Path("runs/demo").glob("student-*-seed*")):
        kind = "demo recipe, distilled" if "distil" in folder.name else "demo recipe, labels only"
        checkpoints[f"{kind} (seed {folder.name.rsplit('seed', 1)[1]})"] = str(folder)
    if len(checkpoints) == 1:
        return None
    length = reports[0]["data"]["max_length"]
    results = evaluate_file(
        checkpoints,
        "runs/demo/data/validation.jsonl",
        ["sentence"],
        "label",
        speed_repeats=20,
        speed_seq_len=length,
    )
    write_json(RUNS / "side_by_side.json", results)
    return markdown_table(results, "Demo task, side by side (one evaluation, speed timed interleaved)")


def main(argv=None) -> int:
    args = parse(argv)
    results = {task: [run(task, 42 + k, args) for k in range(args.seeds)] for task in args.tasks}
    header = [
        "| task | teacher | student | % of teacher | speed-up | labels only (same shape) | student − labels only "
        "[95%] per seed | minutes (max) | result folder |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines = [f"# llmkd compress: {args.seeds} seed(s), ×{args.speedup:g}, {args.budget_minutes:g} min", ""]
    lines += header + [line for task, reports in results.items() for line in summarise(task, reports)]
    if "demo" in results and (extra := demo_recipe_line()):
        lines += ["", extra]
    if "demo" in results and (table := side_by_side(results["demo"])):
        lines += ["", table]
    text = "\n".join(lines) + "\n"
    RUNS.mkdir(parents=True, exist_ok=True)
    name = f"summary-{'-'.join(args.tasks)}-{args.seeds}seed{'s' if args.seeds > 1 else ''}"
    (RUNS / f"{name}.md").write_text(text)
    write_json(
        RUNS / f"{name}.json", {t: [r["evaluation"]["models"] for r in rs] for t, rs in results.items()}
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
