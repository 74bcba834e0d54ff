"""evaluate_checkpoints / write_report / measure_speed / the eval command on tiny BERT classifiers from config."""

from __future__ import annotations

import json
import os
import runpy
import sys

import numpy as np
import pytest
import torch
from conftest import BertForSequenceClassification, bert_config, make_tokenizer, seeded, sentences
from datasets import Dataset, DatasetDict

from llmkd.cli.eval import main
from llmkd.evaluation.checkpoints import evaluate_checkpoints, measure_speed
from llmkd.evaluation.report import markdown_table, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SST2 = {0: "negative", 1: "positive"}
FAST = {"speed_repeats": 1, "speed_warmup": 0, "speed_seq_len": 16, "speed_batch_size": 4}


def classifier(seed: int, names=SST2, small: bool = False, **kw):
    # A wide init makes a random classifier's argmax depend on the input (the default predicts one class).
    size = {"layers": 2, "hidden": 16} if small else {}
    config = bert_config(
        num_labels=len(names),
        id2label=dict(names),
        label2id={v: k for k, v in names.items()},
        initializer_range=0.5,
        **size,
        **kw,
    )
    return seeded(BertForSequenceClassification, config, seed).eval()


def save(model, path):
    model.save_pretrained(path)
    make_tokenizer("bert").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def sst2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sst2")
    texts = sentences(24, seed=3)
    rows = [{"sentence": t, "label": ["negative", "positive"][t.count("w1") % 2]} for t in texts]
    (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, texts, np.array([t.count("w1") % 2 for t in texts])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    teacher, student = classifier(0), classifier(1, small=True)
    return {"teacher": save(teacher, folder / "teacher"), "student": save(student, folder / "student")}


@torch.inference_mode()
def one_by_one(path, texts):
    """Independent predictions: one unpadded example at a time."""
    model = BertForSequenceClassification.from_pretrained(path).eval()
    tok = make_tokenizer("bert")
    return np.array([int(model(**tok(t, return_tensors="pt")).logits.argmax()) for t in texts])


def test_teacher_against_itself_and_a_student(sst2_dir, checkpoints, tmp_path):
    data_dir, texts, labels = sst2_dir
    runs = {
        "teacher": checkpoints["teacher"],
        "copy": checkpoints["teacher"],
        "student": checkpoints["student"],
    }
    results = evaluate_checkpoints(runs, "sst2", data_dir=str(data_dir), batch_size=5, **FAST)
    models = results["models"]
    teacher_pred, student_pred = one_by_one(runs["teacher"], texts), one_by_one(runs["student"], texts)
    for name, pred in (("teacher", teacher_pred), ("student", student_pred)):
        accuracy = float(np.mean(pred == labels))
        assert models[name]["metrics"]["sst2"]["validation"] == pytest.approx({"accuracy": accuracy})
        assert models[name]["score"] == pytest.approx(accuracy)
    assert models["copy"]["pct_of_reference"] == pytest.approx({"sst2": 100.0, "macro": 100.0})
    assert models["copy"]["agreement"] == {"sst2": 1.0}
    agreement = float(np.mean(teacher_pred == student_pred))
    assert 0.0 < agreement < 1.0 and models["student"]["agreement"] == {"sst2": pytest.approx(agreement)}
    assert models["student"]["pct_of_reference"]["macro"] == pytest.approx(
        100 * models["student"]["score"] / models["teacher"]["score"]
    )
    n_teacher = sum(
        p.numel() for p in BertForSequenceClassification.from_pretrained(runs["teacher"]).parameters()
    )
    assert models["teacher"]["params"] == n_teacher > models["student"]["params"]
    assert models["teacher"]["speedup"] == 1.0 and models["student"]["speedup"] > 0
    assert results["examples"] == {"sst2": {"validation": 24}}


def test_report_files(sst2_dir, checkpoints, tmp_path):
    data_dir, *_ = sst2_dir
    results = evaluate_checkpoints(checkpoints, "sst2", data_dir=str(data_dir), max_eval_samples=10, **FAST)
    markdown = write_report(results, str(tmp_path / "report"), title="tiny report")
    written = sorted(os.listdir(tmp_path / "report"))
    assert written == ["report.json", "report.md", "score_vs_speedup.png"]  # no temporary files left behind
    assert (tmp_path / "report" / "report.md").read_text() == markdown
    lines = markdown.splitlines()
    assert lines[0] == "# tiny report" and lines[2].startswith("| model | params | sst2 (acc) | macro |")
    student_row = next(line for line in lines if line.startswith("| student |"))
    accuracy = 100 * results["models"]["student"]["metrics"]["sst2"]["validation"]["accuracy"]
    assert f"| {accuracy:.1f} |" in student_row and "×" in student_row
    payload = json.loads((tmp_path / "report" / "report.json").read_text())
    assert (
        payload["title"] == "tiny report"
        and payload["models"]["teacher"]["pct_of_reference"]["macro"] == 100.0
    )
    assert payload["examples"] == {"sst2": {"validation": 10}}
    assert (tmp_path / "report" / "score_vs_speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a correlation of constant predictions is NaN: the JSON must stay valid (null), the table shows a dash
    results["models"]["student"]["metrics"]["sst2"]["validation"]["accuracy"] = float("nan")
    markdown = write_report(results, str(tmp_path / "report"), title="tiny report")
    text = (tmp_path / "report" / "report.json").read_text()
    assert (
        "NaN" not in text
        and json.loads(text)["models"]["student"]["metrics"]["sst2"]["validation"]["accuracy"] is None
    )
    assert "| student | " in markdown and "| – |" in markdown


def test_label_order_is_honoured(sst2_dir, checkpoints, tmp_path):
    """A student with the classes in the other order (and its head rows swapped) predicts the same classes."""
    data_dir, *_ = sst2_dir
    teacher = BertForSequenceClassification.from_pretrained(checkpoints["teacher"])
    swapped = classifier(0, names={0: "positive", 1: "negative"})
    swapped.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        swapped.classifier.weight.copy_(teacher.classifier.weight.flip(0))
        swapped.classifier.bias.copy_(teacher.classifier.bias.flip(0))
    unlabelled = classifier(0)  # same swapped head, but still named negative/positive: a control
    unlabelled.load_state_dict(swapped.state_dict())
    runs = {
        "teacher": checkpoints["teacher"],
        "swapped": save(swapped, tmp_path / "s"),
        "unlabelled": save(unlabelled, tmp_path / "u"),
    }
    models = evaluate_checkpoints(runs, "sst2", data_dir=str(data_dir), speed_repeats=0)["models"]
    assert models["swapped"]["label_mapping"] == {"sst2": {"0": 1, "1": 0}}
    assert models["swapped"]["agreement"] == {"sst2": 1.0}
    assert models["swapped"]["metrics"] == models["teacher"]["metrics"]
    assert models["unlabelled"]["agreement"] == {
        "sst2": 0.0
    }  # every binary prediction flips without the remap


def test_other_label_names_are_an_error(sst2_dir, checkpoints, tmp_path):
    data_dir, *_ = sst2_dir
    nli = save(classifier(0, names={0: "entailment", 1: "not_entailment"}), tmp_path / "nli")
    with pytest.raises(ValueError, match="label mismatch.*entailment.*negative"):
        evaluate_checkpoints(
            {"teacher": checkpoints["teacher"], "nli": nli}, "sst2", data_dir=str(data_dir), **FAST
        )
    with pytest.raises(ValueError, match="reference 'teacher' is not one of the checkpoints"):
        evaluate_checkpoints({"nli": nli}, "sst2", data_dir=str(data_dir), **FAST)
    # the speed inputs must fit the model; found from configs, before any evaluation
    with pytest.raises(ValueError, match="takes at most 64 positions but speed_seq_len=128"):
        evaluate_checkpoints(checkpoints, "sst2", data_dir=str(data_dir), speed_seq_len=128)


def test_mnli_two_splits_and_stsb_from_in_memory_models():
    tok = make_tokenizer("bert")

    def pairs(n, seed, label):
        texts = sentences(2 * n, seed)
        return Dataset.from_dict(
            {"premise": texts[:n], "hypothesis": texts[n:], "label": [label(i) for i in range(n)]}
        )

    mnli = DatasetDict(
        validation_matched=pairs(6, 0, lambda i: ["entailment", "neutral", "contradiction"][i % 3]),
        validation_mismatched=pairs(4, 1, lambda i: i % 3),
    )
    names = {0: "entailment", 1: "neutral", 2: "contradiction"}
    runs = {"teacher": classifier(0, names), "student": classifier(1, names, small=True)}
    results = evaluate_checkpoints(runs, "mnli", mnli, tok, **FAST)
    teacher = results["models"]["teacher"]
    assert set(teacher["metrics"]["mnli"]) == {"validation_matched", "validation_mismatched"}
    split_scores = [m["accuracy"] for m in teacher["metrics"]["mnli"].values()]
    assert teacher["task_scores"]["mnli"] == pytest.approx(np.mean(split_scores))
    assert teacher["agreement"] == {"mnli": 1.0}
    assert "| mnli-m (acc) | mnli-mm (acc) |" in markdown_table(results, "t")

    stsb = DatasetDict(
        validation=pairs(6, 2, lambda i: i / 2).rename_columns(
            {"premise": "sentence1", "hypothesis": "sentence2"}
        )
    )
    regressor = classifier(0, {0: "LABEL_0"})
    models = evaluate_checkpoints({"teacher": regressor}, "stsb", {"stsb": stsb}, tok, speed_repeats=0)[
        "models"
    ]
    assert set(models["teacher"]["metrics"]["stsb"]["validation"]) == {"pearson", "spearmanr"}
    assert models["teacher"]["agreement"] == {} and models["teacher"]["mean_agreement"] is None


def test_in_memory_model_needs_a_tokenizer():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        data = DatasetDict(validation=Dataset.from_dict({"sentence": ["w1"], "label": [0]}))
        evaluate_checkpoints({"teacher": classifier(0)}, "sst2", data)


def test_measure_speed_returns_positive_numbers():
    out = measure_speed(classifier(1, small=True), batch_size=3, seq_len=8, repeats=2, warmup=1)
    assert out["latency_ms"] > 0 and out["throughput"] > 0 and out["batch_size"] == 3
    assert out["throughput"] == pytest.approx(3 * 1000.0 / out["latency_ms"])
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        measure_speed(classifier(1, small=True), repeats=0)


def test_command_line_and_script(sst2_dir, checkpoints, tmp_path, capsys, monkeypatch):
    data_dir, *_ = sst2_dir
    args = ["--task", "sst2", "--checkpoints", *(f"{k}={v}" for k, v in checkpoints.items())]
    args += [
        "--data_dir",
        str(data_dir),
        "--max_eval_samples",
        "8",
        "--speed_repeats",
        "1",
        "--speed_seq_len",
        "8",
    ]
    assert main([*args, "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert "| teacher |" in printed and "| student |" in printed
    assert (tmp_path / "cli" / "report.md").read_text().strip() == printed.strip()
    with pytest.raises(ValueError, match="NAME=DIR"):
        main(["--checkpoints", "teacher"])
    monkeypatch.setattr(sys, "argv", ["eval/glue.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(ROOT, "eval", "glue.py"), run_name="__main__")
    assert exit_info.value.code == 0 and "| student |" in capsys.readouterr().out
