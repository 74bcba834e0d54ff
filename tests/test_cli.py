"""The command line: YAML recipes, flag precedence, and a tiny end-to-end run (recipe smoke tier)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import BertForSequenceClassification, bert_config, make_tokenizer, seeded, sentences
from transformers import AutoModelForSequenceClassification

from llmkd import DistillationConfig
from llmkd.cli import main
from llmkd.cli.pipeline import distill
from llmkd.cli.recipe import FINETUNE, RunConfig, load_config, load_stages, parse_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_recipe(tmp_path):
    """A saved tiny BERT teacher, jsonl data and a YAML recipe that distils it into 2 of its layers."""
    teacher_dir = tmp_path / "teacher"
    seeded(BertForSequenceClassification, bert_config(), 0).save_pretrained(teacher_dir)
    make_tokenizer("bert").save_pretrained(teacher_dir)
    for split, n in (("train", 24), ("validation", 8)):
        rows = [{"sentence": s, "label": i % 2} for i, s in enumerate(sentences(n, seed=len(split)))]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    recipe = {
        "teacher": str(teacher_dir),
        "student_layers": [0, 2],
        "train_file": str(tmp_path / "train.jsonl"),
        "validation_file": str(tmp_path / "validation.jsonl"),
        "text_columns": ["sentence"],
        "max_length": 32,
        "output_dir": str(tmp_path / "out"),
        "max_steps": 3,
        "learning_rate": 1e-3,
        "per_device_train_batch_size": 4,
        "report_to": "none",
        "use_cpu": True,
        "temperature": 2.0,
        "terms": [{"knowledge": "logits", "loss": "forward_kl"}, {"knowledge": "hidden", "loss": "cosine"}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_overrides_are_typed():
    assert parse_overrides(
        ["--learning_rate", "1e-4", "--max_steps=7", "--bf16", "--terms", "[{knowledge: logits, loss: tvd}]"]
    ) == {
        "learning_rate": 1e-4,
        "max_steps": 7,
        "bf16": True,
        "terms": [{"knowledge": "logits", "loss": "tvd"}],
    }
    with pytest.raises(ValueError, match="unexpected argument 'stray'"):
        parse_overrides(["stray"])


def test_precedence_defaults_then_yaml_then_flags(tiny_recipe):
    run, args = load_config(str(tiny_recipe), [])
    assert args.temperature == 2.0 and args.max_steps == 3  # from the YAML
    assert args.hard_label_weight == 0.5  # the dataclass default
    run, args = load_config(str(tiny_recipe), ["--temperature", "4", "--student_layers", "[1, 3]"])
    assert args.temperature == 4.0 and run.student_layers == [1, 3]  # flags win


def test_unknown_keys_get_a_suggestion(tiny_recipe):
    with pytest.raises(ValueError, match=r"temprature \(did you mean temperature\?\)"):
        load_config(str(tiny_recipe), ["--temprature", "3"])
    with pytest.raises(ValueError, match="exactly one of student, student_layers, student_config"):
        load_config(str(tiny_recipe), ["--student", "somewhere"])


def test_distill_end_to_end_writes_a_plain_student_and_a_report(tiny_recipe, tmp_path, capsys):
    assert main(["distill", str(tiny_recipe)]) == 0
    out = tmp_path / "out"
    student, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert student.config.num_hidden_layers == 2
    report = json.loads((out / "llmkd_report.json").read_text())
    assert 0.0 <= report["eval"]["eval_agreement"] <= 1.0
    assert report["student"]["layers"] == 2 and report["teacher_size"]["layers"] == 4
    assert (out / "tokenizer.json").is_file()


def test_errors_are_reported_without_a_traceback(tiny_recipe, capsys):
    assert main(["distill", str(tiny_recipe), "--temperature", "0"]) == 2
    assert "llmkd: error: temperature must be > 0, got 0" in capsys.readouterr().err


def test_recipe_script_runs_under_python(tiny_recipe, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        os.path.join(ROOT, "recipes", "distill.py"),
        str(tiny_recipe),
        "--max_steps",
        "1",
        "--output_dir",
        str(tmp_path / "script_out"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "script_out" / "model.safetensors").is_file()


@pytest.mark.parametrize("pair", [(RunConfig, DistillationConfig), FINETUNE])
def test_recipe_keys_never_shadow_training_arguments(pair):
    run_cls, args_cls = pair
    run_keys = {f.name for f in dataclasses.fields(run_cls)}
    assert not run_keys & {f.name for f in dataclasses.fields(args_cls)}


def test_two_stage_recipe_runs_both_stages_and_chains_the_student(tiny_recipe, tmp_path):
    recipe = yaml.safe_load(tiny_recipe.read_text())
    recipe.pop("terms")
    recipe["stages"] = [
        {"terms": [{"knowledge": "hidden", "loss": "mse"}], "hard_label_weight": 0.0},
        {"terms": [{"knowledge": "logits", "loss": "soft_ce"}], "temperature": 1.0},
    ]
    path = tmp_path / "two_stage.yaml"
    path.write_text(yaml.safe_dump(recipe))
    stages = load_stages(str(path), ["--learning_rate", "5e-4"])
    assert [a.output_dir for _, a in stages] == [str(tmp_path / "out" / "stage-1"), str(tmp_path / "out")]
    assert stages[1][0].student == str(tmp_path / "out" / "stage-1") and stages[1][0].student_layers is None
    assert [a.learning_rate for _, a in stages] == [5e-4, 5e-4]  # flags override every stage
    assert stages[0][1].temperature == 2.0 and stages[1][1].temperature == 1.0
    report = distill(str(path))
    assert len(report["stages"]) == 1 and report["student"]["layers"] == 2
    assert (tmp_path / "out" / "stage-1" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_smoke_mode_shrinks_any_recipe(tiny_recipe):
    ((run, args),) = load_stages(str(tiny_recipe), ["--smoke", "--max_steps", "50"])
    assert args.max_steps == 2 and run.max_train_samples == 32 and args.save_strategy == "no"


def test_frozen_embeddings_stay_fixed(tiny_recipe, tmp_path):
    from llmkd.cli.pipeline import build_models

    run, args = load_config(str(tiny_recipe), ["--freeze_embeddings"])
    *_, student, _ = build_models(run, args)
    assert not student.get_input_embeddings().weight.requires_grad
    assert student.bert.encoder.layer[0].attention.self.query.weight.requires_grad
