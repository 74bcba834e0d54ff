"""`make demo-data-free` in smoke mode, the NYT held-out text parser, and the perplexity used by its bars."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification, LlamaForCausalLM

from benchmarks.bench_generation import benchmark_generation, perplexity
from llmkd.data.assets import nyt
from llmkd.data.assets.vader import INNER_ARCHIVE_MEMBER, SDIST_NAME
from tests.conftest import bert_config, llama_config, make_tokenizer, seeded, sentences

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ NYT snippets


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def fake_sdist(folder: Path, lines: list[str]) -> tuple[Path, str]:
    """A vaderSentiment sdist with the real nested layout holding `lines` as the NYT file (CRLF, no final EOL)."""
    data = "\r\n".join(lines).encode("utf-8")
    inner = _tar_gz({nyt.NYT_MEMBER: data, "hutto_ICWSM_2014/_README_.txt": b"readme"})
    path = folder / SDIST_NAME
    path.write_bytes(_tar_gz({"vaderSentiment-3.3.2/setup.py": b"", INNER_ARCHIVE_MEMBER: inner}))
    return path, hashlib.sha256(data).hexdigest()


LINES = [
    "1_1\t0.4\tOn Dec. 19, around noon, the games begin.",
    "1_2\t-1.15\tAccording to ''Moore,'' Santa was no athlete.",
    "7_2\t0.15\tThey sound a needed alarm.",  # out of order on purpose: articles join in sentence order
    "7_1\t0.65\tThe trustees write.",
]


def test_nyt_parser_reads_rows_and_joins_articles(tmp_path):
    path, sha = fake_sdist(tmp_path, LINES)
    rows = nyt.read_nyt_snippets(path, expected_sha256=sha)
    assert [r["id"] for r in rows] == ["1_1", "1_2", "7_2", "7_1"]
    assert rows[1] == {
        "id": "1_2",
        "article": 1,
        "sentence": 2,
        "text": "According to ''Moore,'' Santa was no athlete.",
        "score": -1.15,
    }
    assert nyt.nyt_articles(rows) == [
        "On Dec. 19, around noon, the games begin. According to ''Moore,'' Santa was no athlete.",
        "The trustees write. They sound a needed alarm.",
    ]
    assert nyt.nyt_articles(rows, max_articles=1) == nyt.nyt_articles(rows)[:1]


def test_nyt_checksum_mismatch_is_refused(tmp_path):
    """Negative control: the pinned checksum (of the real file) does not match the fake one."""
    path, sha = fake_sdist(tmp_path, LINES)
    with pytest.raises(ValueError, match=f"sha256 mismatch.*expected {nyt.NYT_SHA256}, found {sha}"):
        nyt.read_nyt_snippets(path)
    bad, bad_sha = fake_sdist(tmp_path, [*LINES, "8\t0.1\tno sentence number"])
    with pytest.raises(ValueError, match="line 5"):
        nyt.read_nyt_snippets(bad, expected_sha256=bad_sha)


# -------------------------------------------------------------------------------------- perplexity


def reference_perplexity(model, tokenizer, texts) -> float:
    """Independent path: one unpadded text at a time, float64 copy, the model's own mean loss × targets."""
    model64 = copy.deepcopy(model).double().eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            loss = model64(input_ids=ids, labels=ids).loss  # HF shifts labels itself
            total += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(total / count)


def test_perplexity_matches_an_unpadded_float64_reference():
    model = seeded(LlamaForCausalLM, llama_config(), 0)
    tokenizer = make_tokenizer("llama")
    texts = sentences(7, seed=3, min_len=2, max_len=20)  # lengths differ: batches are padded
    expected = reference_perplexity(model, tokenizer, texts)
    for batch_size in (1, 3, 7):
        result = perplexity(model, tokenizer, texts, batch_size=batch_size)
        assert result["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert result["tokens"] == sum(len(tokenizer(t)["input_ids"]) - 1 for t in texts)
    # Negative control: scoring the padding too (what an unmasked loss does) gives a different number.
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        unmasked = math.exp(float(model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss))
    assert abs(unmasked - expected) / expected > 1e-2


def test_generation_benchmark_counts_the_same_tokens_on_both_sides():
    model = seeded(LlamaForCausalLM, llama_config(), 0)
    result = benchmark_generation(
        model, make_tokenizer("llama"), batch_size=4, new_tokens=5, baseline_sequences=2
    )
    assert result["batched_sampler"]["tokens"] == 4 * 5 and result["generate_batch1"]["tokens"] == 2 * 5
    ratio = result["batched_sampler"]["tokens_per_s"] / result["generate_batch1"]["tokens_per_s"]
    assert result["speedup"] == pytest.approx(ratio)


# ------------------------------------------------------------------------------------- the demo


@pytest.fixture
def tiny_inputs(tmp_path):
    """A tiny BERT base model, a tiny Llama 'SmolLM2', SST-2-format files and a held-out text file."""
    seeded(BertForSequenceClassification, bert_config(layers=4), 0).save_pretrained(tmp_path / "base")
    make_tokenizer("bert").save_pretrained(tmp_path / "base")
    seeded(LlamaForCausalLM, llama_config(layers=6), 0).save_pretrained(tmp_path / "lm")
    make_tokenizer("llama").save_pretrained(tmp_path / "lm")
    for split, n in (("train", 40), ("validation", 16)):
        rows = [{"sentence": s, "label": int("w1" in s)} for s in sentences(n, seed=n)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "heldout.txt").write_text("\n".join(sentences(6, seed=9)))
    return tmp_path


def test_demo_data_free_smoke_end_to_end_and_resume(tiny_inputs, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "recipes" / "demo_data_free.py"), "--smoke", "--out", str(out)]
    cmd += ["--demo-dir", str(tmp_path / "glue"), "--base-model", str(tiny_inputs / "base")]
    cmd += ["--data-dir", str(tiny_inputs), "--generator", str(tiny_inputs / "lm")]
    cmd += ["--heldout-file", str(tiny_inputs / "heldout.txt")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "## Bars" in done.stdout and "student, synthetic only" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "report.md").read_text().startswith("# llmkd data-free distillation demo")
    # The synthetic set is what the student saw: its rows, labelled by the teacher, exported for training.
    exported = (out / "synthetic-reviews" / "train.jsonl").read_text().splitlines()
    assert len(exported) == summary["sentiment"]["synthetic_data"]["rows"] > 0
    assert set(summary["sentiment"]["models"]) == {
        "teacher",
        "student, real data",
        "student, synthetic only",
        "student, untrained",
    }
    ppl = summary["causal"]["perplexity"]
    assert all(math.isfinite(p["perplexity"]) and p["tokens"] > 0 for p in ppl.values())
    assert summary["causal"]["bar"]["met"] == (
        ppl["student, logit KD"]["perplexity"] < ppl["student, sequence-level (CE)"]["perplexity"]
    )
    # The two causal students differ (different losses) but start from the same saved student.
    assert ppl["student, logit KD"]["perplexity"] != ppl["student, sequence-level (CE)"]["perplexity"]
    assert summary["generation"]["batched_sampler"]["tokens"] == 4 * 4
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("is done, reusing it") == 10  # nothing regenerated, retrained or re-evaluated
