"""Trains two tiny Llama peers by deep mutual learning for two steps and dumps every peer's weights.

Run in one process by tests/test_mutual.py, and as `torchrun --standalone --nproc_per_node 2 tests/mutual_worker.py
OUT_DIR` for the 2-process comparison: each optimizer step covers the same 8 examples either way.
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

from llmkd.schemes.mutual import MutualConfig, MutualTrainer  # noqa: E402

SEEDS = (1, 2)


def peers() -> list:
    return [seeded(LlamaForCausalLM, llama_config(layers=2, hidden=16), s) for s in SEEDS]


def train_and_dump(out_dir: str, per_device_batch: int, accumulation: int) -> MutualTrainer:
    tok = make_tokenizer("llama")
    args = MutualConfig(
        **two_step_settings(out_dir, per_device_batch, accumulation),
        temperature=2.0,
        hard_label_weight=0.5,
    )
    trainer = MutualTrainer(
        model=peers(),
        args=args,
        train_dataset=lm_dataset(16, seed=3),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
    )
    trainer.train()
    weights = {
        f"peer{k}.{n}": t for k, peer in enumerate(trainer.peers) for n, t in peer.state_dict().items()
    }
    dump_run(trainer, out_dir, {"peers.safetensors": weights})
    return trainer


if __name__ == "__main__":
    train_and_dump(sys.argv[1], per_device_batch=2, accumulation=2)
    leave_together()
