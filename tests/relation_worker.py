"""Trains the tiny Llama pair (a GQA teacher) for two steps on MiniLM relations + FSP + logits; dumps the weights.

Run in one process by tests/test_attention_relation.py, and as
`torchrun --standalone --nproc_per_node 2 tests/relation_worker.py OUT_DIR` for the 2-process comparison: both
see every one of the 8 examples in each optimizer step, and the student's forward hooks run inside DDP.
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
    {"knowledge": "attention_relation", "loss": "kl", "layer_map": [[0, 1], [1, 3]], "relation_heads": 4},
    {"knowledge": "flow", "loss": "fsp", "weight": 0.1},
]


def train_and_dump(out_dir: str, per_device_batch: int, accumulation: int) -> DistillationTrainer:
    teacher = seeded(LlamaForCausalLM, llama_config(), 0)  # 4 heads, 2 key/value heads, width 32
    student = seeded(LlamaForCausalLM, llama_config(layers=2, hidden=16, heads=2), 1)
    tok = make_tokenizer("llama")
    args = DistillationConfig(
        **two_step_settings(out_dir, per_device_batch, accumulation),
        terms=TERMS,
        hard_label_weight=0.0,
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
    plain = {k: v for k, v in student.state_dict().items() if not k.startswith("llmkd_aux")}
    projectors = dict(trainer.auxiliary_modules.state_dict())
    dump_run(trainer, out_dir, {"student.safetensors": plain, "projectors.safetensors": projectors})
    return trainer


if __name__ == "__main__":
    train_and_dump(sys.argv[1], per_device_batch=2, accumulation=2)
    leave_together()
