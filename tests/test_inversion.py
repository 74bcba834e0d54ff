"""Data-free synthesis, method 4 (EXPERIMENTAL): teacher inversion in embedding space, projected to tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tokenizer
from test_gibbs import trained_classifier
from test_synthesis import Interrupt, read_json

from llmkd.data.synthesis import inversion
from llmkd.data.synthesis.gibbs import allowed_tokens
from llmkd.data.synthesis.inversion import (
    InversionConfig,
    diversity,
    fluency,
    inversion_dataset,
    nearest_tokens,
)


@pytest.fixture(scope="module")
def teacher():
    return trained_classifier()


def config(tmp_path, name="inv", **kw) -> InversionConfig:
    kw = {
        "num_samples": 16,
        "min_length": 3,
        "max_length": 6,
        "steps": 30,
        "learning_rate": 0.1,
        "fluency_weight": 0.1,
        "batch_size": 4,
        "diversity_group": 4,
        "shard_size": 8,
        "balance": False,
        "deduplicate": False,
    } | kw
    return InversionConfig(output_dir=str(tmp_path / name), progress_bar=False, **kw)


def run(teacher, tmp_path, name="inv", **kw):
    return inversion_dataset(teacher, make_tokenizer("bert"), config(tmp_path, name, **kw))


def test_config_checks():
    with pytest.raises(ValueError, match=r"diversity_group \(3\) must divide batch_size \(4\)"):
        InversionConfig(output_dir="o", batch_size=4, diversity_group=3)
    with pytest.raises(ValueError, match="learning_rate must be a number in"):
        InversionConfig(output_dir="o", learning_rate=0)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        InversionConfig(output_dir="o", steps=0)


def test_optimised_embeddings_raise_the_target_class_only(tmp_path, teacher):
    data = run(teacher, tmp_path)
    for target in (0, 1):
        mine = [r for r in data if r["intended_label"] == target]
        others = [r for r in data if r["intended_label"] != target]
        before = sum(r["initial_probs"][target] for r in mine) / len(mine)
        after = sum(r["embedding_probs"][target] for r in mine) / len(mine)
        assert after > before + 0.1, (target, before, after)
        # Control: samples optimised towards the other class do not gain this one.
        before = sum(r["initial_probs"][target] for r in others) / len(others)
        after = sum(r["embedding_probs"][target] for r in others) / len(others)
        assert after <= before + 1e-3, (target, before, after)
    assert data["intended_label"] == [i % 2 for i in range(16)]


def test_projection_is_the_brute_force_nearest_allowed_token(teacher):
    tok = make_tokenizer("bert")
    table = teacher.get_input_embeddings().weight.detach()
    allowed = allowed_tokens(tok, table.shape[0])
    z = torch.randn(3, 5, table.shape[1], generator=torch.Generator().manual_seed(0)) * table.std()
    z[0, 0] = table[tok.cls_token_id]  # sits on a special token: must not be projected to it
    got = nearest_tokens(z, table, allowed)
    for b in range(3):
        for j in range(5):
            best = min(
                (i for i in range(table.shape[0]) if allowed[i]),
                key=lambda i: float(((z[b, j].double() - table[i].double()) ** 2).sum()),
            )
            assert int(got[b, j]) == best
    assert int(got[0, 0]) != tok.cls_token_id and not allowed[tok.cls_token_id]
    assert nearest_tokens(table[None, 10:20], table, allowed).tolist() == [list(range(10, 20))]


def test_fluency_and_diversity_terms_match_plain_loops():
    table = torch.randn(12, 4, dtype=torch.float64)
    z = torch.randn(4, 3, 4, dtype=torch.float64)
    valid = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    expected = [
        sum(min(float(((z[b, j] - v) ** 2).sum()) for v in table) for j in range(3) if valid[b, j])
        / valid[b].sum()
        for b in range(4)
    ]
    torch.testing.assert_close(fluency(z, table, valid), torch.tensor(expected, dtype=torch.float64))
    targets, groups = torch.tensor([0, 1, 0, 0]), torch.tensor([0, 0, 0, 1])
    pooled = [z[b][valid[b]].mean(0) for b in range(4)]
    cos = torch.nn.functional.cosine_similarity(pooled[0], pooled[2], dim=0)
    # 0 and 2 share class and group; 1 has no same-class peer; 3 is alone in its group.
    torch.testing.assert_close(
        diversity(z, valid, targets, groups), torch.stack([cos, 0 * cos, cos, 0 * cos])
    )


def test_fluency_prior_keeps_vectors_near_tokens(tmp_path, teacher):
    kw = {"num_samples": 4, "shard_size": 4, "store_embeddings": True, "steps": 40}
    table = teacher.get_input_embeddings().weight.detach()
    allowed = table[allowed_tokens(make_tokenizer("bert"), table.shape[0])]
    distance = {}
    for weight in (0.0, 5.0):
        data = run(teacher, tmp_path, f"f{weight}", fluency_weight=weight, **kw)
        z = [torch.tensor(e) for e in data["embeddings"]]
        distance[weight] = sum(
            float(fluency(v[None], allowed, torch.ones(1, len(v), dtype=torch.bool))) for v in z
        )
    assert distance[5.0] < 0.5 * distance[0.0]


def test_reproducible_independent_of_batch_size_and_resumable(tmp_path, teacher, monkeypatch):
    whole = run(teacher, tmp_path, "whole")
    wide = run(teacher, tmp_path, "wide", batch_size=8, shard_size=16)
    other = run(teacher, tmp_path, "other", seed=3)
    assert wide["text"] == whole["text"] and other["text"] != whole["text"]
    torch.testing.assert_close(
        torch.tensor(wide["embedding_probs"]), torch.tensor(whole["embedding_probs"]), atol=1e-4, rtol=0
    )
    real, calls = inversion.invert_batch, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Interrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(inversion, "invert_batch", failing)
    with pytest.raises(Interrupt):
        run(teacher, tmp_path, "cut")
    assert len(read_json(tmp_path / "cut" / "progress.json")["shards"]) == 1
    resumed = run(teacher, tmp_path, "cut")
    assert [dict(r) for r in resumed] == [dict(r) for r in whole]
    record = read_json(tmp_path / "cut" / "provenance.json")
    assert record["method"] == "inversion" and record["experimental"] is True
    stats = record["inversion_stats"]
    assert set(stats) == {"initial_probs", "embedding_probs", "projected_probs", "teacher_probs"}


def test_agreement_filter_keeps_only_texts_labelled_as_their_target(tmp_path, teacher):
    data = run(teacher, tmp_path, "agree", require_agreement=True)
    assert len(data) > 0 and data["label"] == data["intended_label"]
    stats = read_json(tmp_path / "agree" / "provenance.json")["filter_stats"]
    assert stats["disagreement"] == 16 - len(data)
