"""Trains the tiny Llama pair for 2 steps (one log), evaluates 7 rows, and writes the logged numbers as JSON.

Run in one process by tests/test_metrics_global.py, and as `torchrun --standalone --nproc_per_node 2
tests/metrics_worker.py OUT_DIR` for the 2-process run (same global batch: 2 per device × 2 processes).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from conftest import LlamaForCausalLM, llama_config, lm_dataset, make_tokenizer, seeded  # noqa: E402

from llmkd import DistillationConfig, DistillationTrainer  # noqa: E402

TERMS = [{"knowledge": "logits", "loss": "forward_kl"}, {"knowledge": "hidden", "loss": "mse"}]


def run(out_dir: str, per_device: int) -> dict:
    tok = make_tokenizer("llama")
    args = DistillationConfig(
        output_dir=out_dir, per_device_train_batch_size=per_device, per_device_eval_batch_size=2, max_steps=2,
        logging_steps=2, learning_rate=0.05, optim="sgd", save_strategy="no", report_to="none", seed=0,
        disable_tqdm=True, use_cpu=True, terms=TERMS, hard_label_weight=0.5, train_sampling_strategy="sequential",
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=seeded(LlamaForCausalLM, llama_config(layers=2, hidden=16), 1),
        teacher=seeded(LlamaForCausalLM, llama_config(), 0),
        args=args, train_dataset=lm_dataset(8, seed=3), eval_dataset=lm_dataset(7, seed=11),
        processing_class=tok, teacher_processing_class=tok,
    )  # fmt: skip
    trainer.train()
    train = next(h for h in trainer.state.log_history if "loss" in h)
    result = {"world_size": trainer.args.world_size, "train": train, "eval": trainer.evaluate()}
    if trainer.is_world_process_zero():
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "metrics.json"), "w") as handle:
            json.dump(result, handle)
    return result


if __name__ == "__main__":
    run(sys.argv[1], per_device=2)
    # Leave together: a rank exiting while its peer still talks to gloo can abort the peer (SIGABRT).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
