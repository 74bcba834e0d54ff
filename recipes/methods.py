"""`make bench-methods`: the survey's comparison table for text — every scheme and algorithm of llmkd on the demo task.

    python recipes/methods.py [--out runs/methods] [--seeds 3] [--train-samples 4000] [--epochs 1] [--smoke]

Gou et al. (2021, "Knowledge Distillation: A Survey", §6) compare methods in one table on CIFAR. This is that table
for text: the demo's MiniLM teacher (recipes/demo/teacher.yaml, reused from `make demo` or made), the demo's 2-layer
student (teacher layers [0, 3]), Rotten Tomatoes. Every method trains on the same slice of the training data for
the same schedule (`--train-samples`, `--epochs`: shorter than the demo so that the table takes about an hour on 2
cores), once per seed, and is scored on the full validation split. Extra teachers for multi-teacher distillation
(MiniLM fine-tuned with seeds 43 and 44, on all the training data like the demo's teacher) are made once and
reused. Each finished run leaves its report and is skipped on a rerun (see recipes/demo.py `run_once`).

Writes `<out>/report.md`, `report.json` and `methods.png` (accuracy per method, mean ± SD over seeds).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from demo import RECIPES as DEMO_RECIPES
from demo import demo_data, run_once

from llmkd.atomic import atomic_write, write_json
from llmkd.cli.pipeline import REPORT, distill, finetune
from llmkd.data.assets.minilm import minilm_path
from llmkd.evaluation.checkpoints import evaluate_checkpoints

METHOD_RECIPES = Path(__file__).resolve().parent / "methods"
TAG = "[methods]"


@dataclass(frozen=True)
class Method:
    """One row: its recipe (in recipes/methods unless `demo`), the survey's category, what is evaluated."""

    recipe: str
    category: str
    demo: bool = False
    outputs: tuple = (
        ".",
    )  # model folders inside the run folder that are scored (mutual learning: every peer)
    extra: dict = field(default_factory=dict)  # flags; "{labels}" is the labels-only run of the same seed
    more: dict = field(default_factory=dict)  # rows scored from the same runs: row name -> model subfolder


# Multi-teacher: the three teachers the bench made (the recipe's own list names the default folders).
TEACHERS = (
    "[{{model: {teacher}, name: seed42}}, {{model: {t43}, name: seed43}}, {{model: {t44}, name: seed44}}]"
)
METHODS = {
    "labels only": Method("baseline.yaml", "control: no teacher", demo=True),
    "logit KD": Method("logit_kd.yaml", "offline, response (Hinton et al. 2015)"),
    "logit + hidden KD (the demo)": Method("distil.yaml", "offline, response + feature", demo=True),
    "multi-teacher (3 seeds)": Method(
        "multi_teacher.yaml",
        "offline, ensemble of teachers (+ hidden, as the demo)",
        extra={"--teachers": TEACHERS},
    ),
    "mutual learning (2 peers)": Method(
        "mutual.yaml", "online (Zhang et al. 2018)", outputs=("peer-0", "peer-1")
    ),
    "born-again (generation 2)": Method(
        "born_again.yaml",
        "self (Furlanello et al. 2018)",
        extra={
            "--teacher": "{labels}",
            "--born_again": "{{generations: 2, ensemble: true, student_init: {teacher}}}",
        },
        more={"born-again (generation 1)": "generation-1"},
    ),
    "mean teacher (EMA)": Method(
        "mean_teacher.yaml",
        "self (Tarvainen & Valpola 2017)",
        more={"mean teacher: the averaged model": "mean-teacher"},
    ),
    "adversarial": Method("adversarial.yaml", "adversarial (Xu et al. 2018)"),
    "IRG": Method("irg.yaml", "relation, graph (Liu et al. 2019)"),
    "FSP": Method("fsp.yaml", "relation, flow (Yim et al. 2017)"),
    "MiniLM relations": Method("minilm_relations.yaml", "feature, attention relation (Wang et al. 2021)"),
    "early exits (teacher + exits)": Method(
        "early_exit.yaml", "self, deep → shallow (Liu et al. 2020)", extra={"--student": "{teacher}"}
    ),
}
EXITS = "early exits (teacher + exits)"  # scored by exit_curve: accuracy and batch-1 latency per threshold
EXIT_THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
# The threshold reported: the fastest within 1 point of the full model's accuracy on SELECTION_ROWS held-out rows.
MAX_DROP = 0.01
SELECTION_ROWS = 300
BASELINES = ("labels only", "logit KD")


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/methods", help="runs, extra teachers and the report")
    parser.add_argument(
        "--demo", default="runs/demo", help="the demo's folder: its data and teacher are reused"
    )
    parser.add_argument("--seeds", type=int, default=3, help="runs per method (seeds 42, 43, …)")
    parser.add_argument("--train-samples", type=int, default=4000, help="training rows every method sees")
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs over those rows, every method")
    parser.add_argument("--methods", nargs="*", default=None, help=f"a subset of {list(METHODS)}")
    parser.add_argument("--smoke", action="store_true", help="a few steps on a slice: what the tests run")
    parser.add_argument("--base-model", default=None, help="teacher base model (default: MiniLM from PyPI)")
    parser.add_argument("--data-dir", default=None, help="train/validation.jsonl (default: the demo's)")
    return parser.parse_args(argv)


def teachers(args, common: list[str]) -> dict[int, Path]:
    """The demo's teacher (seed 42) and the extra seeds multi-teacher distillation reads, made if missing."""
    base = ["--model", args.base_model or minilm_path()]
    folders = {
        42: Path(args.demo) / "teacher",
        43: Path(args.out) / "teacher-seed43",
        44: Path(args.out) / "teacher-seed44",
    }
    for seed, folder in folders.items():
        seed_flag = (
            [] if seed == 42 else ["--seed", str(seed)]
        )  # the demo's own teacher keeps the demo's inputs
        run_once(finetune, "teacher.yaml", folder, [*common, *base, *seed_flag], DEMO_RECIPES, TAG)
    return folders


def run_methods(args, common: list[str], folders: dict[int, Path]) -> dict[str, list[Path]]:
    """Every method once per seed; {method: [run folders]}."""
    teacher = folders[42]
    paths = {"teacher": teacher, "t43": folders[43], "t44": folders[44]}
    out, runs = Path(args.out), {}
    chosen = args.methods or list(METHODS)
    for seed in range(42, 42 + args.seeds):
        labels = out / f"labels-only-seed{seed}"
        for name in dict.fromkeys(
            ["labels only", *chosen]
        ):  # born-again's teacher is the labels-only student
            method = METHODS[name]
            folder = labels if name == "labels only" else out / f"{slug(name)}-seed{seed}"
            flags = [*common, "--teacher", str(teacher), "--seed", str(seed)]
            for flag, value in method.extra.items():
                flags += [flag, value.format(labels=labels, **paths)]
            recipes = DEMO_RECIPES if method.demo else METHOD_RECIPES
            run_once(distill, method.recipe, folder, flags, recipes, TAG)
            runs.setdefault(name, []).append(folder)
    return {name: folders for name, folders in runs.items() if name in chosen or name in BASELINES}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def scored_models(runs: dict[str, list[Path]]) -> dict[str, str]:
    """Display name -> model folder of every scored model (each peer of mutual learning, each seed)."""
    models = {}
    for name, folders in runs.items():
        if name == EXITS:
            continue
        for folder in folders:
            seed = folder.name.rsplit("-", 1)[-1]
            for sub in METHODS[name].outputs:
                suffix = "" if sub == "." else f" {sub}"
                models[f"{name} ({seed}{suffix})"] = str(folder / sub)
            for row, sub in METHODS[name].more.items():
                models[f"{row} ({seed})"] = str(folder / sub)
    return models


def wall_minutes(folder: Path) -> float:
    """Training wall time of a run (every generation of a born-again run), from its reports."""
    # A born-again run's own report summarises its generations: their reports hold the training times.
    reports = sorted(folder.glob(f"generation-*/{REPORT}")) or [folder / REPORT]
    total = 0.0
    for path in reports:
        if path.is_file():
            total += json.loads(path.read_text()).get("train", {}).get("train_runtime", 0.0)
    return total / 60


def training_slice(args, data_dir: Path, out: Path) -> tuple[Path, Path]:
    """A seeded random sample of `--train-samples` training rows (the split is in source order, and its first
    rows are nearly all positive, so a first-N slice would teach one class), and the rows left out, from which the
    early-exit threshold is chosen. Written once; the same files for every method and seed."""
    from datasets import load_dataset

    train = load_dataset("json", data_files=str(data_dir / "train.jsonl"), split="train").shuffle(seed=0)
    n = min(args.train_samples, len(train) - 1)
    files = out / "data" / f"train-{n}.jsonl", out / "data" / "held-out.jsonl"
    for path, rows in zip(files, (train.select(range(n)), train.select(range(n, len(train))))):
        if not path.is_file():
            text = "".join(json.dumps(row) + "\n" for row in rows)
            atomic_write(str(path), lambda handle, text=text: handle.write(text))
    return files


def evaluate(args, runs: dict, teacher: Path, data_dir: Path, held_out: Path) -> dict:
    """Accuracy of every model on the validation split; CPU speed of the teacher and of one student per shape
    (every 2-layer student has the same architecture, so one timing serves them all)."""
    smoke = {"max_eval_samples": 32} if args.smoke else {}
    models = scored_models(runs)
    scores = evaluate_checkpoints(
        {"teacher": str(teacher), **models}, task="sst2", data_dir=str(data_dir), speed_repeats=0, **smoke
    )
    first = next(iter(models))
    speed = evaluate_checkpoints(
        {"teacher": str(teacher), "student": models[first]},
        task="sst2",
        data_dir=str(data_dir),
        max_eval_samples=32,
        speed_repeats=2 if args.smoke else 10,
        speed_seq_len=32 if args.smoke else 128,
    )
    curves = exit_curves(args, runs.get(EXITS, []), data_dir, held_out)
    return {"scores": scores, "speed": speed, "exits": curves}


def exit_curves(args, folders: list[Path], data_dir: Path, held_out_file: Path) -> dict:
    """Each seed's exit curve on the validation split (batch 1, the full model timed beside each threshold)."""
    from datasets import load_dataset

    from llmkd.evaluation.exits import exit_curve

    if not folders:
        return {}
    validation = load_dataset("json", data_files=str(data_dir / "validation.jsonl"), split="train")
    # The threshold is chosen on training rows no student or exit was trained on, then scored on the
    # validation split: choosing it on the validation split would flatter the row.
    held_out = load_dataset("json", data_files=str(held_out_file), split="train")
    held_out = held_out.select(range(min(SELECTION_ROWS, len(held_out))))
    if args.smoke:
        validation, held_out = validation.select(range(32)), held_out.select(range(min(8, len(held_out))))
    curves = {}
    for folder in folders:
        select = exit_curve(folder, held_out, EXIT_THRESHOLDS, repeats=1, warmup=5)["points"]
        ok = [p for p in select if p["accuracy"] >= select[0]["accuracy"] - MAX_DROP]
        threshold = max(ok, key=lambda p: p["speedup"])["threshold"]
        curve = exit_curve(folder, validation, EXIT_THRESHOLDS, repeats=1, warmup=5, out_dir=folder)["points"]
        chosen = next(p for p in curve if p["threshold"] == threshold)
        curves[folder.name] = chosen | {"curve": curve, "selection": select}
    return curves


def summarise(runs: dict, results: dict) -> dict:
    """Per method: accuracy mean ± SD over its models (seeds × peers), % of teacher, agreement, wall time."""
    models = results["scores"]["models"]
    teacher = models["teacher"]["score"]
    student = results["speed"]["models"]["student"]
    # Batch-1 latency, the measure the early-exit row has too (exits decide per example); throughput in the JSON.
    speedup = student.get("latency_speedup")
    out = {"teacher_accuracy": teacher, "student_speedup": speedup, "methods": {}}
    out["student_throughput_speedup"] = student.get("speedup")
    for name, folders in runs.items():
        if name == EXITS:
            out["methods"][name] = exit_summary(results["exits"], folders, teacher)
            continue
        minutes = statistics.mean(wall_minutes(f) for f in folders)
        for row in (name, *METHODS[name].more):  # rows scored from the same runs share their wall time
            entries = [m for key, m in models.items() if key.startswith(f"{row} (")]
            out["methods"][row] = row_summary(entries, teacher, speedup, minutes)
            out["methods"][row]["category"] = METHODS[name].category + ("" if row == name else ", same runs")
        if name.startswith("born-again"):
            out["born_again_ensemble"] = ensemble_scores(folders)
    return out


def row_summary(entries: list[dict], teacher: float, speedup, minutes: float) -> dict:
    scores = [m["score"] for m in entries]
    return {
        "models": len(entries),
        "accuracy_mean": statistics.mean(scores),
        "accuracy_sd": statistics.stdev(scores) if len(scores) > 1 else None,
        "pct_of_teacher": 100 * statistics.mean(scores) / teacher,
        "agreement_mean": statistics.mean(m["mean_agreement"] for m in entries),
        "speedup": speedup,
        "wall_minutes_mean": minutes,
    }


def ensemble_scores(folders: list[Path]) -> list[float]:
    """The born-again ensemble's accuracy (mean of the generations' probabilities) from each run's report."""
    reports = [json.loads((f / REPORT).read_text()) for f in folders]
    return [
        r["born_again"]["ensemble"]["eval"]["eval_accuracy"] for r in reports if "ensemble" in r["born_again"]
    ]


def exit_summary(curves: dict, folders: list[Path], teacher: float) -> dict:
    """The early-exit row: each seed at its reported threshold; the speed-up is batch-1 latency vs the full model."""
    chosen = [curves[f.name] for f in folders]
    scores = [c["accuracy"] for c in chosen]
    return {
        "category": METHODS[EXITS].category,
        "models": len(chosen),
        "accuracy_mean": statistics.mean(scores),
        "accuracy_sd": statistics.stdev(scores) if len(scores) > 1 else None,
        "pct_of_teacher": 100 * statistics.mean(scores) / teacher,
        "agreement_mean": None,
        "speedup": statistics.mean(c["speedup"] for c in chosen),
        "thresholds": [c["threshold"] for c in chosen],
        "average_exit_layer": statistics.mean(c["average_exit_layer"] for c in chosen),
        "wall_minutes_mean": statistics.mean(wall_minutes(f) for f in folders),
    }


def markdown(summary: dict, args) -> str:
    base = summary["methods"]
    lines = [
        f"# llmkd methods on Rotten Tomatoes: MiniLM teacher ({100 * summary['teacher_accuracy']:.1f}) vs 2-layer "
        "students",
        "",
        f"Every student: teacher layers [0, 3], the same {args.train_samples} training sentences (a seeded random "
        f"sample), {args.epochs:g} epoch(s), seeds 42–{41 + args.seeds}; scored on the validation split. The "
        "early-exit row is the teacher itself with exits, at the fastest threshold within 1 point of the full "
        "model on held-out training rows. Speed-ups: batch-1 CPU latency vs the teacher. Command: "
        "`make bench-methods`.",
        "",
        "| method | category | models | accuracy | Δ vs labels only | Δ vs logit KD | % of teacher | agreement | "
        "speed-up (latency, batch 1) | train min |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in base.items():
        sd = "" if m["accuracy_sd"] is None else f" ± {100 * m['accuracy_sd']:.1f}"
        deltas = [
            f"{100 * (m['accuracy_mean'] - base[b]['accuracy_mean']):+.1f}" if b in base else "–"
            for b in BASELINES
        ]
        speed = "–" if m["speedup"] is None else f"×{m['speedup']:.2f}"
        agreement = "–" if m["agreement_mean"] is None else f"{m['agreement_mean']:.3f}"
        lines.append(
            f"| {name} | {m['category']} | {m['models']} | {100 * m['accuracy_mean']:.1f}{sd} | {deltas[0]} | "
            f"{deltas[1]} | {m['pct_of_teacher']:.1f}% | {agreement} | {speed} | "
            f"{m['wall_minutes_mean']:.1f} |"
        )
    ensemble = summary.get("born_again_ensemble") or []
    if ensemble:
        sd = f" ± {100 * statistics.stdev(ensemble):.1f}" if len(ensemble) > 1 else ""
        lines += ["", f"Born-again ensemble (mean of generations 1–2's probabilities): "
                  f"{100 * statistics.mean(ensemble):.1f}{sd} over {len(ensemble)} seed(s)."]  # fmt: skip
    exits = summary["methods"].get(EXITS)
    if exits:
        lines += ["", f"Early exits: thresholds {exits['thresholds']}, average exit layer "
                  f"{exits['average_exit_layer']:.2f} of 6; curves in each run's exit_curve.json / .png."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["methods"])
    means = [100 * summary["methods"][n]["accuracy_mean"] for n in names]
    sds = [100 * (summary["methods"][n]["accuracy_sd"] or 0) for n in names]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.5))
    ax.barh(names, means, xerr=sds, capsize=3, color="tab:blue")
    ax.axvline(100 * summary["teacher_accuracy"], color="tab:red", linestyle="--", label="teacher")
    ax.set_xlim(min(means) - 3, max(max(means), 100 * summary["teacher_accuracy"]) + 1)
    ax.invert_yaxis()
    ax.set_xlabel("validation accuracy (%), mean ± SD over seeds")
    ax.legend(loc="lower right")
    fig.tight_layout()
    atomic_write(str(path), lambda handle: fig.savefig(handle, format="png", dpi=120), "wb")
    plt.close(fig)


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out)
    # The demo's data (prepared if missing) and the flags that point at it.
    data_dir, common = demo_data(args.data_dir, Path(args.demo), args.smoke)
    folders = teachers(args, common)
    train_file, held_out = training_slice(args, data_dir, out)
    subset = ["--train_file", str(train_file), "--num_train_epochs", str(args.epochs)]
    train_flags = [*common, *([] if args.smoke else subset)]  # smoke: the demo's smoke slice and two steps
    runs = run_methods(args, train_flags, folders)
    results = evaluate(args, runs, folders[42], data_dir, held_out)
    summary = summarise(runs, results)
    table = markdown(summary, args)
    write_json(str(out / "report.json"), {"summary": summary, "results": results})
    atomic_write(str(out / "report.md"), lambda handle: handle.write(table))
    plot(summary, out / "methods.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
