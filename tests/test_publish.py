"""A publishable output folder: the model card (checked against numbers measured independently here), no pickle
anywhere (found by content), safetensors optimizer states that resume exactly, and `push_to_hub` against a local
folder standing in for the Hub."""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    BertForSequenceClassification,
    bert_config,
    classification_dataset,
    lm_dataset,
    make_tokenizer,
    seeded,
    sentences,
    training_settings,
)
from huggingface_hub import HfApi, ModelCard, RepoUrl
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from llmkd import DistillationConfig, DistillationTrainer
from llmkd.cli import main
from llmkd.content import checkpoint_key
from llmkd.evaluation.metrics import accuracy
from llmkd.export.validate import recorded_data
from llmkd.publish.card import is_llmkd_card, write_model_card
from llmkd.publish.checkpoints import MARKER, is_pickle, pickles_under
from llmkd.publish.measure import compare_on_eval
from llmkd.publish.state import load_state, save_state
from llmkd.publish.trainer import FinetuneTrainer

SECRET = "hf_secret_never_in_the_card"


def _data(tmp_path) -> dict:
    files = {}
    for split, n in (("train", 24), ("validation", 12)):
        rows = [{"sentence": s, "label": i % 2} for i, s in enumerate(sentences(n, seed=len(split)))]
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("\n".join(json.dumps(r) for r in rows))
    return files


def _model_folder(path, layers=4):
    seeded(BertForSequenceClassification, bert_config(layers=layers), 0).save_pretrained(path)
    make_tokenizer("bert").save_pretrained(path)
    return path


def _common(tmp_path, out: str) -> dict:
    files = _data(tmp_path)
    return {
        "train_file": str(files["train"]),
        "validation_file": str(files["validation"]),
        "text_columns": ["sentence"],
        "max_length": 32,
        "output_dir": str(tmp_path / out),
        "max_steps": 4,
        "save_steps": 2,
        "learning_rate": 1e-3,
        "per_device_train_batch_size": 4,
        "report_to": "none",
        "use_cpu": True,
        "hub_token": SECRET,
    }


@pytest.fixture
def distill_recipe(tmp_path):
    recipe = _common(tmp_path, "student") | {
        "teacher": str(_model_folder(tmp_path / "teacher")),
        "student_layers": [0, 2],
        "temperature": 2.0,
        "terms": [{"knowledge": "logits", "loss": "forward_kl"}, {"knowledge": "hidden", "loss": "cosine"}],
    }
    (tmp_path / "distil.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "distil.yaml", recipe


@torch.inference_mode()
def _predictions(folder, texts) -> np.ndarray:
    """Argmax of a saved classifier, one sentence at a time (no batching, no padding: independent of llmkd)."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return np.array([int(model(**tokenizer(t, return_tensors="pt")).logits.argmax(-1)) for t in texts])


def _recipe_block(text: str) -> dict:
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))


def test_distilled_folder_has_a_card_with_independently_checked_numbers_and_no_pickle(
    distill_recipe, tmp_path
):
    path, recipe = distill_recipe
    assert main(["distill", str(path), "--seed", "7"]) == 0
    out = tmp_path / "student"
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "local" and card.data.pipeline_tag == "text-classification"
    tags = set(card.data.tags)
    assert {
        "llmkd",
        "distillation",
        "knowledge:logits",
        "knowledge:hidden",
        "loss:cosine",
        "trainer:distill",
    } <= tags
    text = (out / "README.md").read_text()
    assert "`teacher`" in text and f"content hash `{checkpoint_key(tmp_path / 'teacher')}`" in text
    assert re.search(r"llmkd \S+, transformers 5\.\S+, torch \S+", text)
    # The recipe block is the YAML file with the flag merged in, and the token is gone (negative control).
    assert _recipe_block(text) == {k: v for k, v in recipe.items() if k != "hub_token"} | {"seed": 7}
    assert "hub_token" not in text
    assert not [p.name for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    # Teacher and student accuracy and agreement, measured here one sentence at a time from the saved folders.
    rows = [json.loads(line) for line in (tmp_path / "validation.jsonl").read_text().splitlines()]
    texts, gold = [r["sentence"] for r in rows], np.array([r["label"] for r in rows])
    teacher, student = _predictions(tmp_path / "teacher", texts), _predictions(out, texts)
    report = json.loads((out / "llmkd_report.json").read_text())
    measured = report["card"]["comparison"]["eval"]
    assert measured["teacher"]["accuracy"] == pytest.approx((teacher == gold).mean())
    assert measured["student"]["accuracy"] == pytest.approx((student == gold).mean())
    assert measured["student"]["accuracy"] == pytest.approx(report["eval"]["eval_accuracy"])
    assert measured["agreement"] == pytest.approx((teacher == student).mean())
    assert report["eval"]["eval_agreement"] == pytest.approx(measured["agreement"])
    assert (
        f"| accuracy | {100 * (teacher == gold).mean():.2f} % | {100 * (student == gold).mean():.2f} % |"
        in text
    )
    latency = report["card"]["latency"]
    assert latency["teacher"] > 0 and latency["student"] > 0 and "CPU latency, batch 1" in text
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["accuracy"] == pytest.approx((student == gold).mean())
    # Nothing pickled, in the folder nor its checkpoints; checkpoints hold safetensors optimizer states.
    assert pickles_under(out) == []
    assert {"optimizer.safetensors", "scheduler.json", "rng_state.safetensors"} <= set(
        os.listdir(out / "checkpoint-4")
    )
    assert (out / "training_args.json").is_file() and not (out / "training_args.bin").exists()
    # `llmkd export` finds the run's validation file in its report (and checks the ONNX model on it).
    assert recorded_data(str(out))["validation_file"] == str((tmp_path / "validation.jsonl").resolve())


def test_finetuned_folder_names_its_base_model_and_metric(tmp_path):
    recipe = _common(tmp_path, "tuned") | {
        "model": str(_model_folder(tmp_path / "base", 2)),
        "class_names": ["a", "b"],
    }
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["finetune", str(tmp_path / "teacher.yaml")]) == 0
    out = tmp_path / "tuned"
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "local" and "distillation" not in card.data.tags
    assert {"llmkd", "fine-tuning"} <= set(card.data.tags)
    text = (out / "README.md").read_text()
    report = json.loads((out / "llmkd_report.json").read_text())
    assert f"| accuracy | {100 * report['eval']['eval_accuracy']:.2f} % |" in text
    assert f"Base model: local folder `base`, content hash `{checkpoint_key(tmp_path / 'base')}`" in text
    assert pickles_under(out) == [] and (out / "checkpoint-4" / "optimizer.safetensors").is_file()


def test_finetune_resumes_exactly_from_safetensors_optimizer_states(tmp_path):
    """4 steps in one go == 2 steps, then 2 more resumed from checkpoint-2 (AdamW moments, schedule, RNG)."""
    data = classification_dataset(32)

    def run(folder, resume=None):
        torch.manual_seed(0)
        model = BertForSequenceClassification(bert_config(layers=2))
        settings = training_settings(tmp_path / folder, max_steps=4, save_strategy="steps", save_steps=2)
        args = TrainingArguments(**settings | {"learning_rate": 1e-3})
        trainer = FinetuneTrainer(
            model=model, args=args, train_dataset=data, processing_class=make_tokenizer()
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer.model.state_dict()

    full = run("full")
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    assert pickles_under(checkpoint) == [] and (checkpoint / "optimizer.safetensors").is_file()
    resumed = run("resumed", str(checkpoint))
    assert all(torch.equal(resumed[k], v) for k, v in full.items())
    # The marker lists the files: a checkpoint missing one is refused (not half-read).
    os.remove(checkpoint / "optimizer.json")
    with pytest.raises(ValueError, match="checkpoint-2 is incomplete: optimizer.json is missing"):
        run("refused", str(checkpoint))
    # Negative control: resumed without the optimizer's state (and no marker), it trains to other weights.
    for name in ("optimizer.safetensors", MARKER):
        os.remove(checkpoint / name)
    stripped = run("stripped", str(checkpoint))
    assert not all(torch.equal(stripped[k], v) for k, v in full.items())


def _kd_trainer(teacher, student, data, tmp_path, tokenizer, compute_metrics=None):
    args = DistillationConfig(
        **training_settings(tmp_path, max_steps=1), terms=[{"knowledge": "logits", "loss": "forward_kl"}]
    )
    return DistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )


def test_classifier_numbers_measured_without_the_trainers_metrics_equal_evaluate(bert_pair, tmp_path):
    teacher, student = bert_pair
    trainer = _kd_trainer(teacher, student, classification_dataset(20), tmp_path, make_tokenizer(), accuracy)
    evaluated = trainer.evaluate()
    measured = compare_on_eval(trainer, teacher, student)[
        "eval"
    ]  # no `evaluated`: the student is run here too
    assert measured["student"]["accuracy"] == pytest.approx(evaluated["eval_accuracy"])
    assert measured["agreement"] == pytest.approx(evaluated["eval_agreement"])


@torch.inference_mode()
def _lm_reference(model, data) -> tuple[float, float, list]:
    """Perplexity and next-token accuracy from transformers' own loss, one unpadded example at a time."""
    nll, correct, count, tops = 0.0, 0.0, 0, []
    for ids in data["input_ids"]:
        ids = torch.tensor([ids])
        out = model(input_ids=ids, labels=ids)
        n = ids.shape[1] - 1
        nll, count = nll + float(out.loss) * n, count + n
        top = out.logits[0, :-1].argmax(-1)
        correct, tops = correct + float((top == ids[0, 1:]).sum()), tops + [top]
    return math.exp(nll / count), correct / count, tops


def test_causal_lm_card_from_python_with_perplexity_checked_against_transformers_loss(llama_pair, tmp_path):
    teacher, student = llama_pair
    data = lm_dataset(10)
    trainer = _kd_trainer(teacher, student, data, tmp_path, make_tokenizer("llama"))
    measured = compare_on_eval(trainer, teacher, student)["eval"]
    (t_ppl, t_acc, t_top), (s_ppl, s_acc, s_top) = _lm_reference(teacher, data), _lm_reference(student, data)
    assert measured["teacher"]["perplexity"] == pytest.approx(t_ppl, rel=1e-5)
    assert measured["student"]["perplexity"] == pytest.approx(s_ppl, rel=1e-5)
    assert measured["teacher"]["next-token accuracy"] == pytest.approx(t_acc)
    assert measured["student"]["next-token accuracy"] == pytest.approx(s_acc)
    agree = sum(float((a == b).sum()) for a, b in zip(t_top, s_top)) / sum(len(a) for a in t_top)
    assert measured["agreement"] == pytest.approx(agree) and measured["agreement_unit"] == "tokens"
    card = ModelCard.load(write_model_card(trainer))  # from Python: no recipe, names from the models
    assert card.data.pipeline_tag == "text-generation" and card.data.base_model is None
    assert (
        "perplexity" in card.text
        and "an in-memory LlamaForCausalLM" in card.text
        and "## Recipe" not in card.text
    )


def test_state_codec_round_trips_and_pickles_are_found_by_content(tmp_path):
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3, dtype=torch.bfloat16)}},
        "param_groups": [{"betas": (0.9, 0.999), "params": [0], "lr": float("inf"), "name": None}],
        "numpy": ("MT19937", np.arange(5, dtype=np.uint32), 2, 0, 0.0),
        "__tensor__": "a key that looks like a marker",
    }
    save_state(state, str(tmp_path), "opt")
    back = load_state(str(tmp_path), "opt")
    assert back["state"][0]["step"] == 3.0 and torch.equal(
        back["state"][0]["exp_avg"], state["state"][0]["exp_avg"]
    )
    assert back["param_groups"] == state["param_groups"] and back["__tensor__"] == state["__tensor__"]
    assert (
        back["numpy"][0] == "MT19937"
        and back["numpy"][1].dtype == np.uint32
        and isinstance(back["numpy"], tuple)
    )
    with pytest.raises(TypeError, match=r"state\.fn: a function"):
        save_state({"fn": lambda: 0}, str(tmp_path), "bad")
    # Pickles by content, whatever their name; safetensors and JSON are not.
    torch.save({"a": torch.zeros(1)}, tmp_path / "weights.safetensors")
    (tmp_path / "notes.json").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    save_file({"a": torch.zeros(1)}, tmp_path / "real.bin")
    assert is_pickle(tmp_path / "weights.safetensors") and is_pickle(tmp_path / "notes.json")
    assert not is_pickle(tmp_path / "real.bin") and not is_pickle(tmp_path / "opt.json")
    assert pickles_under(tmp_path) == ["notes.json", "weights.safetensors"]


# ---- push_to_hub, against a local folder ------------------------------------------------------------
@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """HfApi.create_repo / upload_folder replaced by copies into tmp_path/hub/<repo id>; returns the calls."""
    hub, calls = tmp_path / "hub", []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create", repo_id))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, ignore_patterns=None, **kwargs):
        calls.append(("upload", kwargs.get("commit_message"), bool(kwargs.get("run_as_future"))))
        root = os.fspath(folder_path)
        files = [os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names]
        for rel in filter_repo_objects(files, ignore_patterns=ignore_patterns):
            target = hub / repo_id / (path_in_repo or "") / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(os.path.join(root, rel), target)
        if kwargs.get("run_as_future"):
            done = concurrent.futures.Future()
            done.set_result(None)
            return done
        return f"https://huggingface.co/{repo_id}/commit/local"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return hub, calls


def test_push_to_hub_uploads_the_card_and_weights_without_pickles(distill_recipe, tmp_path, local_hub):
    hub, calls = local_hub
    path, _ = distill_recipe
    assert main(["distill", str(path), "--push_to_hub", "true", "--hub_model_id", "me/tiny-student"]) == 0
    repo, out = hub / "me" / "tiny-student", tmp_path / "student"
    assert calls[0] == ("create", "me/tiny-student")
    assert [c for c in calls if c[0] == "upload" and c[2]]  # pushes at the checkpoints, as transformers does
    assert calls[-1] == ("upload", "End of training", False)
    assert is_llmkd_card(repo / "README.md") and ModelCard.load(repo / "README.md").data.base_model == "local"
    assert (repo / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert (repo / "llmkd_report.json").is_file() and (repo / "training_args.json").is_file()
    assert pickles_under(repo) == [] and not list(repo.glob("checkpoint-*"))


def test_the_local_hub_sees_transformers_pickle(tmp_path, local_hub):
    """Negative control for the test above: plain transformers pushes training_args.bin, and the fake catches it."""
    hub, _ = local_hub
    args = TrainingArguments(
        str(tmp_path / "plain"), push_to_hub=True, hub_model_id="me/plain", report_to="none"
    )
    trainer = Trainer(model=BertForSequenceClassification(bert_config(layers=1)), args=args)
    trainer.push_to_hub()
    assert pickles_under(hub / "me" / "plain") == ["training_args.bin"]
    assert not is_llmkd_card(hub / "me" / "plain" / "README.md")
