"""Data-free synthesis: teacher sampling (LLM-QAT / Magpie starts), ZeroGen labelling and filters, resume."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch
from conftest import (
    VOCAB,
    LlamaForCausalLM,
    llama_config,
    make_tokenizer,
    seeded,
)
from transformers import GPT2Config, GPT2LMHeadModel

from llmkd.data.synthesis import sampling
from llmkd.data.synthesis.decoding import sample_batch
from llmkd.data.synthesis.sampling import SamplingConfig, chat_template_prefix, sample_teacher
from llmkd.data.synthesis.zerogen import ZeroGenConfig

EOS = 5
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> [CLS] w1 w2 {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}w3 {% endif %}"
)


@pytest.fixture
def teacher_lm():
    """Tiny Llama with logits scaled x10: decisive argmaxes, so float rounding of padded batches never flips one."""
    model = seeded(LlamaForCausalLM, llama_config(), 0)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    return model


def gpt2_teacher():
    """Tiny GPT-2: absolute position embeddings, so wrong positions under left padding change the output
    (Llama's rotary positions are relative and would hide that)."""
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, eos_token_id=EOS)
    model = seeded(GPT2LMHeadModel, config, 0)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # tied with the input embeddings: sharper on both ends
    return model


def lm_config(tmp_path, name="run", **kw) -> SamplingConfig:
    kw = {"num_samples": 8, "max_new_tokens": 6, "batch_size": 2, "shard_size": 4, "progress_bar": False} | kw
    return SamplingConfig(output_dir=str(tmp_path / name), **kw)


def rows(dataset) -> list[dict]:
    return [dict(r) for r in dataset]


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@contextlib.contextmanager
def eos_bias(model, bias_for):
    """Adds bias_for(call, row) to the EOS logit while active; yields the forward-call counter."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        bias = torch.zeros_like(output)
        for row in range(output.shape[0]):
            bias[row, :, EOS] = bias_for(calls["n"], row)
        calls["n"] += 1
        return output + bias

    handle = model.lm_head.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def decode(model, prompts, store_topk=0, **options) -> list[dict]:
    config = SamplingConfig(output_dir="unused", **options)
    seeds = [11 + len(p) + sum(p) for p in prompts]  # any per-prompt seed
    return sample_batch(model, prompts, seeds, config, eos_ids={EOS}, pad_id=0, store_topk=store_topk)


S, Z = SamplingConfig, ZeroGenConfig


@pytest.mark.parametrize(
    "cls, kw, message",
    [
        (S, {"temperature": 0.0}, "temperature must be a number in (0.0"),
        (S, {"top_p": 0}, "top_p must be a number in (0.0, 1.0]"),
        (S, {"top_k": -1}, "top_k must be an integer >= 0"),
        (S, {"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        (S, {"shard_size": 5, "batch_size": 2}, "shard_size (5) must be a multiple of batch_size (2)"),
        (S, {"num_samples": None, "max_total_tokens": None}, "no budget"),
        (S, {"start": "bos"}, "start must be one of ['random_token', 'chat_template']"),
        (S, {"store_topk": -2}, "store_topk must be an integer >= 0"),
        (S, {"output_dir": None}, "output_dir must be a folder path"),
        (Z, {"min_confidence": 1.5}, "min_confidence must be a number in [0.0, 1.0]"),
        (Z, {"hard_fraction": -0.1}, "hard_fraction must be a number in [0.0, 1.0]"),
        (Z, {"min_words": 3, "max_words": 2}, "max_words must be an integer >= 3"),
        (Z, {"near_duplicate_threshold": 0}, "near_duplicate_threshold must be a number in (0.0"),
        (Z, {"label_prompts": {}}, "label_prompts must map labels to prompts"),
        (Z, {"premise_prompts": ["p"], "label_prompts": {0: "x"}}, "must contain {premise}"),
        (Z, {"label_prompts": {0: "x {premise}"}}, "contains {premise} but premise_prompts is null"),
        (Z, {"per_class": 0}, "per_class must be an integer >= 1"),
    ],
)
def test_config_range_checks(cls, kw, message):
    with pytest.raises(ValueError) as err:
        cls(**({"output_dir": "out"} | kw))
    assert message in str(err.value)


def test_every_config_field_has_help():
    import dataclasses

    for cls in (SamplingConfig, ZeroGenConfig):
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls)), cls


def test_same_seed_same_rows_other_seed_differs_and_batch_size_does_not_matter(tmp_path, teacher_lm):
    tok = make_tokenizer("llama")
    kw = {"greedy_tokens": 2, "temperature": 0.9, "top_k": 20, "top_p": 0.95}
    first = rows(sample_teacher(teacher_lm, tok, lm_config(tmp_path, "a", **kw)))
    again = rows(sample_teacher(teacher_lm, tok, lm_config(tmp_path, "b", **kw)))
    other = rows(sample_teacher(teacher_lm, tok, lm_config(tmp_path, "c", seed=1, **kw)))
    one_by_one = rows(sample_teacher(teacher_lm, tok, lm_config(tmp_path, "d", batch_size=1, **kw)))
    sharded = lm_config(tmp_path, "e", batch_size=4, shard_size=8, **kw)
    one_shard = rows(sample_teacher(teacher_lm, tok, sharded))
    assert first == again
    assert first == one_by_one == one_shard  # per-sample seeds: batches and shards do not change a row
    assert [r["input_ids"] for r in first] != [r["input_ids"] for r in other]
    assert len({tuple(r["input_ids"]) for r in first}) > 1  # rows differ from each other too


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_equals_unbatched_under_greedy_with_left_padding(arch, teacher_lm):
    teacher_lm = gpt2_teacher() if arch == "gpt2" else teacher_lm
    tok = make_tokenizer("llama")
    tok.chat_template = CHAT_TEMPLATE
    chat = chat_template_prefix(tok)
    assert chat == [4, 2, 7, 8]  # <s> [CLS] w1 w2: the template up to the user's text
    prompts = [chat, [4, 17], [4, 30, 31], [4, 50]]  # lengths 4, 2, 3, 2: rows are left-padded
    batched = decode(teacher_lm, prompts, store_topk=3, do_sample=False, max_new_tokens=8)
    for prompt, row in zip(prompts, batched):
        (alone,) = decode(teacher_lm, [prompt], store_topk=3, do_sample=False, max_new_tokens=8)
        assert row["generated_ids"] == alone["generated_ids"]
        assert row["topk_ids"] == alone["topk_ids"]
        torch.testing.assert_close(torch.tensor(row["topk_logprobs"]), torch.tensor(alone["topk_logprobs"]))
    assert len({tuple(r["generated_ids"]) for r in batched}) == len(prompts)


def test_random_starts_avoid_special_tokens_and_chat_starts_use_the_template(tmp_path, teacher_lm):
    tok = make_tokenizer("llama")
    data = sample_teacher(
        teacher_lm, tok, lm_config(tmp_path, "r", num_samples=24, shard_size=24, max_new_tokens=1)
    )
    starts = [r["input_ids"][1] for r in data]
    assert all(r["input_ids"][0] == tok.bos_token_id and r["prompt_length"] == 2 for r in data)
    assert not set(starts) & set(tok.all_special_ids)
    assert len(set(starts)) > 10  # drawn from the vocabulary, not one token
    no_template = lm_config(tmp_path, "none", start="chat_template", greedy_tokens=0)
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        sample_teacher(teacher_lm, tok, no_template)
    assert not os.path.exists(no_template.output_dir)  # refused before writing anything
    tok.chat_template = CHAT_TEMPLATE
    chat = sample_teacher(
        teacher_lm, tok, lm_config(tmp_path, "c", start="chat_template", greedy_tokens=0, max_new_tokens=3)
    )
    assert all(r["input_ids"][:4] == [4, 2, 7, 8] and r["prompt_length"] == 4 for r in chat)


def test_eos_stops_each_row_and_max_new_tokens_bounds_the_rest(teacher_lm):
    prompts, options = [[4, 10], [4, 11], [4, 12], [4, 13]], {"greedy_tokens": 1, "max_new_tokens": 6}
    # Row r is forced to EOS at step r (rows 0-2); row 3 never may emit EOS.
    with eos_bias(teacher_lm, lambda step, row: 1e4 if (row < 3 and step == row) else -1e4) as calls:
        out = decode(teacher_lm, prompts, **options)
    assert [len(r["generated_ids"]) for r in out] == [1, 2, 3, 6]
    assert [r["finish_reason"] for r in out] == ["eos", "eos", "eos", "length"]
    assert [r["generated_ids"][-1] == EOS for r in out] == [True, True, True, False]
    assert all(EOS not in r["generated_ids"][:-1] for r in out)
    assert calls["n"] == 6  # prefill + 5 decoding steps: the 6th token needs no further forward
    with eos_bias(teacher_lm, lambda step, row: 1e4 if step == row else -1e4) as calls:
        decode(teacher_lm, prompts[:3], **options)
    assert calls["n"] == 3  # everyone finished at step 2: decoding stops, not at max_new_tokens


def test_token_budget_keeps_the_longest_fitting_prefix(tmp_path, teacher_lm):
    tok = make_tokenizer("llama")
    with eos_bias(teacher_lm, lambda step, row: 2.5):  # EOS likely enough for varied lengths
        unbounded = rows(
            sample_teacher(teacher_lm, tok, lm_config(tmp_path, "all", num_samples=16, max_new_tokens=8))
        )
        lengths = [r["num_generated"] for r in unbounded]
        budget = sum(lengths[:7]) + lengths[7] - 1  # the 8th row does not fit
        config = lm_config(tmp_path, "budget", num_samples=None, max_total_tokens=budget, max_new_tokens=8)
        bounded = rows(sample_teacher(teacher_lm, tok, config))
    assert len(set(lengths)) > 2 and max(lengths) <= 8
    assert bounded == unbounded[:7]
    assert sum(r["num_generated"] for r in bounded) <= budget
    assert read_json(tmp_path / "budget" / "provenance.json")["num_tokens"] == sum(lengths[:7])


def test_topk_logprobs_equal_a_fresh_teacher_forward(tmp_path, teacher_lm):
    tok = make_tokenizer("llama")
    config = lm_config(tmp_path, store_topk=4, temperature=0.7, top_p=0.8, greedy_tokens=1)
    data = sample_teacher(teacher_lm, tok, config)
    teacher_lm.eval()
    for row in data:
        ids, start = torch.tensor([row["input_ids"]]), row["prompt_length"]
        with torch.no_grad():
            logprobs = teacher_lm(ids).logits[0].log_softmax(-1)[start - 1 : -1]  # predicts ids[start:]
        stored_ids, stored = torch.tensor(row["topk_ids"]), torch.tensor(row["topk_logprobs"])
        assert stored_ids.shape == (row["num_generated"], 4)
        torch.testing.assert_close(stored, logprobs.gather(-1, stored_ids), atol=1e-4, rtol=0)
        torch.testing.assert_close(stored, logprobs.topk(4, dim=-1).values, atol=1e-4, rtol=0)


class Interrupt(RuntimeError):
    pass


def test_interrupted_sampling_resumes_to_the_uninterrupted_rows(tmp_path, teacher_lm, monkeypatch):
    tok = make_tokenizer("llama")
    kw = {"num_samples": 10, "store_topk": 2}
    whole = rows(sample_teacher(teacher_lm, tok, lm_config(tmp_path, "whole", **kw)))
    real, calls = sampling.sample_batch, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # second batch of the second shard
            raise Interrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample_batch", failing)
    config = lm_config(tmp_path, "cut", **kw)
    with pytest.raises(Interrupt):
        sample_teacher(teacher_lm, tok, config)
    progress = read_json(tmp_path / "cut" / "progress.json")
    assert [s["rows"] for s in progress["shards"]] == [4] and not progress["complete"]
    assert sorted(n for n in os.listdir(tmp_path / "cut") if n.startswith("shard-")) == ["shard-00000.jsonl"]
    monkeypatch.setattr(sampling, "sample_batch", real)
    resumed = rows(sample_teacher(teacher_lm, tok, config))
    assert resumed == whole
    assert [r["sample_index"] for r in resumed] == list(range(10))
    monkeypatch.setattr(sampling, "sample_batch", failing)  # a finished run generates nothing more
    assert rows(sample_teacher(teacher_lm, tok, config)) == whole


def test_provenance_and_refused_resume(tmp_path, teacher_lm):
    tok = make_tokenizer("llama")
    teacher_lm.config._name_or_path, teacher_lm.config._commit_hash = "tiny/teacher", "abc123"
    sample_teacher(teacher_lm, tok, lm_config(tmp_path, num_samples=4))
    record = read_json(tmp_path / "run" / "provenance.json")
    for key in (
        "method",
        "teacher",
        "generator_kind",
        "config",
        "generation",
        "seed",
        "budgets",
        "filter_stats",
    ):
        assert key in record, key
    assert record["teacher"]["name_or_path"] == "tiny/teacher" and record["teacher"]["revision"] == "abc123"
    assert record["num_rows"] == 4 and record["budgets"] == {"num_samples": 4, "max_total_tokens": None}
    assert {"llmkd_version", "created_at", "versions"} <= set(record)
    assert record["generation"]["eos_token_ids"] == [EOS]

    with pytest.raises(ValueError) as err:
        sample_teacher(teacher_lm, tok, lm_config(tmp_path, num_samples=4, temperature=0.5, top_k=3))
    assert "temperature: saved 1.0, now 0.5" in str(err.value) and "top_k: saved 0, now 3" in str(err.value)
    teacher_lm.config._name_or_path = "other/teacher"
    with pytest.raises(ValueError, match="teacher.name_or_path: saved 'tiny/teacher', now 'other/teacher'"):
        sample_teacher(teacher_lm, tok, lm_config(tmp_path, num_samples=4))
    teacher_lm.config._name_or_path = "tiny/teacher"
    assert len(sample_teacher(teacher_lm, tok, lm_config(tmp_path, num_samples=4, progress_bar=True))) == 4
