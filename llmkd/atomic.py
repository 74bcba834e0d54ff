"""Atomic file writes: a temporary file in the target's folder, flushed, then renamed over the target.

A crash or a full disk leaves the old file or no file, never half of one (readers, resumes and reports rely on it).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable


def atomic_write(path: str | os.PathLike, write: Callable, mode: str = "w") -> None:
    """Calls `write(handle)` on a temporary file, then renames it to `path`; text modes use UTF-8."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; outputs are meant to be shared
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_leftovers(folder: str | os.PathLike, also=lambda name: False) -> None:
    """Deletes the temporary files that writers killed mid-file left in `folder` (`atomic_write`'s `.NAME.XXXX.tmp`,
    and names `also(name)` accepts). Call it only when no process writes there any more."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if (name.startswith(".") or also(name)) and name.endswith(".tmp") and os.path.isfile(path):
            os.unlink(path)


def write_json(path: str | os.PathLike, payload) -> None:
    atomic_write(path, lambda handle: json.dump(payload, handle, indent=2, default=str))
