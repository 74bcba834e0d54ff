"""A tiny distillation that checkpoints every 2 of 6 steps, for tests/test_checkpoint_faults.py.

Run as `python tests/checkpoint_fault_worker.py RUN_DIR MODE DUMP_DIR` (output_dir: RUN_DIR/out):
- `whole`: 6 steps in one go;
- `torn`: while saving checkpoint-4, writes half of optimizer.safetensors (as a non-atomic writer killed mid-file
  leaves it), touches DUMP_DIR/blocked and sleeps until the test kills it (SIGKILL);
- `unmarked`: while saving checkpoint-4, every file is written but the completion marker; touches and sleeps;
- `resume`: `resume_from_checkpoint: true`, as a user restarts the killed command.
Each finishing mode writes DUMP_DIR/final.safetensors (student and projector weights) and DUMP_DIR/info.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import (  # noqa: E402
    BertForSequenceClassification,
    bert_config,
    classification_dataset,
    make_tokenizer,
    seeded,
    training_settings,
)
from safetensors.torch import save, save_file  # noqa: E402

import llmkd.publish.trainer as publishing  # noqa: E402
from llmkd import DistillationConfig, DistillationTrainer  # noqa: E402

BLOCK_STEP = 4


def block(out_dir: str) -> None:
    with open(os.path.join(out_dir, "blocked"), "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(600)  # the test sends SIGKILL long before


def install_fault(mode: str, out_dir: str, trainer) -> None:
    if mode == "torn":
        save_state = publishing.save_state

        def torn(state, folder, name):
            if name == "optimizer" and trainer.state.global_step == BLOCK_STEP:
                blob = save({k: v for k, v in _tensors(state).items()})
                with open(os.path.join(folder, f"{name}.safetensors"), "wb") as handle:
                    handle.write(blob[: len(blob) // 2])
                block(out_dir)
            save_state(state, folder, name)

        publishing.save_state = torn
    elif mode == "unmarked":
        mark_complete = publishing.mark_complete

        def unmarked(folder, step):
            if step == BLOCK_STEP:
                block(out_dir)
            mark_complete(folder, step)

        publishing.mark_complete = unmarked


def _tensors(state) -> dict:
    return {f"{i}.{k}": v.contiguous() for i, s in state["state"].items() for k, v in s.items()}


def main(run_dir: str, mode: str, out_dir: str) -> None:
    teacher = seeded(BertForSequenceClassification, bert_config(), 0)
    student = seeded(BertForSequenceClassification, bert_config(layers=2, hidden=16), 1)
    settings = training_settings(
        Path(run_dir), max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=1
    )
    terms = [{"knowledge": "logits", "loss": "forward_kl"}, {"knowledge": "hidden", "loss": "mse"}]
    args = DistillationConfig(**settings | {"learning_rate": 1e-3}, terms=terms)
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=classification_dataset(48),
        processing_class=make_tokenizer(),
    )
    install_fault(mode, out_dir, trainer)
    loaded, load = [], trainer._load_from_checkpoint  # what the trainer really reads, not what we expect

    def recorded(path, model=None):
        loaded.append(os.path.basename(path))
        return load(path, model)

    trainer._load_from_checkpoint = recorded
    trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
    weights = {f"student.{k}": v for k, v in trainer.student.state_dict().items()}
    weights |= {f"aux.{k}": v for k, v in trainer.auxiliary_modules.state_dict().items()}
    save_file({k: v.clone() for k, v in weights.items()}, os.path.join(out_dir, "final.safetensors"))
    info = {"loaded": loaded, "step": trainer.state.global_step}
    with open(os.path.join(out_dir, "info.json"), "w") as handle:
        json.dump(info, handle)


if __name__ == "__main__":
    os.makedirs(sys.argv[3], exist_ok=True)
    main(*sys.argv[1:4])
