"""Data-free synthesis, ZeroGen (Ye et al. 2022): a generator writes, the classifier teacher labels, filters keep."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    BertForSequenceClassification,
    LlamaForCausalLM,
    bert_config,
    llama_config,
    make_tokenizer,
    seeded,
    sentences,
)
from test_synthesis import Interrupt, read_json, rows

from llmkd.data.synthesis import filters
from llmkd.data.synthesis.common import derive_seed
from llmkd.data.synthesis.zerogen import ZeroGenConfig, zerogen_dataset


def classifier(seed=0, spread=None):
    """Tiny BERT classifier; with `spread` texts, its head is sharpened and its bias set so that half of them
    fall in each class, far from the decision boundary (a random head puts every text in one class)."""
    model = seeded(BertForSequenceClassification, bert_config(), seed)
    if spread is not None:
        with torch.no_grad():
            model.classifier.weight.mul_(20.0)
            model.classifier.bias.zero_()
            logits = fresh_probs(model, make_tokenizer("bert"), spread).log()
            margins = (logits[:, 1] - logits[:, 0]).sort().values
            middle = len(spread) // 2
            model.classifier.bias[1] = -(margins[middle - 1] + margins[middle]) / 2
    return model


def fresh_probs(model, tokenizer, texts) -> torch.Tensor:
    """Independent reference: one unpadded forward per text."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(**tokenizer(t, return_tensors="pt")).logits.softmax(-1) for t in texts])


def fixed_generator(texts: list[str], seed: int = 0, stream: str = "text"):
    """A ZeroGen 'generator' whose text for sample i is texts[i] (recognised by sample i's seed)."""
    by_seed = {derive_seed(seed, i, stream): t for i, t in enumerate(texts)}
    return lambda prompts, seeds: [by_seed[s] for s in seeds]


def zg_config(tmp_path, n, name="zg", **kw) -> ZeroGenConfig:
    kw = {"label_prompts": {0: "bad", 1: "good"}, "batch_size": 4, "shard_size": 8} | kw
    return ZeroGenConfig(output_dir=str(tmp_path / name), num_candidates=n, progress_bar=False, **kw)


def candidate(i, text, probs, intended=0, words=None, tokens=None):
    n = len(text.split())
    return {
        "sample_index": i,
        "text": text,
        "teacher_probs": probs,
        "label": int(probs[1] > probs[0]),
        "intended_label": intended,
        "num_words": [n if words is None else words],
        "num_tokens": [n if tokens is None else tokens],
    }


def screened(cands, **kw):
    config = ZeroGenConfig(output_dir="unused", label_prompts={0: "a", 1: "b"}, **kw)
    stats = filters.new_stats(len(cands))
    return [c["sample_index"] for c in filters.screen(cands, config, stats)], stats


def test_confidence_agreement_and_length_filters():
    cands = [
        candidate(0, "w1 w2 w3", [0.9, 0.1]),
        candidate(1, "w4 w5 w6", [0.55, 0.45]),
        candidate(2, "w7 w8 w9", [0.2, 0.8], intended=0),
        candidate(3, "w10", [0.95, 0.05]),
        candidate(4, "w1 w1 w1 w1 w1 w1", [0.99, 0.01]),
        candidate(5, "   ", [0.99, 0.01]),
        candidate(6, "w11 w12 w13", [0.99, 0.01], tokens=9),
    ]
    kept, stats = screened(cands, min_confidence=0.6, min_words=2, max_words=5, max_tokens=8)
    assert kept == [0, 2]
    assert (stats["low_confidence"], stats["too_short"], stats["too_long"], stats["empty"]) == (1, 1, 2, 1)
    kept, stats = screened(
        cands, min_confidence=0.6, min_words=2, max_words=5, max_tokens=8, require_agreement=True
    )
    assert kept == [0] and stats["disagreement"] == 1
    kept, _ = screened(cands)
    assert kept == [0, 1, 2, 3, 4, 6]  # defaults drop only the empty text


def test_exact_and_near_duplicates_are_dropped_and_counted():
    texts = [
        "The plot was thin but the acting was great",
        "the plot was thin, but the acting was GREAT!",  # exact after normalisation
        "The plot was thin but the acting was great!!",  # exact
        "The plot was thin but the acting was superb",  # near: most shingles shared
        "A completely different sentence about food",
    ]
    cands = [candidate(i, t, [0.9, 0.1]) for i, t in enumerate(texts)]
    jac = filters.jaccard(filters.shingles(texts[0], 5), filters.shingles(texts[3], 5))
    assert 0.7 < jac < 0.95
    kept, stats = screened(cands, near_duplicate_threshold=0.7)
    assert kept == [0, 4] and (stats["duplicate_exact"], stats["duplicate_near"]) == (2, 1)
    kept, stats = screened(cands, near_duplicate_threshold=None)
    assert kept == [0, 3, 4] and stats["duplicate_near"] == 0
    kept, _ = screened(cands, deduplicate=False)
    assert kept == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "kw, per_class",
    [({}, {0: 3, 1: 3}), ({"per_class": 2}, {0: 2, 1: 2}), ({"balance": False}, {0: 5, 1: 3})],
)
def test_class_balance_caps_every_class(kw, per_class):
    cands = [candidate(i, f"w{i}", [0.9, 0.1]) for i in range(5)]
    cands += [candidate(i, f"w{i}", [0.1, 0.9]) for i in range(5, 8)]
    config = ZeroGenConfig(output_dir="unused", label_prompts={0: "a", 1: "b"}, **kw)
    stats = filters.new_stats(len(cands))
    kept = filters.select(cands, config, 2, stats)
    assert stats["kept_per_class"] == per_class and stats["kept"] == len(kept)
    assert stats["class_cap"] == 8 - len(kept)
    assert [c["sample_index"] for c in kept if c["label"] == 0] == list(range(per_class[0]))  # first ones


TEXTS = sentences(12, seed=3, min_len=3, max_len=8)
TEXTS += [
    TEXTS[0],  # 12: exact duplicate
    "  " + TEXTS[1] + " !",  # 13: exact after normalisation
    "",  # 14: empty
    " ".join(f"w{i}" for i in range(20)),  # 15: too long
]


def test_zerogen_labels_with_the_teacher_and_counts_every_filter(tmp_path):
    tok = make_tokenizer("bert")
    teacher = classifier(spread=TEXTS[:12])
    config = zg_config(
        tmp_path, len(TEXTS), max_words=10, balance=False, label_prompts={"LABEL_0": "a", 1: "b"}
    )
    data = zerogen_dataset(teacher, tok, fixed_generator(TEXTS), config)
    reference = fresh_probs(teacher, tok, TEXTS[:12])
    assert data["sample_index"] == list(range(12))
    torch.testing.assert_close(torch.tensor(data["teacher_probs"]), reference, atol=1e-5, rtol=0)
    assert data["label"] == reference.argmax(-1).tolist()
    assert set(data["label"]) == {0, 1}
    assert data["intended_label"] == [i % 2 for i in range(12)] and data["prompt"][:2] == ["a", "b"]
    record = read_json(tmp_path / "zg" / "provenance.json")
    stats = record["filter_stats"]
    assert record["generator_kind"] == "callable" and record["budgets"] == {"num_candidates": len(TEXTS)}
    assert (stats["duplicate_exact"], stats["empty"], stats["too_long"], stats["kept"]) == (2, 1, 1, 12)

    confidences = reference.max(-1).values.sort().values
    tau = float(confidences[5] + confidences[6]) / 2  # between two candidates: no float-noise ties
    config = zg_config(tmp_path, len(TEXTS), "tau", max_words=10, balance=False, min_confidence=tau)
    data = zerogen_dataset(teacher, tok, fixed_generator(TEXTS), config)
    assert min(max(p) for p in data["teacher_probs"]) >= tau - 1e-6
    stats = read_json(tmp_path / "tau" / "provenance.json")["filter_stats"]
    confident = fresh_probs(teacher, tok, TEXTS[:14]).max(-1).values >= tau
    assert stats["low_confidence"] == int((~confident).sum())
    assert sum(stats[r] for r in filters.REASONS) + stats["kept"] == len(TEXTS)


def test_zerogen_with_a_causal_lm_generator_and_pair_prompts(tmp_path):
    generator = seeded(LlamaForCausalLM, llama_config(), 2)
    teacher = classifier()
    pair = {"premise_prompts": ["w1 w2"], "label_prompts": {0: "w3 {premise} w4", 1: "w5 {premise} w6"}}
    config = zg_config(
        tmp_path, 6, max_new_tokens=5, stop_strings=["</s>"], min_words=0, balance=False, **pair
    )
    data = zerogen_dataset(
        teacher, make_tokenizer("bert"), generator, config, generator_tokenizer=make_tokenizer("llama")
    )
    assert data.column_names[:5] == ["sample_index", "intended_label", "prompt", "text", "text_pair"]
    templates = {0: "w3 {premise} w4", 1: "w5 {premise} w6"}
    assert all(r["prompt"] == templates[r["intended_label"]].replace("{premise}", r["text"]) for r in data)
    record = read_json(tmp_path / "zg" / "provenance.json")
    assert record["method"] == "zerogen" and record["generator"]["class"] == "LlamaForCausalLM"
    assert record["generator_kind"] == "causal_lm" and record["generation"]["top_p"] == 0.9
    with pytest.raises(ValueError, match="generator_tokenizer"):
        zerogen_dataset(teacher, make_tokenizer("bert"), generator, zg_config(tmp_path, 2, "x"))


def test_hard_mining_prefers_student_disagreement_and_is_inert_for_a_copy(tmp_path):
    tok = make_tokenizer("bert")
    texts = sentences(24, seed=5, min_len=3, max_len=8)
    teacher = classifier(spread=texts)
    student = seeded(BertForSequenceClassification, bert_config(layers=2, hidden=16), 1)
    kw = {"balance": False, "per_class": 4, "hard_fraction": 1.0, "deduplicate": False}
    mined = zerogen_dataset(
        teacher, tok, fixed_generator(texts), zg_config(tmp_path, 24, "hard", **kw), student=student
    )
    plain = zerogen_dataset(teacher, tok, fixed_generator(texts), zg_config(tmp_path, 24, "plain", **kw))
    p_t, p_s = fresh_probs(teacher, tok, texts), fresh_probs(student, tok, texts)
    kl = (p_t * (p_t.log() - p_s.log())).sum(-1)
    for label in (0, 1):
        members = [i for i in range(24) if int(p_t[i].argmax()) == label]
        expected = sorted(sorted(members, key=lambda i: -float(kl[i]))[:4])
        assert [r["sample_index"] for r in mined if r["label"] == label] == expected
    stored_kl = torch.tensor(mined["teacher_student_kl"], dtype=torch.float64)
    torch.testing.assert_close(stored_kl, kl[mined["sample_index"]].double(), atol=1e-5, rtol=0)
    assert all(mined["hard"]) and mined["sample_index"] != plain["sample_index"]

    copy_kw = kw | {"hard_fraction": 0.5}
    twin_config, twin = zg_config(tmp_path, 24, "twin", **copy_kw), copy.deepcopy(teacher)
    twin = zerogen_dataset(teacher, tok, fixed_generator(texts), twin_config, student=twin)
    assert max(twin["teacher_student_kl"]) < 1e-6  # control: the same model disagrees nowhere
    assert twin["sample_index"] == plain["sample_index"]  # so mining changes nothing


def test_interrupted_zerogen_resumes_to_the_same_dataset(tmp_path):
    tok = make_tokenizer("bert")
    teacher = classifier(spread=TEXTS[:12])
    whole = rows(zerogen_dataset(teacher, tok, fixed_generator(TEXTS), zg_config(tmp_path, 16)))
    calls, write = {"n": 0}, fixed_generator(TEXTS)

    def flaky(prompts, seeds):
        calls["n"] += 1
        if calls["n"] == 3:  # first batch of the second shard
            raise Interrupt("killed")
        return write(prompts, seeds)

    with pytest.raises(Interrupt):
        zerogen_dataset(teacher, tok, flaky, zg_config(tmp_path, 16, "cut"))
    assert len(read_json(tmp_path / "cut" / "progress.json")["shards"]) == 1
    resumed = rows(zerogen_dataset(teacher, tok, flaky, zg_config(tmp_path, 16, "cut")))
    assert resumed == whole
    with pytest.raises(ValueError, match="min_confidence: saved 0.0, now 0.9"):
        zerogen_dataset(teacher, tok, flaky, zg_config(tmp_path, 16, "cut", min_confidence=0.9))
