"""`llmkd export --onnx`: ONNX Runtime reproduces PyTorch's logits, int8 mostly agrees, the folder and manifest
are complete, bad input fails before anything is written, and `llmkd eval` scores and times the exports."""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import bert_config, llama_config, make_tokenizer, sentences
from datasets import Dataset, DatasetDict
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from llmkd.cli.export import main as export_main
from llmkd.content import checkpoint_key, file_sha256
from llmkd.evaluation.checkpoints import evaluate_checkpoints
from llmkd.evaluation.onnx_runtime import OrtClassifier
from llmkd.export.onnx import export_onnx
from llmkd.export.validate import ExportMismatch

LABELS = {"id2label": {0: "negative", 1: "positive"}, "label2id": {"negative": 0, "positive": 1}}


def save_classifier(folder, model, tokenizer, max_length=32):
    tokenizer.model_max_length = max_length  # as llmkd saves it: the trained length
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def bert_classifier(seed=0):
    """Weights drawn wide (std 0.5), so that predictions differ between sentences, and every bias and LayerNorm
    moved off its 0/1 initial value, as in a trained model (the exporter stores equal tensors once)."""
    torch.manual_seed(seed)
    model = BertForSequenceClassification(bert_config(layers=2, hidden=32, initializer_range=0.5, **LABELS))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def write_validation(path, n=48):
    texts = sentences(n, seed=5)
    with open(path, "w") as handle:
        for text in texts:  # label names, as a user's file may hold them
            handle.write(
                json.dumps({"sentence": text, "label": ["negative", "positive"][len(text) % 2]}) + "\n"
            )
    return str(path), texts


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(student dir, validation file, manifest) of one BERT export with int8, through the CLI."""
    root = tmp_path_factory.mktemp("export")
    student = save_classifier(root / "student", bert_classifier(), make_tokenizer("bert"))
    validation, _ = write_validation(root / "validation.jsonl")
    argv = [
        student,
        "--onnx",
        "--quantize",
        "int8",
        "--validation_file",
        validation,
        "--text_columns",
        "sentence",
    ]
    assert export_main(argv) == 0
    with open(os.path.join(student, "onnx", "llmkd_export.json")) as handle:
        return student, validation, json.load(handle)


def pytorch_and_ort(folder, onnx_path, encoded):
    """Logits of the saved PyTorch model and of a plain ONNX Runtime session (not llmkd's wrapper) on `encoded`."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    feed = {i.name: encoded[i.name].numpy() for i in session.get_inputs()}
    with torch.no_grad():
        reference = model(**encoded).logits.numpy()
    return reference, session.run(["logits"], feed)[0], [i.name for i in session.get_inputs()]


def test_ort_equals_pytorch_on_padded_pairs(exported):
    """Sentence pairs (token_type_ids with 1s), right-padded to mixed lengths, batch size unlike the trace's."""
    student, _, _ = exported
    tokenizer = AutoTokenizer.from_pretrained(student)
    encoded = tokenizer(sentences(5, seed=9), sentences(5, seed=10), padding=True, return_tensors="pt")
    assert encoded["token_type_ids"].max() == 1 and encoded["attention_mask"].min() == 0
    reference, logits, names = pytorch_and_ort(student, os.path.join(student, "onnx", "model.onnx"), encoded)
    assert names == ["input_ids", "attention_mask", "token_type_ids"]
    assert np.abs(logits - reference).max() < 1e-4
    # Negative control: the same comparison sees a changed weight.
    model = BertForSequenceClassification.from_pretrained(student).eval()
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight.mul_(1.05)
        assert np.abs(model(**encoded).logits.numpy() - logits).max() > 1e-3


def test_manifest_and_self_contained_folder(exported):
    student, validation, manifest = exported
    out = os.path.join(student, "onnx")
    assert manifest["opset"] == 17 and manifest["format"] == "onnx"
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest["outputs"][0]["shape"] == ["batch", 2] and manifest["labels"] == ["negative", "positive"]
    assert manifest["source"]["content"] == checkpoint_key(student)  # the onnx/ subfolder changes no key
    assert manifest["source"]["architecture"] == "BertForSequenceClassification"
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == file_sha256(os.path.join(out, name))
    check = manifest["check"]
    assert check["data_sha256"] == file_sha256(validation) and check["max_length"] == 32
    assert check["fp32"]["examples"] == 48 and check["fp32"]["agreement"] == 1.0
    assert check["fp32"]["max_abs_logit_diff"] < 1e-4 and check["fp32"]["accuracy_drop"] == 0.0
    assert manifest["quantization"]["weight_type"] == "QInt8"
    int8 = check["int8"]
    assert int8["agreement"] >= 0.8 and int8["max_abs_logit_diff"] > 1e-3  # int8 runs, and is not float32
    assert AutoTokenizer.from_pretrained(out).model_max_length == 32
    assert AutoConfig.from_pretrained(out).id2label == {0: "negative", 1: "positive"}
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no staging leftovers


def test_without_token_type_ids_and_stale_int8_removed(tmp_path):
    tokenizer = make_tokenizer("bert")
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    student = save_classifier(tmp_path / "s", bert_classifier(1), tokenizer)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_int8.onnx").write_bytes(b"stale")
    manifest = export_onnx(student, out)
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask"]
    assert manifest["check"]["data"] == "built-in sentences" and "int8" not in manifest["check"]
    assert not (out / "model_int8.onnx").exists() and list(manifest["files"]) == ["model.onnx"]
    encoded = make_tokenizer("bert")(sentences(4, seed=3), padding=True, return_tensors="pt")
    encoded.pop("token_type_ids")
    reference, logits, _ = pytorch_and_ort(student, str(out / "model.onnx"), encoded)
    assert np.abs(logits - reference).max() < 1e-4
    (out / "llmkd_export.json").unlink()  # without the manifest, the weights are counted in the graph
    parameters = sum(p.numel() for p in BertForSequenceClassification.from_pretrained(student).parameters())
    assert OrtClassifier(out).num_parameters() == parameters == manifest["source"]["parameters"]


def test_llama_classifier_exports(tmp_path):
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(llama_config(layers=2, initializer_range=0.5, **LABELS)).eval()
    student = save_classifier(tmp_path / "llama", model, make_tokenizer("llama"))
    manifest = export_onnx(student)
    assert manifest["check"]["fp32"]["max_abs_logit_diff"] < 1e-4
    encoded = make_tokenizer("llama")(sentences(4, seed=4), padding=True, return_tensors="pt")
    reference, logits, names = pytorch_and_ort(student, os.path.join(student, "onnx", "model.onnx"), encoded)
    assert names == ["input_ids", "attention_mask"] and np.abs(logits - reference).max() < 1e-4


def test_recorded_validation_file_is_used(tmp_path):
    student = save_classifier(tmp_path / "s", bert_classifier(2), make_tokenizer("bert"))
    validation, _ = write_validation(tmp_path / "v.jsonl", n=12)
    recipe = {"validation_file": validation, "text_columns": ["sentence"], "label_column": "label"}
    (tmp_path / "s" / "llmkd_report.json").write_text(json.dumps({"recipe": recipe}))
    manifest = export_onnx(student, tmp_path / "o", max_samples=10)
    assert (
        manifest["check"]["data"] == os.path.abspath(validation)
        and manifest["check"]["fp32"]["examples"] == 10
    )
    assert "accuracy" in manifest["check"]["fp32"]


def test_mismatch_fails_and_writes_nothing(tmp_path, monkeypatch):
    """Negative control of the check: a graph traced from changed weights is refused, and no file lands."""
    import llmkd.export.onnx as onnx_export

    student = save_classifier(tmp_path / "s", bert_classifier(3), make_tokenizer("bert"))
    real_trace = onnx_export.trace

    def perturbed(model, *args, **kwargs):
        changed = BertForSequenceClassification(model.config).eval()
        changed.load_state_dict(model.state_dict())
        with torch.no_grad():
            changed.classifier.bias.add_(0.5)
        return real_trace(changed, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "trace", perturbed)
    with pytest.raises(ExportMismatch, match="disagrees with PyTorch"):
        export_onnx(student, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("causal_lm", ValueError, "not a sequence classifier"),
        ("no_config", FileNotFoundError, "no config.json"),
        ("no_tokenizer", FileNotFoundError, "no tokenizer files"),
        ("quantize", ValueError, "--quantize 'int4' is not supported"),
        ("no_format", ValueError, "choose an export format"),
        ("out_is_source", ValueError, "is the checkpoint itself"),
        ("bad_column", ValueError, r"text columns \['review'\] are not in the file"),
        ("missing_file", FileNotFoundError, "does not exist"),
        ("bad_label", ValueError, "label 'neutral' is not one of"),
    ],
)
def test_bad_input(tmp_path, case, error, match):
    folder = tmp_path / "m"
    if case == "causal_lm":
        save_classifier(folder, LlamaForCausalLM(llama_config(layers=1)), make_tokenizer("llama"))
    elif case == "no_config":
        folder.mkdir()
    else:
        save_classifier(folder, bert_classifier(), make_tokenizer("bert"))
    if case == "no_tokenizer":
        for name in os.listdir(folder):
            if name.startswith("tokenizer"):
                os.unlink(folder / name)
    validation = tmp_path / "v.jsonl"
    validation.write_text(json.dumps({"sentence": "w1 w2", "label": "neutral"}) + "\n")
    argv = {
        "quantize": ["--onnx", "--quantize", "int4"],
        "no_format": [],
        "out_is_source": ["--onnx", "--out", str(folder)],
        "bad_column": ["--onnx", "--validation_file", str(validation), "--text_columns", "review"],
        "missing_file": ["--onnx", "--validation_file", str(tmp_path / "nope.jsonl")],
        "bad_label": ["--onnx", "--validation_file", str(validation)],
    }.get(case, ["--onnx"])
    before = sorted(os.listdir(folder))
    with pytest.raises(error, match=match):
        export_main([str(folder), *argv])
    assert sorted(os.listdir(folder)) == before  # nothing written, not even an empty onnx/ folder


def test_eval_scores_and_times_onnx_rows(exported):
    student, _, _ = exported
    texts = sentences(24, seed=7)
    data = DatasetDict(
        {"validation": Dataset.from_dict({"sentence": texts, "label": [len(t) % 2 for t in texts]})}
    )
    checkpoints = {
        "student": student,
        "student, ONNX Runtime": os.path.join(student, "onnx"),
        "student, ONNX Runtime int8": os.path.join(student, "onnx", "model_int8.onnx"),
    }
    kw = dict(speed_repeats=1, speed_warmup=0, speed_seq_len=16, speed_batch_size=4)
    results = evaluate_checkpoints(checkpoints, "sst2", data, reference="student", **kw)
    models = results["models"]
    onnx, int8 = models["student, ONNX Runtime"], models["student, ONNX Runtime int8"]
    assert onnx["score"] == models["student"]["score"] and onnx["mean_agreement"] == 1.0
    assert onnx["params"] == models["student"]["params"] == int8["params"]
    assert int8["mean_agreement"] >= 0.75 and int8["source"].endswith("model_int8.onnx")
    for entry in (onnx, int8):
        assert entry["latency_ms"] > 0 and entry["throughput"] > 0 and entry["speedup"] > 0
    assert isinstance(OrtClassifier(os.path.join(student, "onnx")).config.num_labels, int)
