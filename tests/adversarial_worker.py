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

import torch  # noqa: E402
from conftest import LlamaForCausalLM, llama_config, lm_dataset, make_tokenizer, seeded  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
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
        output_dir=out_dir,
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=accumulation,
        max_steps=2,
        learning_rate=0.1,
        optim="sgd",  # linear in the gradient (the student's); D keeps its Adam
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        use_cpu=True,
        terms=TERMS,
        hard_label_weight=0.0,
        logging_steps=1,
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
    if trainer.is_world_process_zero():
        os.makedirs(out_dir, exist_ok=True)
        student_state = {k: v for k, v in student.state_dict().items() if not k.startswith("llmkd_aux.")}
        save_file({k: v.contiguous() for k, v in student_state.items()}, f"{out_dir}/student.safetensors")
        save_file(dict(trainer.auxiliary_modules.state_dict()), f"{out_dir}/discriminator.safetensors")
        adam = trainer.own_optimizers.optimizers["1"].state_dict()["state"]
        save_file(
            {f"{i}.{k}": v.reshape(-1).float() for i, s in adam.items() for k, v in s.items()},
            f"{out_dir}/discriminator_adam.safetensors",
        )
        with open(f"{out_dir}/world_size.txt", "w") as handle:
            handle.write(str(trainer.args.world_size))
    return trainer


if __name__ == "__main__":
    train_and_dump(sys.argv[1], per_device_batch=2, accumulation=2)
    # Leave together: a rank exiting while its peer still talks to gloo can abort the peer (SIGABRT).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
