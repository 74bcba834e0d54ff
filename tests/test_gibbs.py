"""Data-free synthesis, method 3: Gibbs sampling from a masked LM (Wang & Cho 2019), labelled by the teacher."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import (
    VOCAB,
    BertForSequenceClassification,
    LlamaForCausalLM,
    bert_config,
    llama_config,
    make_tokenizer,
    seeded,
    sentences,
)
from test_synthesis import Interrupt, read_json
from transformers import BertForMaskedLM

from llmkd.data.synthesis import filters, gibbs
from llmkd.data.synthesis.gibbs import GibbsConfig, allowed_tokens, gibbs_dataset

RIGGED = 20  # token id of w14


def mlm_tokenizer():
    tok = make_tokenizer("bert")
    tok.add_special_tokens({"mask_token": "[MASK]"})  # id VOCAB: the classifier's tokenizer lacks it
    return tok


def tiny_mlm(seed=0, peaked=False):
    """A tiny BERT MLM; `peaked` gives its output bias a spread, so that its conditionals are far from uniform."""
    config = bert_config()
    config.vocab_size = VOCAB + 1
    model = seeded(BertForMaskedLM, config, seed)
    if peaked:
        with torch.no_grad():
            model.cls.predictions.bias.copy_(
                torch.randn(VOCAB + 1, generator=torch.Generator().manual_seed(1)) * 2
            )
    return model.eval()


def trained_classifier(steps=60):
    """A 2-layer classifier trained on a word rule (mostly words below w28 -> class 1): unlike a random tiny
    BERT, its output really depends on the input, so confidence, balance and inversion are meaningful."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config(layers=2))
    texts = sentences(64, seed=1, min_len=3, max_len=8)
    labels = torch.tensor([int(2 * sum(int(w[1:]) < 28 for w in t.split()) > len(t.split())) for t in texts])
    encoded = make_tokenizer("bert")(texts, padding=True, return_tensors="pt")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        model(**encoded, labels=labels).loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def teacher():
    return trained_classifier()


def config(tmp_path, name="g", **kw) -> GibbsConfig:
    kw = {
        "num_samples": 16,
        "min_length": 3,
        "max_length": 6,
        "sweeps": 3,
        "burn_in": 1,
        "top_k": 20,
        "batch_size": 4,
        "shard_size": 8,
        "balance": False,
        "deduplicate": False,
    } | kw
    return GibbsConfig(output_dir=str(tmp_path / name), progress_bar=False, **kw)


def run(teacher, tmp_path, name="g", mlm=None, **kw):
    return gibbs_dataset(
        teacher, make_tokenizer("bert"), mlm or tiny_mlm(), mlm_tokenizer(), config(tmp_path, name, **kw)
    )


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"sweeps": 0}, "sweeps must be an integer >= 1"),
        ({"sweeps": 2, "burn_in": 3}, "burn_in must be an integer >= 0 and <= 2"),
        ({"min_length": 4, "max_length": 3}, "max_length must be an integer >= 4"),
        ({"init": "zeros"}, "init must be one of ['mask', 'random']"),
        ({"order": "backwards"}, "order must be one of ['random', 'left_to_right']"),
        ({"temperature": 0}, "temperature must be a number in (0.0"),
        ({"min_confidence": 2}, "min_confidence must be a number in [0.0, 1.0]"),
        ({"shard_size": 6, "batch_size": 4}, "shard_size (6) must be a multiple of batch_size (4)"),
    ],
)
def test_config_checks(kw, message):
    with pytest.raises(ValueError) as err:
        GibbsConfig(output_dir="out", **kw)
    assert message in str(err.value)
    assert all(f.metadata.get("help") for f in dataclasses.fields(GibbsConfig))


def test_models_that_cannot_fill_a_mask_are_refused(tmp_path, teacher):
    tok = make_tokenizer("bert")
    cases = [
        (teacher, mlm_tokenizer(), "mlm must be a masked LM"),  # a classifier has no LM head
        (seeded(LlamaForCausalLM, llama_config(), 0), mlm_tokenizer(), "mlm must be a masked LM"),
        (tiny_mlm(), tok, "has no mask token"),
    ]
    for mlm, mlm_tok, message in cases:
        with pytest.raises(ValueError, match=message):
            gibbs_dataset(teacher, tok, mlm, mlm_tok, config(tmp_path))


def test_seeded_reproducible_and_independent_of_batch_size(tmp_path, teacher):
    first = run(teacher, tmp_path, "a")
    again = run(teacher, tmp_path, "b")
    other = run(teacher, tmp_path, "c", seed=1)
    single = run(teacher, tmp_path, "d", batch_size=1, shard_size=4)
    wide = run(teacher, tmp_path, "e", batch_size=8, shard_size=16)
    assert first["text"] == again["text"] == single["text"] == wide["text"]
    for data in (single, wide):
        torch.testing.assert_close(torch.tensor(data["teacher_probs"]), torch.tensor(first["teacher_probs"]))
    assert first["text"] != other["text"]
    assert len(set(first["text"])) > 12  # chains differ from each other
    assert all(3 <= n <= 6 and len(t.split()) == n for n, t in zip(first["length"], first["text"]))
    assert len(first) == 16  # the sample budget, nothing filtered


@pytest.mark.parametrize("init, order", [("mask", "random"), ("random", "left_to_right")])
def test_positions_are_redrawn_from_the_mlm(tmp_path, teacher, init, order):
    rigged = tiny_mlm()
    with torch.no_grad():
        rigged.cls.predictions.bias[RIGGED] = 50.0  # the MLM all but insists on w14 everywhere
    kw = {"init": init, "order": order, "burn_in": 3}
    data = run(teacher, tmp_path, "rigged", mlm=rigged, **kw)
    assert all(set(t.split()) == {"w14"} for t in data["text"])  # every position was resampled
    control = run(teacher, tmp_path, "plain", **kw)
    assert sum(t.count("w14") for t in control["text"]) < sum(control["length"]) / 4


def test_single_position_samples_follow_the_mlm_conditional(tmp_path, teacher):
    mlm, tok = tiny_mlm(peaked=True), mlm_tokenizer()
    n = 400
    kw = {"num_samples": n, "min_length": 1, "max_length": 1, "sweeps": 1, "burn_in": 1, "temperature": 0.7}
    data = run(teacher, tmp_path, "one", mlm=mlm, batch_size=50, shard_size=200, **kw)
    with torch.no_grad():  # reference: one plain forward of [CLS] [MASK] [SEP]
        logits = mlm(input_ids=torch.tensor([[2, tok.mask_token_id, 3]])).logits[0, 1]
    allowed = allowed_tokens(tok, VOCAB + 1)
    expected = (logits / 0.7).masked_fill(~allowed, -torch.inf).softmax(-1).double()
    ids = torch.tensor(tok.convert_tokens_to_ids(data["text"]))
    empirical = torch.bincount(ids, minlength=VOCAB + 1).double() / n
    assert expected.max() > 0.15  # a peaked conditional, far from uniform
    assert 0.5 * (empirical - expected).abs().sum() < 0.12
    uniform = allowed.double() / allowed.sum()
    assert 0.5 * (empirical - uniform).abs().sum() > 0.3  # control: the test can tell distributions apart
    top3 = run(
        teacher, tmp_path, "top3", mlm=mlm, batch_size=50, shard_size=200, **(kw | {"burn_in": 0, "top_k": 3})
    )
    assert set(tok.convert_tokens_to_ids(top3["text"])) <= set(expected.topk(3).indices.tolist())


def test_confidence_filter_and_class_balance(tmp_path, teacher):
    everything = run(teacher, tmp_path, "all", num_samples=32, shard_size=16)
    probs = torch.tensor(everything["teacher_probs"])
    confidences = probs.max(-1).values.sort().values
    tau = float(confidences[1] + confidences[2]) / 2  # drops the two least confident, no float-noise ties
    data = run(teacher, tmp_path, "bal", num_samples=32, shard_size=16, balance=True, min_confidence=tau)
    confident = [i for i, p in enumerate(probs.max(-1).values.tolist()) if p >= tau]
    stats = read_json(tmp_path / "bal" / "provenance.json")["filter_stats"]
    counts = [sum(int(probs[i].argmax()) == c for i in confident) for c in (0, 1)]
    assert min(counts) > 0 and stats["low_confidence"] == 32 - len(confident)
    assert stats["kept_per_class"] == {"0": min(counts), "1": min(counts)}
    assert len(data) == 2 * min(counts) and set(data["sample_index"]) <= set(confident)
    assert sum(stats[r] for r in filters.REASONS) + stats["kept"] == 32


def test_interrupted_run_resumes_without_duplicates_and_records_provenance(tmp_path, teacher, monkeypatch):
    whole = run(teacher, tmp_path, "whole")
    real, calls = gibbs.sample_texts, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # first batch of the second shard
            raise Interrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(gibbs, "sample_texts", failing)
    with pytest.raises(Interrupt):
        run(teacher, tmp_path, "cut")
    assert [s["rows"] for s in read_json(tmp_path / "cut" / "progress.json")["shards"]] == [8]
    resumed = run(teacher, tmp_path, "cut")
    assert resumed["sample_index"] == list(range(16)) and resumed["text"] == whole["text"]
    record = read_json(tmp_path / "cut" / "provenance.json")
    assert record["method"] == "gibbs" and record["generator_kind"] == "masked_lm"
    assert record["generator"]["class"] == "BertForMaskedLM" and record["world_size"] == 1
    assert record["generation"]["sweeps"] == 3 and record["budgets"] == {"num_samples": 16}
    with pytest.raises(ValueError, match="sweeps: saved 3, now 4"):
        run(teacher, tmp_path, "cut", sweeps=4)
