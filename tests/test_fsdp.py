"""FSDP2 (`fully_shard`) on 2 CPU processes (gloo): the student, its auxiliary projector and (by default) the
teacher sharded, compared with one process and with DDP; the final folder is a plain checkpoint; resume works."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from conftest import LlamaForCausalLM, run_launcher
from ddp_worker import train_and_dump
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(out, placement: str, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [os.path.join(ROOT, "tests", "fsdp_worker.py"), str(out), placement, *extra]
    done = run_launcher(cmd, clean=[out], env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "facts.json").read_text())


@pytest.mark.multiprocess
@pytest.mark.parametrize("placement", ["auto", "replicate"])
def test_fsdp2_matches_one_process_and_ddp(tmp_path, placement):
    single = tmp_path / "single"
    train_and_dump(str(single), per_device_batch=4, accumulation=2, mode="mixed")  # the DDP test's reference
    facts = launch(tmp_path / "fsdp", placement, *(["resume"] if placement == "auto" else []))
    assert facts["world_size"] == 2 and facts["distributed_type"].endswith("FSDP")
    assert facts["student_sharded"] and facts["aux_sharded"]  # the projector is sharded with the student
    assert facts["teacher_sharded"] is (placement == "auto")
    one, two = load_file(single / "student.safetensors"), load_file(tmp_path / "fsdp" / "student.safetensors")
    assert set(one) == set(two) and any(k.startswith("llmkd_aux.") for k in two)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    final = tmp_path / "fsdp" / "final"
    _, info = LlamaForCausalLM.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # a plain student: no projector inside
    if placement == "auto":
        assert facts["resume_gap"] == 0.0  # 2 + 2 resumed steps == 4 steps in one go (AdamW)
