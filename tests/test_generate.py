"""`llmkd generate` end to end on tiny models, and distillation on what it wrote (recipe smoke tier)."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import (
    BertForSequenceClassification,
    LlamaForCausalLM,
    bert_config,
    llama_config,
    make_tokenizer,
    seeded,
)
from datasets import load_from_disk

from llmkd.cli import main


@pytest.fixture
def model_dirs(tmp_path):
    seeded(LlamaForCausalLM, llama_config(), 0).save_pretrained(tmp_path / "lm")
    make_tokenizer("llama").save_pretrained(tmp_path / "lm")
    config = bert_config(id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    seeded(BertForSequenceClassification, config, 0).save_pretrained(tmp_path / "cls")
    make_tokenizer("bert").save_pretrained(tmp_path / "cls")
    return tmp_path


def write(path, payload):
    path.write_text(yaml.safe_dump(payload))
    return str(path)


def test_generate_teacher_samples(model_dirs, tmp_path):
    recipe = write(
        tmp_path / "gen.yaml",
        {
            "method": "teacher_sampling",
            "teacher": str(model_dirs / "lm"),
            "output_dir": str(tmp_path / "synth"),
            "num_samples": 6,
            "max_new_tokens": 5,
            "batch_size": 2,
            "shard_size": 4,
            "progress_bar": False,
            "store_topk": 3,
        },
    )
    assert main(["generate", recipe, "--seed", "7"]) == 0
    data = load_from_disk(str(tmp_path / "synth" / "dataset"))
    assert len(data) == 6 and max(data["num_generated"]) <= 5
    assert json.loads((tmp_path / "synth" / "provenance.json").read_text())["seed"] == 7


def test_generate_zerogen_then_distil_on_the_synthetic_set(model_dirs, tmp_path):
    recipe = write(
        tmp_path / "zg.yaml",
        {
            "method": "zerogen",
            "teacher": str(model_dirs / "cls"),
            "generator": str(model_dirs / "lm"),
            "output_dir": str(tmp_path / "zg"),
            "num_candidates": 16,
            "batch_size": 4,
            "shard_size": 8,
            "max_new_tokens": 6,
            "progress_bar": False,
            "label_prompts": {"negative": "w1 w2", "positive": "w3 w4"},
            "balance": False,
            "deduplicate": False,
            "stop_strings": [],
        },
    )
    assert main(["generate", recipe]) == 0
    synthetic = tmp_path / "zg" / "dataset"
    assert len(load_from_disk(str(synthetic))) > 0
    distil = write(
        tmp_path / "distil.yaml",
        {
            "teacher": str(model_dirs / "cls"),
            "student_layers": [0, 3],
            "train_file": str(synthetic),
            "text_columns": ["text"],
            "hard_label_weight": 0.0,
            "output_dir": str(tmp_path / "student"),
            "max_steps": 2,
            "report_to": "none",
            "use_cpu": True,
        },
    )
    assert main(["distill", distil]) == 0  # the saved synthetic dataset is a valid train_file
    assert (tmp_path / "student" / "model.safetensors").is_file()


def test_generate_rejects_unknown_keys_before_loading_models(tmp_path, capsys):
    recipe = write(
        tmp_path / "bad.yaml",
        {
            "method": "teacher_sampling",
            "teacher": "nowhere",
            "output_dir": str(tmp_path / "x"),
            "num_sample": 3,
        },
    )
    assert main(["generate", recipe]) == 2
    assert "num_sample (did you mean num_samples?)" in capsys.readouterr().err
