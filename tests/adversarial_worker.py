"""Trains the tiny Llama pair with an adversarial term for two optimizer steps and dumps the student, the
discriminator and its Adam state.

Run in one process by tests/test_adversarial.py, and as
`torchrun --standalone --nproc_per_node 2 tests/adversarial_worker.py OUT_DIR` for the 2-process comparison: both
see the same 8 examples in each optimizer step (one process: 4 × 2 accumulated; two: 2 × 2 each).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import (
    LlamaForCausalLM,
    dump_run,
    leave_together,
    llama_config,
    lm_dataset,
    make_tokenizer,
    seeded,
    two_step_settings,
)
from transformers import DataCollatorForLanguageModeling  # noqa: E402

from llmkd import DistillationConfig, DistillationTrainer  # noqa: E402

TERMS = [
    {"knowledge": "logits", "loss": "forward_kl"},
    {"knowledge": "adversarial", "loss": "nonsaturating", "weight": 0.5, "discriminator_lr": 0.05},
]


def train_and_dump(out_dir: str, per_device_batch: int, accumulation: int) -> DistillationTrainer:
    teacher = seeded(LlamaForCausalLM, llama_config(), 0)
    student = seeded(LlamaForCausalLM, llama_config(layers=2, hidden=16), 1)
    tok = make_tokenizer("llama")
    args = DistillationConfig(
        **two_step_settings(out_dir, per_device_batch, accumulation),
        terms=TERMS,
        hard_label_weight=0.0,
        temperature=1.0,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=lm_dataset(8, seed=3),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
    )
    trainer.train()
    adam = trainer.own_optimizers.optimizers["1"].state_dict()["state"]
    files = {
        "student.safetensors": {
            k: v for k, v in student.state_dict().items() if not k.startswith("llmkd_aux.")
        },
        "discriminator.safetensors": dict(trainer.auxiliary_modules.state_dict()),
        "discriminator_adam.safetensors": {
            f"{i}.{k}": v.reshape(-1).float() for i, s in adam.items() for k, v in s.items()
        },
    }
    dump_run(trainer, out_dir, files)
    return trainer


if __name__ == "__main__":
    train_and_dump(sys.argv[1], per_device_batch=2, accumulation=2)
    leave_together()
