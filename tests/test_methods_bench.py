"""Recipe smoke tier: `make bench-methods` (recipes/methods.py) end to end on a tiny base model and tiny data.

Every row of the comparison table trains for two steps (the demo's smoke slice), is scored, and lands in the
report; a rerun reuses every finished run. The tiny base has the demo teacher's shape where the recipes depend on
it (6 layers, 12 heads: the MiniLM relation recipe splits 12 relation heads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    BertForSequenceClassification,
    bert_config,
    make_tokenizer,
    run_launcher,
    seeded,
    sentences,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))

import methods  # noqa: E402  (recipes/methods.py)
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from llmkd.students.from_teacher import student_from_teacher  # noqa: E402


def tiny_inputs(root: Path) -> tuple[Path, Path]:
    base, data = root / "base", root / "data"
    seeded(BertForSequenceClassification, bert_config(layers=6, hidden=48, heads=12), 0).save_pretrained(base)
    make_tokenizer("bert").save_pretrained(base)
    data.mkdir()
    for split, n in (("train", 48), ("validation", 32)):
        rows = [{"sentence": s, "label": int("w1" in s)} for s in sentences(n, seed=n)]
        (data / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return base, data


def test_methods_bench_smoke_end_to_end_and_resume(tmp_path):
    base, data = tiny_inputs(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, str(ROOT / "recipes" / "methods.py"), "--smoke", "--seeds", "1",
        "--out", str(tmp_path / "methods"), "--demo", str(tmp_path / "demo"),
        "--base-model", str(base), "--data-dir", str(data),
    ]  # fmt: skip
    # Run from an empty folder: nothing may depend on the recipes' default runs/ paths.
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    report = (tmp_path / "methods" / "report.md").read_text()
    rows = [*methods.METHODS, *(row for m in methods.METHODS.values() for row in m.more)]
    for (
        name
    ) in rows:  # every method, and the rows scored from the same runs (generation 1, the averaged model)
        assert f"| {name} |" in report, name
    assert "Born-again ensemble" in report and "Early exits: thresholds" in report
    summary = json.loads((tmp_path / "methods" / "report.json").read_text())["summary"]
    assert summary["methods"]["mutual learning (2 peers)"]["models"] == 2  # both peers scored
    assert (tmp_path / "methods" / "methods.png").stat().st_size > 0
    assert (tmp_path / "methods" / "born-again-generation-2-seed42" / "generation-2").is_dir()
    assert (tmp_path / "methods" / "early-exits-teacher-exits-seed42" / "exit_curve.json").is_file()
    again = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    # 3 teachers and every method's run are reused, nothing retrained
    assert again.stdout.count("is done, reusing it") == 3 + len(methods.METHODS)


def test_slugs_are_distinct_folder_names():
    slugs = [methods.slug(name) for name in methods.METHODS]
    assert len(set(slugs)) == len(slugs) and all(s and "--" not in s for s in slugs)


# Each scheme's YAML path under `accelerate launch` with 2 CPU processes (their Python paths are compared with one
# process in their own test files): the report must come from two processes.
LAUNCHED = {
    "mutual": [],
    "multi_teacher": ["--teachers", "[{model: BASE, name: seed42}, {model: BASE, name: seed43}]"],
    "early_exit": ["--student", "BASE"],
    "adversarial": [],
    "mean_teacher": [],
    "minilm_relations": [],
    "born_again": [
        "--teacher",
        "GEN0",
        "--born_again",
        "{generations: 2, ensemble: true, student_init: BASE}",
    ],
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("recipe", sorted(LAUNCHED))
def test_method_recipes_run_under_accelerate_launch(recipe, tmp_path):
    base, data = tiny_inputs(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    gen0 = tmp_path / "gen0"  # born-again's generation 0: a 2-layer model of the students' architecture
    student_from_teacher(AutoModelForSequenceClassification.from_pretrained(base), [0, 3]).save_pretrained(
        gen0
    )
    AutoTokenizer.from_pretrained(base).save_pretrained(gen0)
    flags = ["--teacher", str(base)]
    flags += [f.replace("BASE", str(base)).replace("GEN0", str(gen0)) for f in LAUNCHED[recipe]]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"),
        str(ROOT / "recipes" / "distill.py"), str(ROOT / "recipes" / "methods" / f"{recipe}.yaml"),
        "--smoke", "--use_cpu", "true", "--output_dir", str(out),
        "--train_file", str(data / "train.jsonl"), "--validation_file", str(data / "validation.jsonl"), *flags,
    ]  # fmt: skip
    done = run_launcher(cmd, clean=[out], env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "llmkd_report.json").read_text())["train"]["world_size"] == 2
