"""Trains a tiny Llama student against its own mean teacher for two steps and dumps the teacher's weights.

Run in one process by tests/test_mean_teacher.py, and as
`torchrun --standalone --nproc_per_node 2 tests/ema_worker.py OUT_DIR` for the 2-process comparison: both see
every one of the 8 examples in each optimizer step, and each rank writes its own teacher (they must be equal).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import (
    LlamaForCausalLM,
    leave_together,
    llama_config,
    lm_dataset,
    make_tokenizer,
    seeded,
    two_step_settings,
)
from safetensors.torch import save_file  # noqa: E402
from transformers import DataCollatorForLanguageModeling  # noqa: E402

from llmkd import DistillationConfig, DistillationTrainer  # noqa: E402
from llmkd.teachers import MeanTeacher  # noqa: E402
from llmkd.teachers.ema import teacher_tensors  # noqa: E402


def train_mean_teacher(out_dir: str, per_device_batch: int, accumulation: int) -> DistillationTrainer:
    student = seeded(LlamaForCausalLM, llama_config(layers=2, hidden=16), 1)
    tok = make_tokenizer("llama")
    args = DistillationConfig(
        **two_step_settings(out_dir, per_device_batch, accumulation),
        terms=[{"knowledge": "logits", "loss": "forward_kl"}],
        hard_label_weight=0.5,  # the task loss moves the student at step 1, where it still equals its teacher
    )
    trainer = DistillationTrainer(
        model=student,
        teacher=MeanTeacher(student, decay=0.5),
        args=args,
        train_dataset=lm_dataset(8, seed=3),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
    )
    trainer.train()
    os.makedirs(out_dir, exist_ok=True)
    teacher = {k: v.detach().cpu().contiguous() for k, v in teacher_tensors(trainer.teacher).items()}
    save_file(teacher, os.path.join(out_dir, f"teacher-rank{trainer.args.process_index}.safetensors"))
    return trainer


if __name__ == "__main__":
    trainer = train_mean_teacher(sys.argv[1], per_device_batch=2, accumulation=2)
    assert trainer.args.world_size == 2, trainer.args.world_size  # two processes really ran
    leave_together()
