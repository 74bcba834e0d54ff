"""Trains two tiny Llama peers by deep mutual learning for two steps and dumps every peer's weights.

Run in one process by tests/test_mutual.py, and as `torchrun --standalone --nproc_per_node 2 tests/mutual_worker.py
OUT_DIR` for the 2-process comparison: each optimizer step covers the same 8 examples either way.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from conftest import LlamaForCausalLM, llama_config, lm_dataset, make_tokenizer, seeded  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import DataCollatorForLanguageModeling  # noqa: E402

from llmkd.schemes.mutual import MutualConfig, MutualTrainer  # noqa: E402

SEEDS = (1, 2)


def peers() -> list:
    return [seeded(LlamaForCausalLM, llama_config(layers=2, hidden=16), s) for s in SEEDS]


def train_and_dump(out_dir: str, per_device_batch: int, accumulation: int) -> MutualTrainer:
    tok = make_tokenizer("llama")
    args = MutualConfig(
        output_dir=out_dir,
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=accumulation,
        max_steps=2,
        learning_rate=0.1,
        optim="sgd",  # linear in the gradient: Adam would blow float noise in ~0 gradients up to lr-sized steps
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        use_cpu=True,
        temperature=2.0,
        hard_label_weight=0.5,
        logging_steps=1,
    )
    trainer = MutualTrainer(
        model=peers(),
        args=args,
        train_dataset=lm_dataset(16, seed=3),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
    )
    trainer.train()
    if trainer.is_world_process_zero():
        os.makedirs(out_dir, exist_ok=True)
        weights = {
            f"peer{k}.{name}": tensor.contiguous()
            for k, peer in enumerate(trainer.peers)
            for name, tensor in peer.state_dict().items()
        }
        save_file(weights, f"{out_dir}/peers.safetensors")
        with open(f"{out_dir}/world_size.txt", "w") as handle:
            handle.write(str(trainer.args.world_size))
    return trainer


if __name__ == "__main__":
    train_and_dump(sys.argv[1], per_device_batch=2, accumulation=2)
    # Leave together: a rank exiting while its peer still talks to gloo can abort the peer (SIGABRT).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
