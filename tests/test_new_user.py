"""What tripped a new user (issue 11, item 5): recipes run from another folder, models that cannot be reached
offline, one checkpoint scored at two lengths, "± 0.0" for one seed, recipe headers naming folders the demo
does not write."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import BertForSequenceClassification, bert_config, make_tokenizer, seeded, sentences
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from llmkd.cli import main
from llmkd.cli.recipe import load_stages
from llmkd.cli.usage import EMBEDDED_MODELS, hub_hint

ROOT = Path(__file__).resolve().parent.parent
MAX_LENGTH = 6  # shorter than most of the sentences below (3-12 words + [CLS]/[SEP])


@pytest.fixture
def project(tmp_path):
    """A user's folder: a tiny teacher and data beside a recipe that names them relative to the recipe."""
    root = tmp_path / "project"
    # Wide initial weights: predictions that depend on the text (and so on where it is cut).
    teacher = seeded(BertForSequenceClassification, bert_config(initializer_range=0.5), 0)
    teacher.save_pretrained(root / "models" / "teacher")
    make_tokenizer("bert").save_pretrained(root / "models" / "teacher")
    (root / "data").mkdir()
    for split, n in (("train", 24), ("validation", 24)):
        rows = [{"sentence": s, "label": int("w1" in s)} for s in sentences(n, seed=n + len(split))]
        (root / "data" / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    recipe = {
        "teacher": "models/teacher",
        "student_layers": [0, 2],
        "train_file": "data/train.jsonl",
        "validation_file": "data/validation.jsonl",
        "text_columns": ["sentence"],
        "max_length": MAX_LENGTH,
        "output_dir": "out",  # relative to the working directory, as in transformers
        "max_steps": 3,
        "learning_rate": 1e-3,
        "per_device_train_batch_size": 4,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return root


def test_recipe_paths_are_found_beside_the_recipe(project, monkeypatch):
    monkeypatch.chdir(project.parent / "elsewhere")
    [(run, args)] = load_stages(str(project / "recipe.yaml"), [])
    assert run.train_file == str(project / "data" / "train.jsonl")
    assert run.teacher == str(project / "models" / "teacher")
    assert args.output_dir == "out"  # outputs stay relative to the working directory
    monkeypatch.chdir(project.parent)
    (project.parent / "data").mkdir()
    (project.parent / "data" / "train.jsonl").write_text((project / "data" / "train.jsonl").read_text())
    [(run, _)] = load_stages(str(project / "recipe.yaml"), [])
    assert run.train_file == "data/train.jsonl"  # found relative to the working directory first


@pytest.mark.parametrize("value", ["./models/gone", "a/b/c", "/nowhere/teacher"])
def test_a_flag_path_found_nowhere_is_named_relative_to_the_working_directory(project, monkeypatch, value):
    monkeypatch.chdir(project.parent / "elsewhere")
    with pytest.raises(FileNotFoundError) as err:
        load_stages(str(project / "recipe.yaml"), ["--teacher", value])
    message = str(err.value)
    assert message.startswith(f"teacher: {value!r} does not exist; looked for {os.path.abspath(value)} (")
    assert str(project) not in message  # a flag is the user's own: only the working directory is searched


def test_a_missing_recipe_path_names_the_working_directory_and_the_recipe_folder(project, monkeypatch):
    values = yaml.safe_load((project / "recipe.yaml").read_text()) | {"train_file": "data/missing.jsonl"}
    (project / "recipe.yaml").write_text(yaml.safe_dump(values))
    monkeypatch.chdir(project.parent / "elsewhere")
    with pytest.raises(FileNotFoundError) as err:
        load_stages(str(project / "recipe.yaml"), [])
    message = str(err.value)
    assert "train_file: 'data/missing.jsonl' does not exist" in message
    assert str(project.parent / "elsewhere" / "data" / "missing.jsonl") in message
    assert str(project / "data" / "missing.jsonl") in message and "--train_file PATH" in message


def test_a_hub_id_is_left_to_the_hub(project, monkeypatch):
    """Even when the recipe's folder holds a folder of that name that is not a saved model."""
    (project / "namespace" / "some-model").mkdir(parents=True)
    values = yaml.safe_load((project / "recipe.yaml").read_text()) | {"teacher": "namespace/some-model"}
    (project / "recipe.yaml").write_text(yaml.safe_dump(values))
    monkeypatch.chdir(project.parent / "elsewhere")
    [(run, _)] = load_stages(str(project / "recipe.yaml"), [])
    assert run.teacher == "namespace/some-model"


def test_an_unreachable_hub_model_suggests_the_embedded_ones(project, monkeypatch, capsys):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py: the Hub is never contacted
    recipe = project / "finetune.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": "nobody-here/no-such-model",
                "class_names": ["a", "b"],
                "train_file": "data/train.jsonl",
            }
            | {"text_columns": ["sentence"], "output_dir": str(project / "ft"), "report_to": "none"}
        )
    )
    assert main(["finetune", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmkd: error:") and "Traceback" not in err
    assert "embedded:all-minilm-l6-v2" in err and "model: embedded:all-minilm-l6-v2" in err


def test_hub_hints_follow_the_hub_client_errors():
    from huggingface_hub.errors import HFValidationError

    try:
        try:
            raise HFValidationError("Repo id must be in the form 'repo_name' or 'namespace/repo_name'")
        except HFValidationError as inner:
            raise OSError("Repo id must be ...") from inner
    except OSError as err:
        assert "check the path" in hub_hint(err)
    assert hub_hint(OSError("disk full")) == "" and all(m.startswith("embedded:") for m in EMBEDDED_MODELS)


# Every way llmkd trains a classifier: (command, recipe changes, folder scored, its accuracy in the run's report).
TRAINING_PATHS = {
    "distill": ("distill", {}, ".", "eval_accuracy"),
    "finetune": (
        "finetune",
        {
            "model": "models/teacher",
            "class_names": ["negative", "positive"],
            "teacher": None,
            "student_layers": None,
        },
        ".",
        "eval_accuracy",
    ),
    "mutual peer 1": (
        "distill",
        {"trainer": "mutual", "num_peers": 2, "peer_heads": "reinit"},
        "peer-1",
        "eval_peer1_accuracy",
    ),
    "born-again generation 1": (
        "distill",
        {"born_again": {"generations": 2}, "student_layers": None, "student": "models/teacher"},
        "generation-1",
        "eval_accuracy",
    ),
    "multi-teacher": (
        "distill",
        {"teachers": [{"model": "models/teacher", "name": "a"}, {"model": "models/teacher", "name": "b"}]},
        ".",
        "eval_accuracy",
    ),
    "early exits": (
        "distill",
        {"trainer": "early_exit", "student": "models/teacher", "student_layers": None, "exit_layers": [1, 2]},
        ".",
        "eval_accuracy",
    ),
}


@pytest.mark.parametrize("path", TRAINING_PATHS)
def test_one_checkpoint_gets_one_accuracy_in_the_run_and_in_llmkd_eval(project, monkeypatch, tmp_path, path):
    """Trained and evaluated at max_length 6 from another folder; `llmkd eval` cuts at the saved length."""
    command, changes, folder, metric = TRAINING_PATHS[path]
    values = yaml.safe_load((project / "recipe.yaml").read_text()) | changes
    (project / "recipe.yaml").write_text(yaml.safe_dump({k: v for k, v in values.items() if v is not None}))
    monkeypatch.chdir(project.parent / "elsewhere")
    assert main([command, str(project / "recipe.yaml")]) == 0
    out = project.parent / "elsewhere" / "out"
    report_file = next(
        f for f in (out / folder / "llmkd_report.json", out / "llmkd_report.json") if f.is_file()
    )
    in_run = json.loads(report_file.read_text())["eval"][metric]  # peers report in the run's folder
    tokenizer = AutoTokenizer.from_pretrained(out / folder)
    assert tokenizer.model_max_length == MAX_LENGTH
    data = str(project / "data")
    assert main(["eval", "--task", "sst2", "--checkpoints", f"student={out / folder}", "--data_dir", data]
                + ["--speed_repeats", "0", "--out", str(tmp_path / "eval")]) == 0  # fmt: skip
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["models"]["student"]["metrics"]["sst2"]["validation"]["accuracy"] == pytest.approx(in_run)
    # Negative control: cut at another length, the same checkpoint predicts other labels on this data.
    from llmkd.evaluation.checkpoints import logits_for_texts

    model = AutoModelForSequenceClassification.from_pretrained(out / folder).eval()
    texts = [[json.loads(line)["sentence"] for line in (project / "data" / "validation.jsonl").open()]]
    short, long = (logits_for_texts(model, tokenizer, texts, 8, n) for n in (MAX_LENGTH, 64))
    assert (short.argmax(-1) != long.argmax(-1)).any()


def _demo_module():
    spec = importlib.util.spec_from_file_location("demo_recipe", ROOT / "recipes" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_seed_prints_no_spread():
    demo = _demo_module()
    models = {"teacher": {"score": 0.85}}
    models |= {
        f"distilled (seed{s})": {"score": v, "mean_agreement": 0.9, "speedup": 3.0} for s, v in ((42, 0.835),)
    }
    one = demo.summary_markdown(demo.summarise({"models": models}, {"distilled": [None]}))
    assert "| 83.5 (1 seed) |" in one and "±" not in one
    models["distilled (seed43)"] = {"score": 0.825, "mean_agreement": 0.9, "speedup": 3.0}
    two = demo.summary_markdown(demo.summarise({"models": models}, {"distilled": [None, None]}))
    assert "| 83.0 ± 0.7 |" in two  # sample SD of 83.5 and 82.5


def test_demo_recipe_headers_name_the_folders_the_demo_writes():
    """recipes/demo.py runs teacher.yaml into <out>/teacher and each student recipe into
    <out>/student-<recipe>-seed<k>; a header that names only its own output_dir sends users looking in vain."""
    source = (ROOT / "recipes" / "demo.py").read_text()
    assert "out / f\"student-{recipe.split('.')[0]}-seed{seed}\"" in source and 'out / "teacher"' in source
    run_by_demo = re.findall(r'"(\w+)\.yaml"', source.split("def main", 1)[1])
    assert set(run_by_demo) == {"teacher", "distil", "baseline"}
    for stem in run_by_demo:
        header = "".join(
            line for line in (ROOT / "recipes" / "demo" / f"{stem}.yaml").open() if line[0] == "#"
        )
        folder = "runs/demo/teacher" if stem == "teacher" else f"runs/demo/student-{stem}-seed42"
        assert folder in header, stem
