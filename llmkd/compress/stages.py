"""Resumable stages of `llmkd compress`, their clock and their training runs.

OUT/compress_state.json holds the settings the run was started with (a rerun with other settings in the same
folder is refused) and the seconds spent in earlier attempts, so that the budget counts the whole command, not
one attempt. A finished stage writes OUT/stages/NAME.json (atomically) and is never redone; a training run is
finished when its folder holds llmkd_report.json, resumes from its last complete checkpoint when it has one, and
is started again otherwise (the folder is the command's own: nothing of the user's is deleted).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import yaml

from llmkd.atomic import atomic_write, write_json

logger = logging.getLogger("llmkd.compress")
STATE = "compress_state.json"
REPORT = "llmkd_report.json"
# What a run trains or times: once one exists, the folder belongs to its settings.
TRAINED = ("teacher", "students", "search", "final", "student", "control-labels-only")


class Stages:
    """The stages' records, the budget clock and the progress lines (stage, what, elapsed, budget left)."""

    def __init__(self, out: str, key: dict, budget_seconds: float):
        self.out, self.budget = out, float(budget_seconds)
        if os.path.exists(out) and not os.path.isdir(out):
            raise ValueError(f"output_dir {out} is a file: pass a folder (new or of an earlier compress run)")
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, STATE)
        state = _read(path)
        if state is None and os.listdir(out):
            raise ValueError(f"{out} is not empty and holds no compress run: pass another --output_dir")
        if state is not None and state.get("key") != key:
            changed = sorted(k for k in key if state["key"].get(k) != key.get(k))
            if self._trained():
                verb = "differs" if len(changed) == 1 else "differ"
                raise ValueError(
                    f"{out} holds a compress run made with other settings ({', '.join(changed)} {verb}): rerun "
                    f"with the same settings to resume it, or pass another --output_dir"
                )
            # Stopped before any training (e.g. by a data error): the fix may change settings.
            self._restart(changed)
            state = None
        os.makedirs(os.path.join(out, "stages"), exist_ok=True)
        self.before = state["seconds"] if state else 0.0
        self.started = time.monotonic()
        self.key = key
        self._save()

    def _trained(self) -> bool:
        """Whether anything was trained or timed here (then other settings would mix two runs)."""
        return any(os.path.exists(os.path.join(self.out, name)) for name in TRAINED)

    def _restart(self, changed: list[str]) -> None:
        logger.info(
            "compress: %s changed before any training; starting %s again", ", ".join(changed), self.out
        )
        for name in ("stages", "data", "shapes"):
            shutil.rmtree(os.path.join(self.out, name), ignore_errors=True)

    def elapsed(self) -> float:
        """Seconds of this command so far, earlier attempts included."""
        return self.before + time.monotonic() - self.started

    def left(self) -> float:
        return self.budget - self.elapsed()

    def _save(self) -> None:
        write_json(os.path.join(self.out, STATE), {"key": self.key, "seconds": self.elapsed()})

    def run(self, name: str, make) -> dict:
        """The stage's record: read when it finished before, else `make()`'s, written atomically."""
        path = os.path.join(self.out, "stages", f"{name}.json")
        done = _read(path)
        if done is not None:
            logger.info("compress: stage %s finished before; reusing %s", name, path)
            return done
        self.say(name, "starting")
        start = self.elapsed()
        record = make() | {"seconds": None}
        # This attempt's seconds: a stage resumed after an interruption loses its earlier attempts' from here.
        record["seconds"] = self.elapsed() - start
        write_json(path, record)
        self._save()
        self.say(name, "done")
        return record

    def say(self, stage: str, what: str) -> None:
        self._save()
        minutes = self.elapsed() / 60
        left = self.left() / 60
        logger.info(
            "compress [%s] %s — %.1f min elapsed, %.1f of %.1f min budget left",
            stage, what, minutes, left, self.budget / 60,
        )  # fmt: skip

    def train(self, command: str, recipe: dict, name: str, resume_from: str | None = None) -> dict:
        """Runs `recipe` with `llmkd distill`/`finetune` (written to OUT/recipes/NAME.yaml); its report.
        `resume_from`: a checkpoint (of another folder) to continue from when the run's own folder has none."""
        from llmkd.cli import pipeline
        from llmkd.publish.checkpoints import last_complete_checkpoint

        folder = recipe["output_dir"]
        done = _read(os.path.join(folder, REPORT))
        if done is not None:
            return done
        flags = []
        if os.path.isdir(folder):
            if last_complete_checkpoint(folder):
                flags = ["--resume_from_checkpoint", "true"]
                self.say(name, f"resuming {folder} from its last complete checkpoint")
            else:
                shutil.rmtree(folder)  # killed before its first checkpoint: nothing to keep
        if not flags and resume_from:
            flags = ["--resume_from_checkpoint", resume_from]
        path = os.path.join(self.out, "recipes", f"{name}.yaml")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda handle: yaml.safe_dump(recipe, handle, sort_keys=False))
        report = getattr(pipeline, command)(path, flags)
        self._save()
        return report


def read_json(path: str) -> dict:
    """A finished run's JSON record; raises when it is missing (the caller knows it was written)."""
    record = _read(path)
    if record is None:
        raise FileNotFoundError(f"{path} is missing or unreadable: rerun the command to redo that step")
    return record


def _read(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None
