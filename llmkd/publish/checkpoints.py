"""Checkpoints that are either complete or ignored, and output folders without pickles.

A transformers checkpoint is many files written one after the other (weights, optimizer, scheduler, RNG, trainer
state, llmkd's auxiliary modules). A run killed in the middle leaves a `checkpoint-N` folder with some of them, and
transformers' `get_last_checkpoint` picks the highest N whatever it holds. llmkd writes a marker last,
`llmkd_checkpoint.json`, listing every file of the folder with its size, after flushing them to disk; a folder is
complete when the marker is there and every listed file still has its size (a later partial delete, e.g. a
rotation killed half-way, is noticed too). Resuming with `resume_from_checkpoint: true` takes the last complete one.

`training_args.bin` (a pickle of the TrainingArguments) is replaced by `training_args.json`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile

from llmkd.atomic import write_json

logger = logging.getLogger(__name__)

MARKER = "llmkd_checkpoint.json"
ARGS_FILE = "training_args.json"
PICKLED_ARGS = "training_args.bin"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR-<global step>
RESUME_LAST = ("true", "last")


def save_training_args(args, folder: str) -> None:
    """The TrainingArguments as JSON (transformers' `to_json_string`: tokens masked) in place of the pickle."""
    write_json(os.path.join(folder, ARGS_FILE), json.loads(args.to_json_string()))
    pickled = os.path.join(folder, PICKLED_ARGS)
    if os.path.isfile(pickled):
        os.remove(pickled)


def _files(folder: str) -> dict[str, int]:
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != MARKER and not name.endswith(".tmp"):
                out[rel] = os.path.getsize(path)
    return dict(sorted(out.items()))


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(folder: str, step: int) -> None:
    """Flushes every file of `folder` to disk, then writes the marker (atomically): the folder is complete."""
    files = _files(folder)
    for rel in files:
        _fsync(os.path.join(folder, rel))
    for root, _, _ in os.walk(folder):
        _fsync(root, directory=True)
    write_json(os.path.join(folder, MARKER), {"global_step": step, "files": files})


def checkpoint_problem(folder: str) -> str | None:
    """None for a complete checkpoint, else why it is not (no marker, a file missing or of another size)."""
    path = os.path.join(folder, MARKER)
    if not os.path.isfile(path):
        return f"no {MARKER} (the save was interrupted, or another tool wrote it)"
    try:
        with open(path, encoding="utf-8") as handle:
            files = json.load(handle)["files"]
    except (OSError, ValueError, KeyError) as error:
        return f"unreadable {MARKER}: {error}"
    for rel, size in files.items():
        full = os.path.join(folder, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, {size} when the checkpoint was written"
    return None


def checkpoint_folders(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every `checkpoint-N` folder, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [
        (int(m.group(1)), os.path.join(output_dir, n))
        for n in os.listdir(output_dir)
        if (m := _CHECKPOINT.match(n))
    ]
    return sorted((step, path) for step, path in found if os.path.isdir(path))


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The highest-numbered complete checkpoint folder of a run, or None."""
    for _, path in reversed(checkpoint_folders(output_dir)):
        if checkpoint_problem(path) is None:
            return path
    return None


def wants_last(value) -> bool:
    """`resume_from_checkpoint: true` (or "last"): the last complete checkpoint of output_dir."""
    return value is True or (isinstance(value, str) and value.strip().lower() in RESUME_LAST)


def resolve_resume(value, output_dir: str, discard: bool = False):
    """The checkpoint to resume from: None, a path (checked), or the last complete one for `true`.

    With `discard`, incomplete folders newer than the chosen one (a killed save's leftovers, which transformers
    would take for the latest) are renamed `incomplete-checkpoint-N` (kept, in case another tool wrote them). Raises ValueError when `true` finds no complete checkpoint and
    FileNotFoundError for a path that does not exist.
    """
    if value is None or value is False:
        return None
    if not wants_last(value):
        path = os.fspath(value)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"resume_from_checkpoint {path!r} is not a folder; pass a checkpoint-N folder or true"
            )
        if not os.path.isfile(os.path.join(path, "trainer_state.json")):
            raise FileNotFoundError(
                f"resume_from_checkpoint {path!r} is not a checkpoint folder (no trainer_state.json); pass one of "
                "the run's checkpoint-N folders, or true for the last complete one"
            )
        problem = checkpoint_problem(path)
        if problem is not None and os.path.isfile(os.path.join(path, MARKER)):
            raise ValueError(
                f"checkpoint {path} is incomplete: {problem}; resume from an earlier one or pass true"
            )
        if problem is not None:
            logger.warning("resuming from %s, which llmkd did not mark complete: %s", path, problem)
        return path
    chosen = last_complete_checkpoint(output_dir)
    folders = checkpoint_folders(output_dir)
    if chosen is None:
        names = ", ".join(os.path.basename(p) for _, p in folders) or "none"
        raise ValueError(
            f"resume_from_checkpoint: true found no complete checkpoint in {output_dir} (checkpoint folders: {names}); "
            "pass the path of one to resume from it anyway, or drop resume_from_checkpoint to start over"
        )
    logger.info("resuming from %s, the last complete checkpoint of %s", chosen, output_dir)
    if discard:
        step = int(_CHECKPOINT.match(os.path.basename(chosen)).group(1))
        for later, path in folders:
            if later > step:
                aside = os.path.join(output_dir, f"incomplete-{os.path.basename(path)}")
                shutil.rmtree(aside, ignore_errors=True)  # an older leftover of the same step
                logger.warning("moving %s to %s: %s", path, aside, checkpoint_problem(path))
                os.replace(path, aside)
    return chosen


def discard_checkpoint(folder: str) -> None:
    """Before saving step N: an existing `checkpoint-N` is a killed save's leftover or (resumed from an earlier
    checkpoint) another trajectory's; it goes first, so that an old marker never vouches for half-new files."""
    if os.path.isdir(folder):
        shutil.rmtree(folder)


# ---- pickles, found by content ---------------------------------------------------------------------
def is_pickle(path: str) -> bool:
    """Whether a file is a pickle: a raw pickle stream (protocol 2-5 header) or a torch zip archive holding one
    (`torch.save`'s format since 1.6: a zip with `data.pkl`). Names are not trusted."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith(".pkl") for name in archive.namelist())
        except zipfile.BadZipFile:
            return False
    return False


def pickles_under(folder: str) -> list[str]:
    """Relative paths of the pickles anywhere under `folder` (checkpoints and export subfolders included)."""
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if is_pickle(path):
                found.append(os.path.relpath(path, folder))
    return sorted(found)
