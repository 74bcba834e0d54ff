"""Two optimizer steps of on-policy distillation (lmbda=0.5, 2 micro-batches per step); dumps the student.

`torchrun --standalone --nproc_per_node 2 tests/onpolicy_worker.py OUT_DIR`: each rank samples its own prompts'
completions and both must make the same on-policy choice per micro-batch; the test compares the result with
one process that sees all 8 examples per step (tests/test_onpolicy.py::test_two_process_ddp_matches_one_process).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_onpolicy import make, prompt_completion_data  # noqa: E402

DATA_SEED = 7  # eight distinct prompts, so per-prompt occurrence counts agree in any sharding


def train(out_dir: str, per_device_batch: int):
    trainer = make(
        Path(out_dir),
        data=prompt_completion_data(8, seed=DATA_SEED),
        lmbda=0.5,
        max_steps=2,
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=2,
    )
    trainer.train()
    return trainer


if __name__ == "__main__":
    trainer = train(sys.argv[1], per_device_batch=2)
    if trainer.is_world_process_zero():
        weights = {k: v.contiguous() for k, v in trainer.model.state_dict().items()}
        save_file(weights, os.path.join(sys.argv[1], "student.safetensors"))
        choices = [h["onpolicy/student_batches"] for h in trainer.state.log_history if "loss" in h]
        summary = {"world_size": trainer.args.world_size, "choices": choices}
        Path(sys.argv[1], "summary.json").write_text(json.dumps(summary))
    # Leave together: a rank exiting while its peer still talks to gloo can abort the peer (SIGABRT).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
