"""Deep → shallow self-distillation to early exits (FastBERT, Be Your Own Teacher): loss, rule, files, properties."""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    BertForSequenceClassification,
    bert_config,
    classification_dataset,
    make_tokenizer,
    run_launcher,
    seeded,
    sentences,
    training_settings,
)
from early_exit_worker import FAMILIES, classifier, make_trainer, train_and_dump
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from llmkd.cli.pipeline import distill
from llmkd.schemes import DistillationConfig, EarlyExitConfig, EarlyExitTrainer
from llmkd.schemes.tally import per_example_sums
from llmkd.students.exits import EarlyExitClassifier, make_exit_heads

ROOT = Path(__file__).resolve().parent.parent


def batch_of(trainer, n=4, unlabelled=(1,)):
    rows = [dict(classification_dataset(n, seed=7)[i]) for i in range(n)]
    for i in unlabelled:
        rows[i]["label"] = -1  # no gold label: no item of the exits' cross-entropy
    return trainer._prepare_inputs(trainer.data_collator(rows))


# ---- the loss, against float64 loops written from the papers ---------------------------------------------------


def softmax(z, t=1.0):
    e = [math.exp((v - max(z)) / t) for v in z]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))


def head64(head, x):
    w = {k: v.double() for k, v in head.state_dict().items()}
    feature = w["bottleneck.weight"] @ x + w["bottleneck.bias"]
    inner = torch.tanh(w["dense.weight"] @ feature + w["dense.bias"])
    return w["classifier.weight"] @ inner + w["classifier.bias"], feature


def reference(model, heads, batch, layers, t, weights, reverse=False, mean_over_exits=False):
    """Σ_exits T²·KL(p_final ‖ p_exit) per example / B, hint Σ mean_H (f − h_L)² / B, CE Σ / labelled."""
    with torch.no_grad():
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
    kd = hint = ce = 0.0
    labels = batch["labels"].tolist()
    for b in range(len(labels)):
        p_final = softmax(out.logits[b].double().tolist(), t)
        for layer in layers:
            z, feature = head64(heads[str(layer)], out.hidden_states[layer][b, 0].double())
            p_exit = softmax(z.tolist(), t)
            divergence = kl(p_exit, p_final) if reverse else kl(p_final, p_exit)
            kd += t * t * divergence / (len(layers) if mean_over_exits else 1)
            hint += ((feature - out.hidden_states[-1][b, 0].double()) ** 2).mean().item()
            ce += -math.log(softmax(z.tolist())[labels[b]]) if labels[b] >= 0 else 0.0
    labelled = sum(y >= 0 for y in labels)
    return weights[0] * kd / len(labels) + weights[1] * hint / len(labels) + weights[2] * ce / labelled


def test_exit_loss_matches_a_float64_reference(tmp_path):
    weights = (0.7, 0.3, 0.5)
    model = classifier(std=0.5)
    trainer = make_trainer(
        model, tmp_path, temperature=2.0, exit_kd_weight=0.7, exit_hint_weight=0.3, exit_label_weight=0.5
    )
    assert [t.name for t in trainer.terms] == [f"distill/exits_{n}" for n in ("forward_kl", "hint", "ce")]
    batch = batch_of(trainer)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch).item()
    ref = functools.partial(reference, model, trainer.auxiliary_modules["0"], batch, [1, 3], 2.0, weights)
    assert loss == pytest.approx(ref(), rel=1e-5)
    # controls: FastBERT's printed direction KL(p_exit ‖ p_final), and a mean over the exits, are other numbers
    assert (
        abs(ref(reverse=True) - ref()) > 1e-3 * ref()
        and abs(ref(mean_over_exits=True) - ref()) > 1e-2 * ref()
    )


def test_the_final_layer_teaches_and_is_never_pulled_towards_its_exits(tmp_path):
    model = classifier(std=0.5)
    trainer = make_trainer(model, tmp_path, freeze_backbone=False)
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch_of(trainer, unlabelled=())).backward()
    final = [
        model.classifier.weight,
        model.bert.pooler.dense.weight,
        *model.bert.encoder.layer[3].parameters(),
    ]
    assert all(p.grad is None or not p.grad.any() for p in final)  # detached soft targets
    assert model.bert.encoder.layer[0].output.dense.weight.grad.abs().sum() > 0  # control: exits pull layer 0


# ---- inference: the exit rule ------------------------------------------------------------------------------------


def exit_model(family, labels=3, layers=(1, 2), std=1.0):
    model = classifier(family, labels, std=0.5)
    torch.manual_seed(1)
    heads = make_exit_heads(32, labels, layers, init_std=std)
    return EarlyExitClassifier(model, heads, "first" if family == "bert" else "last")


@pytest.mark.parametrize("family", FAMILIES)
def test_threshold_0_is_the_full_model_and_threshold_1_the_first_exit(family):
    clf, tok = exit_model(family), make_tokenizer(family)
    batch = tok(sentences(3, seed=2), padding=True, return_tensors="pt")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        full = clf.model(**inputs, output_hidden_states=True)
    clf.threshold = 0.0
    out = clf(**inputs)
    assert torch.equal(out.logits, full.logits) and out.exit_layer.tolist() == [4, 4, 4]
    last = batch["attention_mask"].sum(1) - 1  # right padding: each row's last real token
    pooled = full.hidden_states[1][:, 0] if family == "bert" else full.hidden_states[1][torch.arange(3), last]
    for threshold in (1.0, 7.5):
        clf.threshold = threshold
        out = clf(**inputs)
        assert out.exit_layer.tolist() == [1, 1, 1]
        torch.testing.assert_close(out.logits, clf.heads["1"](pooled)[0], rtol=0, atol=0)


def naive_choice(clf, ids, threshold, normalise=True):
    """One example alone: the first exit with −Σ p log p / log C < threshold (Python loops), else the final layer."""
    with torch.no_grad():
        out = clf.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    for layer in clf.exit_layers:
        z = clf.heads[str(layer)](out.hidden_states[layer][:, 0])[0][0]
        p = softmax(z.double().tolist())
        u = -sum(v * math.log(v) for v in p if v > 0) / (math.log(len(p)) if normalise else 1.0)
        if u < threshold or threshold >= 1:
            return layer, z
    return clf.num_layers, out.logits[0]


def test_the_entropy_rule_per_example_matches_a_naive_loop():
    clf, tok = exit_model("bert", labels=5, layers=(1, 2, 3)), make_tokenizer("bert")
    texts = sentences(8, seed=4)
    batch = tok(texts, padding=True, return_tensors="pt")
    ids = [tok(t)["input_ids"] for t in texts]
    seen, unnormalised_differs = set(), False
    for threshold in (0.3, 0.6, 0.8, 0.9, 0.97):
        clf.threshold = threshold
        out = clf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for i, row in enumerate(ids):
            layer, logits = naive_choice(clf, row, threshold)
            assert out.exit_layer[i].item() == layer, (threshold, i)
            torch.testing.assert_close(out.logits[i], logits, rtol=1e-5, atol=1e-5)
            alone = clf(input_ids=torch.tensor([row]))
            assert alone.exit_layer.item() == layer
            unnormalised_differs |= naive_choice(clf, row, threshold, normalise=False)[0] != layer
        seen |= set(out.exit_layer.tolist())
    assert len(seen) >= 3  # the thresholds really split the examples over the exits
    assert unnormalised_differs  # control: entropy without FastBERT's 1/log C decides otherwise


# ---- training: files, frozen backbone, dropout -------------------------------------------------------------------


def test_the_saved_folder_is_the_plain_model_plus_exit_files(tmp_path):
    model, tok = classifier(), make_tokenizer("bert")
    start = copy.deepcopy(model.state_dict())
    probe = tok(sentences(3, seed=9), padding=True, return_tensors="pt")
    before = model(**probe).logits.detach()
    trainer = make_trainer(model, tmp_path, learning_rate=0.05)
    initial = copy.deepcopy(trainer.auxiliary_modules["0"].state_dict())
    trainer.train()
    out = tmp_path / "out"
    trainer.save_model(str(out))
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items() if k in start)  # frozen
    loaded, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(loaded.eval()(**probe).logits, before)
    assert not [k for k in load_file(out / "model.safetensors") if "llmkd" in k or "bottleneck" in k]
    saved = load_file(out / "llmkd_exits.safetensors")  # present, but not read by transformers
    trained = trainer.auxiliary_modules["0"].state_dict()
    assert all(torch.equal(saved[k], trained[k]) for k in trained)
    assert any(not torch.equal(saved[k], initial[k]) for k in initial)  # control: the exits did train
    meta = json.loads((out / "llmkd_exits.json").read_text())
    assert meta["exit_layers"] == [1, 3] and meta["pooling"] == "first" and meta["num_hidden_layers"] == 4
    clf = EarlyExitClassifier.from_pretrained(out, threshold=1.0)
    with torch.no_grad():
        hidden = loaded(**probe, output_hidden_states=True).hidden_states[1][:, 0]
        torch.testing.assert_close(clf(**probe).logits, trainer.auxiliary_modules["0"]["1"](hidden)[0])
    thawed = classifier()
    make_trainer(thawed, tmp_path / "thawed", freeze_backbone=False, learning_rate=0.05).train()
    assert any(not torch.equal(start[k], v) for k, v in thawed.state_dict().items() if k in start)  # control


def test_a_frozen_backbone_runs_without_dropout(tmp_path):
    config = bert_config(num_labels=3, initializer_range=0.5)
    config.hidden_dropout_prob = 0.3
    losses = {}
    for freeze in (True, False):
        model = seeded(BertForSequenceClassification, config, 0)
        trainer = make_trainer(model, tmp_path / str(freeze), freeze_backbone=freeze)
        batch = batch_of(trainer)
        trainer.model.train()
        losses[freeze] = [trainer.compute_loss(trainer.model, batch).item() for _ in range(2)]
        trainer.model.eval()
        losses[freeze].append(trainer.compute_loss(trainer.model, batch).item())
    assert losses[True][0] == losses[True][1] == pytest.approx(losses[True][2], rel=1e-6)
    assert losses[False][0] != losses[False][1]  # control: a trained backbone keeps its dropout


# ---- properties: accumulation, padding, two processes ----------------------------------------------------------


class PerBatchMeanTrainer(EarlyExitTrainer):
    """The classic bug, as a negative control: each micro-batch averaged on its own."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch=None)


def one_step_update(batch, accumulation, tmp_path, trainer_cls=EarlyExitTrainer):
    data = classification_dataset(8, seed=5).map(
        lambda row, i: {"label": -1 if i in (2, 6) else row["label"]}, with_indices=True
    )
    model = classifier().double()  # float64: some updates (attention key biases) are pure rounding noise
    trainer = make_trainer(
        model, tmp_path, data=data, trainer_cls=trainer_cls, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
        freeze_backbone=False, hard_label_weight=0.5, exit_hint_weight=0.3, exit_label_weight=0.5,
    )  # fmt: skip
    start = copy.deepcopy(model.state_dict())
    trainer.train()
    return {k: v - start[k] for k, v in model.state_dict().items()}


def gap(a, b):
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a if a[k].abs().max() > 1e-10)


def test_accumulation_gives_the_update_of_one_batch(tmp_path):
    full = one_step_update(8, 1, tmp_path / "full")
    assert max(v.abs().max().item() for k, v in full.items() if "llmkd_aux" in k) > 1e-3
    for batch, accumulation in ((3, 3), (1, 8)):  # 3 + 3 + 2 examples; unlabelled rows in some micro-batches
        assert gap(full, one_step_update(batch, accumulation, tmp_path / f"b{batch}")) < 1e-9
    assert gap(full, one_step_update(3, 3, tmp_path / "bad", PerBatchMeanTrainer)) > 1e-2  # control


def per_example(trainer, rows):
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    trainer.model.eval()
    with torch.no_grad():
        student_out, adapted = trainer._student_forward(trainer.model, batch, training=False)
        return {
            t.name: per_example_sums(*(lambda tv: (tv.values, tv.mask))(t.values(student_out, None, batch, None)), len(rows))
            for t in trainer.terms
        }  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batches_give_each_example_its_value_alone(family, side, tmp_path, monkeypatch):
    tok = make_tokenizer(family)
    tok.padding_side = side
    settings = {"exit_hint_weight": 0.3, "exit_label_weight": 0.5}
    trainer = make_trainer(
        classifier(family), tmp_path, family, collator=DataCollatorWithPadding(tok), **settings
    )
    rows = [dict(tok(t)) | {"label": i % 3} for i, t in enumerate(sentences(3, seed=6, min_len=2))]
    together, alone = per_example(trainer, rows), [per_example(trainer, [row]) for row in rows]
    for name, values in together.items():
        for i, one in enumerate(alone):
            torch.testing.assert_close(values[i], one[name][0], rtol=1e-5, atol=1e-6, msg=f"{name}, row {i}")
    if family == "llama":  # control: a decoder pooled at the last position, padding included, breaks it
        monkeypatch.setattr(trainer, "_student_forward", super(EarlyExitTrainer, trainer)._student_forward)
        broken = per_example(trainer, rows)
        assert any(not torch.allclose(broken[n], together[n], rtol=1e-4) for n in together)


@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path):
    for mode in ("frozen", "whole"):
        train_and_dump(str(tmp_path / "single" / mode), per_device_batch=4, accumulation=2, mode=mode)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "tests" / "early_exit_worker.py")
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*run, script, str(tmp_path / "ddp")]
    done = run_launcher(cmd, clean=[tmp_path / "ddp"], env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    start = classifier(std=0.3).state_dict()
    for mode in ("frozen", "whole"):
        assert (tmp_path / "ddp" / mode / "world_size.txt").read_text() == "2"
        model = load_file(tmp_path / "single" / mode / "model.safetensors")
        moved = max((model[k] - start[k]).abs().max().item() for k in start)
        assert (moved == 0) is (mode == "frozen")  # the frozen backbone did not move; the whole one did
        for name in ("model.safetensors", "exits.safetensors"):
            one, two = load_file(tmp_path / "single" / mode / name), load_file(tmp_path / "ddp" / mode / name)
            for key in one:
                torch.testing.assert_close(
                    two[key], one[key], rtol=1e-5, atol=1e-6, msg=f"{mode} {name}:{key}"
                )


# ---- the speed / accuracy curve, the recipe, and refusals --------------------------------------------------------


@pytest.fixture(scope="module")
def exit_folder(tmp_path_factory):
    """A tiny 3-class BERT with trained exits on layers 1 and 3, saved with its tokenizer; and labelled rows."""
    root = tmp_path_factory.mktemp("exits")
    trainer = make_trainer(classifier(std=0.5), root, max_steps=4, learning_rate=0.05)
    trainer.train()
    trainer.save_model(str(root / "model"))
    rows = [{"sentence": t, "label": i % 3} for i, t in enumerate(sentences(12, seed=8))]
    return root / "model", rows


def test_exit_curve_is_full_accuracy_at_0_and_the_first_exit_at_1(exit_folder, tmp_path):
    from llmkd.evaluation.exits import exit_curve

    folder, rows = exit_folder
    result = exit_curve(folder, rows, [0.0, 0.5, 0.9, 1.0], repeats=2, warmup=1, out_dir=tmp_path)
    model, tok = AutoModelForSequenceClassification.from_pretrained(folder).eval(), make_tokenizer("bert")
    with torch.no_grad():
        predicted = [model(**tok(r["sentence"], return_tensors="pt")).logits.argmax().item() for r in rows]
    accuracy = sum(p == r["label"] for p, r in zip(predicted, rows)) / len(rows)
    points = result["points"]
    assert result["full"]["accuracy"] == points[0]["accuracy"] == accuracy  # independent: the plain model
    assert points[0]["average_exit_layer"] == 4 and points[-1]["average_exit_layer"] == 1
    assert points[-1]["exits"] == {"1": len(rows)}
    layers = [p["average_exit_layer"] for p in points]
    assert layers == sorted(layers, reverse=True)  # a higher threshold never leaves later
    assert all(p["latency_ms"] > 0 and math.isfinite(p["speedup"]) for p in points)
    assert json.loads((tmp_path / "exit_curve.json").read_text())["points"] == points
    assert (tmp_path / "exit_curve.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="class ids"):
        exit_curve(folder, [{"sentence": "w1", "label": 3}], [0.0])


def test_recipe_smoke_trains_and_saves_exits(exit_folder, tmp_path):
    folder, rows = exit_folder
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    recipe = str(ROOT / "recipes" / "methods" / "early_exit.yaml")
    flags = ["--smoke", "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--student", str(folder)]
    flags += f"--train_file {tmp_path}/train.jsonl --validation_file {tmp_path}/validation.jsonl".split()
    flags += ["--exit_layers", "[1, 2, 3]"]
    report = distill(recipe, [*flags, "--teacher", str(folder)])
    assert report["trainer"] == "EarlyExitTrainer"
    assert {"eval_exit1_accuracy", "eval_exit3_agreement", "eval_accuracy"} <= set(report["eval"])
    assert json.loads((tmp_path / "out" / "llmkd_exits.json").read_text())["exit_layers"] == [1, 2, 3]
    other = shutil.copytree(folder, tmp_path / "elsewhere")  # a real model folder, but not the student's
    with pytest.raises(ValueError, match="teacher must name the student"):
        distill(recipe, [*flags, "--teacher", str(other), "--output_dir", str(tmp_path / "o2")])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"terms": [{"knowledge": "logits", "loss": "forward_kl"}]}, "builds its terms"),
        ({"hard_label_weight": 0.5}, "freeze_backbone: true keeps fixed"),
        ({"exit_layers": [0, 2]}, "distinct layer numbers >= 1"),
        ({"exit_layers": [1, 1]}, "distinct layer numbers >= 1"),
        ({"exit_loss": "kl_div"}, "exit_loss='kl_div'"),
        ({"exit_kd_weight": 0.0}, "learn nothing"),
        ({"exit_hint_weight": -1.0}, "exit_hint_weight must be"),
        ({"teacher_dtype": "bfloat16"}, "no teacher model"),
    ],
)
def test_bad_settings_are_refused_by_the_config(settings, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        EarlyExitConfig(output_dir=str(tmp_path), **settings)


def test_bad_runs_are_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"layers 1\.\.3"):
        make_trainer(classifier(), tmp_path, exit_layers=[2, 4])
    with pytest.raises(ValueError, match="num_labels >= 2"):
        make_trainer(classifier(labels=1), tmp_path)
    args, data = EarlyExitConfig(**training_settings(tmp_path)), classification_dataset()
    with pytest.raises(ValueError, match="takes no other teacher"):
        EarlyExitTrainer(model=classifier(), teacher=classifier(), args=args, train_dataset=data)
    with pytest.raises(ValueError, match="built by trainer: early_exit"):
        DistillationConfig(output_dir=str(tmp_path), terms=[{"knowledge": "exits", "loss": "forward_kl"}])
