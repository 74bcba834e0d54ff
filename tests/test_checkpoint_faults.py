"""kill -9 in the middle of writing a checkpoint, then resume: the last complete checkpoint is used, nothing is
half-read, and the final weights equal an uninterrupted run's (tests/checkpoint_fault_worker.py runs the training).

Two moments: a torn optimizer file (a writer killed mid-file; transformers' weights and torch files are not
written atomically), and every file written but the completion marker. save_total_limit=1, so the kill also comes
after the moment stock transformers rotates the previous checkpoint away.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from llmkd.publish.checkpoints import MARKER, checkpoint_problem, last_complete_checkpoint, resolve_resume

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoint_fault_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_worker(run_dir, mode, dump_dir) -> dict:
    done = subprocess.run(
        [sys.executable, WORKER, str(run_dir), mode, str(dump_dir)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((dump_dir / "info.json").read_text()) | {
        "weights": load_file(dump_dir / "final.safetensors")
    }


def kill_while_saving(run_dir, mode, dump_dir) -> None:
    """Starts the worker, waits until it blocks inside the save of checkpoint-4, and SIGKILLs it."""
    process = subprocess.Popen(
        [sys.executable, WORKER, str(run_dir), mode, str(dump_dir)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not (dump_dir / "blocked").exists():
        if process.poll() is not None:
            pytest.fail(f"the worker ended before blocking: {process.stderr.read().decode()[-3000:]}")
        assert time.monotonic() < deadline, "the worker never reached checkpoint-4"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    done = run_worker(root / "run", "whole", root / "dump")
    assert done["loaded"] == [] and done["step"] == 6
    return done


@pytest.mark.parametrize("moment", ["torn", "unmarked"])
def test_sigkill_while_checkpointing_then_resume_equals_an_uninterrupted_run(moment, whole, tmp_path):
    out = tmp_path / "run" / "out"
    kill_while_saving(tmp_path / "run", moment, tmp_path / "killed")
    # What the kill left: checkpoint-2 complete (not rotated away), checkpoint-4 half-written and unmarked.
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4"]
    assert checkpoint_problem(out / "checkpoint-2") is None
    assert not (out / "checkpoint-4" / MARKER).exists()
    assert get_last_checkpoint(str(out)).endswith(
        "checkpoint-4"
    )  # transformers alone would pick the broken one
    assert last_complete_checkpoint(str(out)).endswith("checkpoint-2")
    if moment == "torn":  # the half file would not even load
        with pytest.raises(Exception, match="(?i)header|incomplete|deserializ|invalid"):
            load_file(out / "checkpoint-4" / "optimizer.safetensors")
    resumed = run_worker(tmp_path / "run", "resume", tmp_path / "resumed")
    assert resumed["loaded"] == ["checkpoint-2"] and resumed["step"] == 6
    # the torn checkpoint-4 is set aside (kept, never taken for the latest); rotation kept only checkpoint-6
    assert sorted(os.listdir(out)) == ["checkpoint-6", "incomplete-checkpoint-4"]
    assert checkpoint_problem(out / "checkpoint-6") is None
    assert resumed["weights"].keys() == whole["weights"].keys()
    for name, tensor in whole["weights"].items():
        assert torch.equal(resumed["weights"][name], tensor), name


def test_resume_refuses_a_run_without_a_complete_checkpoint(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"found no complete checkpoint in .*checkpoint-3"):
        resolve_resume(True, str(out))
    assert resolve_resume(None, str(out)) is None
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        resolve_resume(str(out / "checkpoint-9"), str(out))
