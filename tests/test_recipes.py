"""Recipe smoke tier: every shipped recipe runs end to end in smoke mode on tiny local models and data."""

from __future__ import annotations

import importlib.util
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

from llmkd.cli.pipeline import distill, finetune

ROOT = Path(__file__).resolve().parent.parent
GLUE_RECIPES = sorted((ROOT / "recipes" / "glue").glob("*.yaml"))
TINY_STUDENT = "{num_hidden_layers: 2, hidden_size: 16, num_attention_heads: 4, intermediate_size: 32}"


@pytest.fixture(scope="module")
def tiny_glue(tmp_path_factory):
    """A 12-layer (narrow) BERT 'teacher' with generic labels, like the Hub's textattack checkpoints, and SST-2
    format files."""
    root = tmp_path_factory.mktemp("glue")
    seeded(BertForSequenceClassification, bert_config(layers=12), 0).save_pretrained(root / "teacher")
    make_tokenizer("bert").save_pretrained(root / "teacher")
    for split, n in (("train", 40), ("validation", 16)):
        rows = [{"sentence": s, "label": int("w1" in s)} for s in sentences(n, seed=n)]
        (root / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def smoke_flags(tiny_glue, out: Path) -> list[str]:
    return ["--smoke", "--data_dir", str(tiny_glue), "--output_dir", str(out), "--use_cpu", "true"]


def test_every_glue_recipe_is_covered():
    assert {p.stem for p in GLUE_RECIPES} == {
        "finetune_teacher",
        "distilbert_6layer",
        "tinybert_4layer",
        "logits_only",
    }


@pytest.mark.parametrize("recipe", GLUE_RECIPES, ids=lambda p: p.stem)
def test_glue_recipe_smoke(recipe, tiny_glue, tmp_path):
    teacher = str(tiny_glue / "teacher")
    if recipe.stem == "finetune_teacher":
        report = finetune(str(recipe), [*smoke_flags(tiny_glue, tmp_path / "out"), "--model", teacher])
    else:
        flags = [*smoke_flags(tiny_glue, tmp_path / "out"), "--teacher", teacher]
        if recipe.stem == "tinybert_4layer":
            flags += ["--student_config", TINY_STUDENT]
        report = distill(str(recipe), flags)
        assert report["student"]["layers"] in (2, 6)
    assert "eval_accuracy" in report["eval"]  # the GLUE metric of sst2
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_demo_smoke(tiny_glue, tmp_path):
    """recipes/demo.py end to end (fine-tune, distil, baseline, report) with a tiny base model."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(ROOT / "recipes" / "demo.py"),
        "--smoke",
        "--out",
        str(tmp_path / "demo"),
        "--base-model",
        str(tiny_glue / "teacher"),
        "--data-dir",
        str(tiny_glue),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| teacher" in done.stdout and "distilled" in done.stdout and "labels only" in done.stdout
    for name in ("report.md", "report.json", "score_vs_speedup.png"):
        assert (tmp_path / "demo" / name).is_file()
    again = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=600
    )  # resumes: nothing retrained
    assert again.returncode == 0 and again.stdout.count("is done, reusing it") == 3


@pytest.mark.multiprocess
def test_accelerate_cpu_config_runs_two_processes(tiny_glue, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"),
        str(ROOT / "recipes" / "distill.py"),
        str(ROOT / "recipes" / "glue" / "logits_only.yaml"),
        *smoke_flags(tiny_glue, tmp_path / "out"),
        "--teacher",
        str(tiny_glue / "teacher"),
    ]
    done = run_launcher(cmd, clean=[tmp_path / "out"], env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((tmp_path / "out" / "llmkd_report.json").read_text())
    assert (
        state["train"]["world_size"] == 2
    )  # really two processes (`--cpu --num_processes 2` would give one)


LLM_RECIPES = sorted((ROOT / "recipes" / "llm").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny Llama 'teacher' and 'student' directory, plus text files with blank lines (as wikitext has)."""
    from conftest import LlamaForCausalLM, llama_config

    root = tmp_path_factory.mktemp("lm")
    from test_cross_tokenizer import DIGIT_VOCAB, digit_tokenizer

    for name, layers, seed in (("teacher", 6, 0), ("student", 2, 1)):
        seeded(LlamaForCausalLM, llama_config(layers=layers), seed).save_pretrained(root / name)
        make_tokenizer("llama").save_pretrained(root / name)
    # A teacher with another tokenizer ('w12' -> 'w' '1' '2'), for the cross-tokenizer recipe.
    seeded(LlamaForCausalLM, llama_config(vocab_size=len(DIGIT_VOCAB)), 2).save_pretrained(
        root / "digit_teacher"
    )
    digit_tokenizer().save_pretrained(root / "digit_teacher")
    for split, n in (("train", 40), ("validation", 8)):
        rows = [{"sentence": s, "text": s} for s in sentences(n, seed=n)] + [{"sentence": "", "text": ""}]
        (root / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        pairs = [
            {"prompt": s, "completion": c} for s, c in zip(sentences(n, seed=n), sentences(n, seed=n + 1))
        ]
        (root / f"pc_{split}.jsonl").write_text("\n".join(json.dumps(r) for r in pairs))
    return root


def test_every_llm_recipe_is_covered():
    assert {p.stem for p in LLM_RECIPES} == {
        "smollm2_smoke",
        "smollm2_cached",
        "smollm2_lora",
        "qwen2.5_qlora",
        "qwen2.5_1.5b_to_0.5b",
        "qwen2.5_on_policy",
        "uld_qwen2.5_to_smollm2",
    }


@pytest.mark.parametrize("recipe", LLM_RECIPES, ids=lambda p: p.stem)
def test_llm_recipe_smoke(recipe, tiny_lm, tmp_path):
    """Each LLM recipe with its teacher/student/data swapped for tiny local ones (all its other keys kept)."""
    values = yaml_keys(recipe)
    prefix = "pc_" if "prompt_column" in values else ""
    cross = values.get("trainer") == "cross_tokenizer"
    flags = [
        "--smoke",
        "--teacher",
        str(tiny_lm / ("digit_teacher" if cross else "teacher")),
        "--train_file",
        str(tiny_lm / f"{prefix}train.jsonl"),
        "--validation_file",
        str(tiny_lm / f"{prefix}validation.jsonl"),
        "--output_dir",
        str(tmp_path / "out"),
        "--use_cpu",
        "true",
        "--bf16",
        "false",
    ]
    if "student" in values:
        flags += ["--student", str(tiny_lm / "student")]
    if "dataset_name" in values:
        flags += ["--dataset_name", "null", "--dataset_config", "null"]
    if values.get("trainer") == "on_policy":
        flags += ["--max_new_tokens", "4", "--max_prompt_length", "8"]
    if "teacher_cache" in values:  # the same recipe first writes the cache, then trains from it
        from llmkd.cli.cache import cache_teacher

        flags += [
            "--teacher_cache",
            str(tmp_path / "cache"),
            "--cache_top_k",
            "8",
        ]  # the tiny vocabulary has 62
        manifest = cache_teacher(str(recipe), flags)
        assert manifest["k"] == 8 and manifest["num_rows"] > 0
    if values.get("qlora") and importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ImportError, match="bitsandbytes"):  # refused before anything is trained
            distill(str(recipe), flags)
        return
    report = distill(str(recipe), flags)
    assert report["task"] == "causal_lm"
    expected = {"on_policy": "OnPolicyTrainer", "cross_tokenizer": "CrossTokenizerTrainer"}
    default = "DistillationTrainer"  # a teacher cache is a teacher source, not a trainer of its own
    assert report["trainer"] == expected.get(values.get("trainer"), default)
    assert not cross or report["eval"]["eval_distill/uld"] > 0  # the ULD term ran on both token streams
    picked = values.get("student_layers", "every:1")  # 'every:K' of the 6-layer tiny teacher
    assert report["student"]["layers"] == (2 if "student" in values else len(range(0, 6, int(picked[6:]))))
    adapter = "lora" in values  # LoRA students save the adapter; merge: true adds a plain model
    assert (tmp_path / "out" / ("adapter_model.safetensors" if adapter else "model.safetensors")).is_file()
    if values.get("lora", {}).get("merge"):
        assert (tmp_path / "out" / "merged" / "model.safetensors").is_file()
        assert not (tmp_path / "out" / "model.safetensors").exists()


def test_qat_demo_recipe_smoke(tiny_glue, tmp_path):
    """recipes/demo/qat_int4.yaml on a tiny teacher and a student picked from its layers: trains and exports."""
    from llmkd.students.from_teacher import student_from_teacher

    teacher = BertForSequenceClassification.from_pretrained(tiny_glue / "teacher")
    student_from_teacher(teacher, [0, 6]).save_pretrained(tmp_path / "student")
    make_tokenizer("bert").save_pretrained(tmp_path / "student")
    flags = ["--smoke", "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--teacher"]
    flags += [str(tiny_glue / "teacher"), "--student", str(tmp_path / "student")]
    flags += [
        "--train_file",
        str(tiny_glue / "train.jsonl"),
        "--validation_file",
        str(tiny_glue / "validation.jsonl"),
    ]
    report = distill(str(ROOT / "recipes" / "demo" / "qat_int4.yaml"), flags)
    config = json.loads((tmp_path / "out" / "quantized" / "quantization_config.json").read_text())
    assert report["quantized"] == str(tmp_path / "out" / "quantized")
    assert {layer["bits"] for layer in config["layers"].values()} == {4}
    assert "eval_accuracy" in report["eval"]


def yaml_keys(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_embedded_model_names_resolve_or_fail_clearly():
    from llmkd.students.loading import resolve_path

    assert resolve_path("some/hub-id") == "some/hub-id" and resolve_path(None) is None
    with pytest.raises(ValueError, match="embedded:smollm2-135m-instruct"):
        resolve_path("embedded:smollm3")


def test_cached_recipe_with_an_embedded_teacher(tiny_lm, tmp_path, monkeypatch):
    """`teacher: embedded:…` resolves the same way in cache-teacher and distill, so the fingerprints agree."""

    from llmkd.cli.cache import cache_teacher
    from llmkd.students.loading import EMBEDDED

    monkeypatch.setitem(EMBEDDED, "embedded:smollm2-135m-instruct", lambda: str(tiny_lm / "teacher"))
    recipe = str(ROOT / "recipes" / "llm" / "smollm2_cached.yaml")
    flags = ["--smoke", "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--cache_top_k", "8"]
    flags += [
        "--train_file",
        str(tiny_lm / "train.jsonl"),
        "--validation_file",
        str(tiny_lm / "validation.jsonl"),
    ]
    flags += ["--teacher_cache", str(tmp_path / "cache")]
    assert cache_teacher(recipe, flags)["num_rows"] > 0
    report = distill(recipe, flags)
    assert report["trainer"] == "DistillationTrainer" and report["teacher_cache"]


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"stages": [{"lora": {"r": 4}}, {}]}, "LoRA may only be set on the last stage"),
        ({"student": "s", "qlora": True, "lora": {"merge": True}}, "cannot fold adapters into a 4-bit base"),
        ({"student": "s", "lora": {"rank": 4}}, "lora must be a mapping with keys from"),
        ({"student": "s", "lora": {"r": 4}, "qat": {"bits": 4}}, "lora and qat together"),
    ],
)
def test_student_option_errors_come_before_any_model_is_loaded(extra, message, tmp_path):
    from llmkd.cli.recipe import load_stages

    values = {"teacher": "t", "student_layers": [0], "train_file": "x.jsonl"} | extra
    if "student" in extra:
        values.pop("student_layers")
    (tmp_path / "r.yaml").write_text(json.dumps(values))  # JSON is YAML
    with pytest.raises(ValueError, match=message):
        load_stages(str(tmp_path / "r.yaml"), [])


def test_prompt_column_on_a_classifier_is_refused(tiny_glue, tmp_path):
    flags = [*smoke_flags(tiny_glue, tmp_path / "out"), "--teacher", str(tiny_glue / "teacher")]
    with pytest.raises(ValueError, match="prompt_column is for causal LMs"):
        distill(str(ROOT / "recipes" / "glue" / "logits_only.yaml"), [*flags, "--prompt_column", "sentence"])
