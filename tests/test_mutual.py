"""Deep mutual learning (llmkd.schemes.mutual): the paper's loss per peer, gradients, accumulation, padding, two
processes, resume, saved peers, per-peer metrics and the recipe — each with a reference or a negative control."""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    BertForSequenceClassification,
    LlamaForCausalLM,
    bert_config,
    classification_dataset,
    llama_config,
    lm_dataset,
    make_tokenizer,
    run_launcher,
    seeded,
    sentences,
    training_settings,
)
from mutual_worker import train_and_dump
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorForLanguageModeling

from llmkd.cli.pipeline import distill
from llmkd.evaluation.metrics import accuracy
from llmkd.schemes.mutual import MutualConfig, MutualTrainer, PeerSource
from llmkd.schemes.tally import per_example_sums

ROOT = Path(__file__).resolve().parent.parent
KL = {"knowledge": "logits", "loss": "forward_kl", "weight": 0.6}


def bert_peers(n: int) -> list:  # wide initialisations: the peers disagree enough for the KL to matter
    return [seeded(BertForSequenceClassification, bert_config(2, 16, initializer_range=0.5), s) for s in range(1, n + 1)]  # fmt: skip


def llama_peers(n: int = 2) -> list:
    return [seeded(LlamaForCausalLM, llama_config(2, 16), s) for s in range(1, n + 1)]


def make(peers, tmp_path, kind="bert", trainer_cls=MutualTrainer, collator=None, **settings):
    values = {"terms": [KL], "temperature": 2.0, "hard_label_weight": 0.7, "num_peers": len(peers)} | settings
    args = MutualConfig(**training_settings(tmp_path, **values))
    return trainer_cls(model=peers, args=args, processing_class=make_tokenizer(kind), data_collator=collator,
                       train_dataset=classification_dataset(16) if kind == "bert" else lm_dataset(8, seed=5))  # fmt: skip


def batch_of(trainer, rows):
    return trainer._prepare_inputs(trainer.data_collator(rows))


def peer_outputs(trainer, batch):
    keys = set(trainer.scheme_columns())
    peers = trainer.model(**{k: v for k, v in batch.items() if k in keys}).peers
    trainer.source.observe(batch, peers)
    return peers, trainer.source.outputs(batch, {})


# ---- the loss: the paper's formula, in float64 with loops --------------------------------------------------------


def kl_rows(p, q) -> float:
    """mean over rows of Σ_c p log(p / q)."""
    p, q = p.tolist(), q.tolist()
    return sum(sum(a * math.log(a / b) for a, b in zip(pr, qr)) for pr, qr in zip(p, q)) / len(p)


def dml_reference(logits, labels, T, target):
    """Zhang et al. 2018: peer k's CE(y, p_k) and T² · 1/(K−1) Σ_{l≠k} KL(p_l ‖ p_k) (or KL(mean_l p_l ‖ p_k))."""
    K, B = len(logits), len(labels)
    p = [torch.softmax(z / T, -1) for z in logits]
    out = []
    for k in range(K):
        ce = sum(-torch.log_softmax(logits[k][i], -1)[labels[i]].item() for i in range(B)) / B
        others = [j for j in range(K) if j != k]
        if target == "pairwise":
            kl = sum(kl_rows(p[j], p[k]) for j in others) / (K - 1)
        else:
            kl = kl_rows(sum(p[j] for j in others) / (K - 1), p[k])
        out.append((ce, T**2 * kl))
    return out


@pytest.mark.parametrize(("n", "target"), [(2, "pairwise"), (3, "pairwise"), (3, "mean")])
def test_each_peers_loss_is_the_dml_formula(n, target, tmp_path):
    trainer = make(bert_peers(n), tmp_path, mutual_target=target)
    rows = [classification_dataset(16)[i] for i in range(6)]
    batch = batch_of(trainer, rows)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    logged = trainer.tally.flush("train")
    with torch.no_grad():
        logits = [p.double()(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
                  for p in copy.deepcopy(trainer.peers)]  # fmt: skip
    reference = dml_reference(logits, batch["labels"].tolist(), 2.0, target)
    for k, (ce, kl) in enumerate(reference):
        assert logged[f"peer{k}/loss_ce"] == pytest.approx(ce, rel=2e-5)
        assert logged[f"peer{k}/distill/logits_forward_kl"] == pytest.approx(kl, rel=2e-5)
    assert loss.item() == pytest.approx(sum(0.7 * ce + 0.6 * kl for ce, kl in reference), rel=1e-5)
    if n == 3:  # the control: the two forms differ for 3 peers (Jensen), so each test tells them apart
        other = dml_reference(logits, batch["labels"].tolist(), 2.0, {"mean": "pairwise"}.get(target, "mean"))
        assert abs(other[0][1] - reference[0][1]) > 1e-3 * reference[0][1]


def test_gradients_reach_each_peer_only_through_its_own_prediction(tmp_path, monkeypatch):
    def grads_of_peer0_loss(trainer):
        batch = batch_of(trainer, [classification_dataset(16)[i] for i in range(4)])
        trainer.model.train()
        trainer.model.zero_grad()
        local = trainer.local_counts(batch)
        window = {k: v.sum() for k, v in local.items()}
        peers, others = peer_outputs(trainer, batch)
        trainer.peer_loss(0, peers[0], others, batch, window, local, None).backward()
        return [sum(p.grad.abs().sum().item() for p in peer.parameters() if p.grad is not None) for peer in trainer.peers]  # fmt: skip

    trainer = make(bert_peers(2), tmp_path)
    trainer.model.train()
    trainer.compute_loss(
        trainer.model, batch_of(trainer, [classification_dataset(16)[i] for i in range(4)])
    ).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for peer in trainer.peers for p in peer.classifier.parameters())  # fmt: skip
    own, other = grads_of_peer0_loss(trainer)
    assert own > 0 and other == 0
    monkeypatch.setattr(
        PeerSource, "prediction", staticmethod(lambda out: out.logits)
    )  # control: not detached
    own, other = grads_of_peer0_loss(make(bert_peers(2), tmp_path / "control"))
    assert own > 0 and other > 0


# ---- property tests: accumulation, padding, two processes, resume ---------------------------------------------


class PerBatchMean(MutualTrainer):
    """The classic bug, as a negative control: average each micro-batch, then divide by the accumulation steps."""

    loss_is_scaled_for_ga = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch=None)


def one_step_update(batch, accumulation, tmp_path, trainer_cls=MutualTrainer):
    peers = llama_peers()
    start = [copy.deepcopy(p.state_dict()) for p in peers]
    trainer = make(peers, tmp_path, "llama", trainer_cls, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                   max_steps=1, optim="sgd", learning_rate=0.5, max_grad_norm=0.0, hard_label_weight=0.5)  # fmt: skip
    trainer.train()
    return {f"{k}.{n}": v - start[k][n] for k, p in enumerate(peers) for n, v in p.state_dict().items()}


def gap(a, b) -> float:
    return max(((a[k] - b[k]).norm() / a[k].norm().clamp(min=1e-12)).item() for k in a)


def test_accumulation_matches_one_big_batch(tmp_path):
    full = one_step_update(8, 1, tmp_path / "a")
    assert all(
        max(v.abs().max().item() for n, v in full.items() if n.startswith(f"{k}.")) > 1e-4 for k in (0, 1)
    )
    for batch, accumulation in ((4, 2), (1, 8)):
        assert gap(full, one_step_update(batch, accumulation, tmp_path / f"b{batch}")) < 1e-4
    assert gap(full, one_step_update(2, 4, tmp_path / "c", PerBatchMean)) > 1e-2  # control


ROWS = [[11, 12, 13], [14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [24, 25, 26, 27, 28]]


def per_example(trainer, batch) -> dict:
    """{peer term: (B,) masked sums} of one batch, as the trainer computes them."""
    trainer.model.eval()
    out = {}
    with torch.no_grad():
        peers, others = peer_outputs(trainer, batch)
        for term in trainer.terms:
            tv = term.values(peers[term.peer], others, batch, None)
            out[term.name] = per_example_sums(tv.values, tv.mask, len(batch["input_ids"]))
    return out


@pytest.mark.parametrize(("kind", "side"), [("llama", "right"), ("llama", "left"), ("bert", "right")])
def test_a_padded_batch_gives_each_example_its_value_alone(kind, side, tmp_path):
    tok = make_tokenizer(kind)
    tok.padding_side = side
    lm = kind == "llama"
    collator = DataCollatorForLanguageModeling(tok, mlm=False) if side == "left" else None
    trainer = make(llama_peers() if lm else bert_peers(2), tmp_path, kind, collator=collator)
    first = tok.bos_token_id if lm else tok.cls_token_id
    features = [{"input_ids": [first, *ids, tok.eos_token_id if lm else tok.sep_token_id]} | ({} if lm else {"label": i % 2})
                for i, ids in enumerate(ROWS)]  # fmt: skip
    for row in features:
        row["attention_mask"] = [1] * len(row["input_ids"])
    together = per_example(trainer, batch_of(trainer, features))
    for i, row in enumerate(features):
        alone = per_example(trainer, batch_of(trainer, [row]))
        for name, values in together.items():
            torch.testing.assert_close(
                values[i], alone[name][0], rtol=1e-5, atol=1e-6, msg=f"{name}, row {i}"
            )
    if side == "left":  # control: the left-padded batch as transformers' collator makes it, not right-aligned
        raw = per_example(trainer, trainer._prepare_inputs(trainer.data_collator.collator(features)))
        assert any((raw[n] - together[n]).abs().max() > 1e-3 for n in raw)


@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path):
    single = tmp_path / "single"
    train_and_dump(str(single), per_device_batch=4, accumulation=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "mutual_worker.py"), str(tmp_path / "ddp")]  # fmt: skip
    done = run_launcher(cmd, clean=[tmp_path / "ddp"], env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ddp" / "world_size.txt").read_text() == "2"  # two processes really ran
    one, two = load_file(single / "peers.safetensors"), load_file(tmp_path / "ddp" / "peers.safetensors")
    start = {f"peer{k}.{n}": v for k, p in enumerate(llama_peers()) for n, v in p.state_dict().items()}
    for k in (0, 1):
        assert max((one[n] - start[n]).abs().max().item() for n in one if n.startswith(f"peer{k}.")) > 1e-3
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)


def test_resume_and_saved_peers(tmp_path):
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, peer_heads="reinit")
    full = make(bert_peers(2), tmp_path / "full", **settings)
    full.train()
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    assert {"peer-0", "peer-1", "training_args.json", "optimizer.safetensors"} <= set(os.listdir(checkpoint))
    assert "training_args.bin" not in os.listdir(checkpoint)  # JSON, nothing to unpickle
    resumed = make(bert_peers(2), tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for peer, again in zip(full.peers, resumed.peers):
        for name, tensor in peer.state_dict().items():
            torch.testing.assert_close(again.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    logs = [h for h in full.state.log_history if "loss" in h]
    for h in logs:  # loss = Σ weight · term, each peer's terms logged apart
        mix = sum(0.7 * h[f"peer{k}/loss_ce"] + 0.6 * h[f"peer{k}/distill/logits_forward_kl"] for k in (0, 1))
        assert h["loss"] == pytest.approx(mix, rel=1e-5)
    late = [h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] > 2]
    assert late == pytest.approx([h["loss"] for h in logs if h["step"] > 2], rel=1e-5) and len(late) == 2
    # every peer is a plain checkpoint with the tokenizer; the folder itself is peer 0
    out = tmp_path / "saved"
    full.save_model(str(out))
    for k, peer in enumerate(full.peers):
        for folder in [out / f"peer-{k}"] + ([out] if k == 0 else []):
            loaded, info = AutoModelForSequenceClassification.from_pretrained(
                folder, output_loading_info=True
            )
            assert not any(info.values()), info
            assert all(torch.equal(loaded.state_dict()[n], v) for n, v in peer.state_dict().items())
            assert len(AutoTokenizer.from_pretrained(folder)) == len(full.processing_class)
    # control: a checkpoint without a peer's weights is refused, not silently started from scratch
    os.remove(checkpoint / "peer-1" / "model.safetensors")
    with pytest.raises(
        ValueError, match="peer-1/model.safetensors is missing"
    ):  # the completion marker's list
        make(bert_peers(2), tmp_path / "again", **settings).train(resume_from_checkpoint=str(checkpoint))
    os.remove(checkpoint / "llmkd_checkpoint.json")  # unmarked: the peers' loader refuses it too
    with pytest.raises(FileNotFoundError, match="peer"):
        make(bert_peers(2), tmp_path / "again2", **settings).train(resume_from_checkpoint=str(checkpoint))


# ---- metrics, diversity, refusals, recipe --------------------------------------------------------------------


def test_evaluation_reports_every_peer(tmp_path):
    args = MutualConfig(**training_settings(tmp_path, terms=[KL], temperature=2.0, hard_label_weight=0.7))
    data = classification_dataset(16, seed=7)
    trainer = MutualTrainer(model=bert_peers(2), args=args, processing_class=make_tokenizer("bert"),
                            eval_dataset=data, compute_metrics=accuracy)  # fmt: skip
    metrics = trainer.evaluate()
    batch = batch_of(trainer, list(data))
    with torch.no_grad():
        own = [(p(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits.argmax(-1)
                == batch["labels"]).float().mean().item() for p in trainer.peers]  # fmt: skip
    assert own[0] != own[1]  # the peers disagree, so a mix-up of their metrics would show
    assert [metrics["eval_peer0_accuracy"], metrics["eval_peer1_accuracy"]] == pytest.approx(own)
    assert metrics["eval_accuracy"] == metrics["eval_peer0_accuracy"]
    mix = sum(0.7 * metrics[f"eval_peer{k}/loss_ce"] + 0.6 * metrics[f"eval_peer{k}/distill/logits_forward_kl"] for k in (0, 1))  # fmt: skip
    assert metrics["eval_loss"] == pytest.approx(mix, rel=1e-5)


def test_peers_must_differ_and_reinit_makes_copies_differ(tmp_path):
    twin = bert_peers(1)[0]
    with pytest.raises(ValueError, match="identical weights"):
        make([twin, copy.deepcopy(twin)], tmp_path)
    peers = [twin, copy.deepcopy(twin)]
    make(peers, tmp_path, peer_heads="reinit")
    heads = [p.classifier.weight.detach().clone() for p in peers]
    assert not torch.equal(heads[0], heads[1])
    assert torch.equal(peers[0].bert.pooler.dense.weight, peers[1].bert.pooler.dense.weight)  # only the heads
    again = [copy.deepcopy(twin), copy.deepcopy(twin)]
    make(again, tmp_path / "again", peer_heads="reinit")  # the same seed draws the same heads
    assert all(torch.equal(h, p.classifier.weight) for h, p in zip(heads, again))
    with pytest.raises(ValueError, match="sequence classifier"):
        make(llama_peers(), tmp_path, "llama", peer_heads="reinit")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_peers": 1}, "num_peers must be an integer >= 2"),
        ({"num_peers": 3}, "num_peers=3 but 2 peers"),
        ({"mutual_target": "mean"}, "no effect with num_peers=2"),
        ({"terms": [{"knowledge": "hidden", "loss": "mse"}]}, "hidden terms are not supported"),
        ({"teacher_dtype": "bfloat16"}, "no teacher model"),
        ({"logit_chunk_size": 3}, "logit_chunk_size=3 has no effect"),
    ],
)
def test_bad_settings_are_refused_before_training(settings, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        make(bert_peers(2), tmp_path, **settings)


def test_bad_peers_and_arguments_are_refused(tmp_path):
    args = MutualConfig(**training_settings(tmp_path))
    tok = make_tokenizer("bert")
    with pytest.raises(ValueError, match="no pre-trained teacher"):
        MutualTrainer(model=bert_peers(2), teacher=bert_peers(1)[0], args=args, processing_class=tok)
    with pytest.raises(ValueError, match=r"model=\[peer0, peer1"):
        MutualTrainer(model=bert_peers(1)[0], args=args, processing_class=tok)
    three = seeded(BertForSequenceClassification, bert_config(2, 16, num_labels=3), 5)
    with pytest.raises(ValueError, match="num_labels"):
        MutualTrainer(model=[bert_peers(1)[0], three], args=args, processing_class=tok)
    with pytest.raises(ValueError, match="preprocess_logits_for_metrics"):
        MutualTrainer(model=bert_peers(2), args=args, processing_class=tok, preprocess_logits_for_metrics=max)


def test_recipe_smoke(tmp_path):
    """recipes/methods/mutual.yaml end to end on a tiny 4-layer teacher: two peers from its layers [0, 3]."""
    seeded(BertForSequenceClassification, bert_config(layers=4), 0).save_pretrained(tmp_path / "teacher")
    make_tokenizer("bert").save_pretrained(tmp_path / "teacher")
    for split, n in (("train", 40), ("validation", 16)):
        rows = [{"sentence": s, "label": int("w1" in s)} for s in sentences(n, seed=n)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    flags = ["--smoke", "--teacher", str(tmp_path / "teacher"), "--train_file", str(tmp_path / "train.jsonl"),
             "--validation_file", str(tmp_path / "validation.jsonl"), "--output_dir", str(out), "--use_cpu", "true"]  # fmt: skip
    report = distill(str(ROOT / "recipes" / "methods" / "mutual.yaml"), flags)
    assert (
        report["trainer"] == "MutualTrainer"
        and len(report["peers"]) == 2
        and report["student"]["layers"] == 2
    )
    assert {"eval_accuracy", "eval_peer0_accuracy", "eval_peer1_accuracy"} <= set(report["eval"])
    first, second = (load_file(out / f"peer-{k}" / "model.safetensors") for k in (0, 1))
    assert all(torch.equal(v, first[n]) for n, v in load_file(out / "model.safetensors").items())  # peer 0
    assert not torch.equal(first["classifier.weight"], second["classifier.weight"])
    with pytest.raises(ValueError, match=r"\['lora'\] with trainer: mutual"):  # before any model is loaded
        distill(str(ROOT / "recipes" / "methods" / "mutual.yaml"), [*flags, "--lora", "{r: 4}"])
