"""Tiny classifiers and exit trainers for tests/test_early_exit.py, and its 2-process worker.

`train_and_dump` trains exits on a tiny BERT classifier for two steps and dumps the model and exit weights.

Run in one process by tests/test_early_exit.py, and as `torchrun --standalone --nproc_per_node 2
tests/early_exit_worker.py OUT_DIR` for the 2-process comparison: both see every one of the 8 examples in each
optimizer step. Two runs per launch: the frozen backbone (only the exits train) and the whole model with the task
loss (Be Your Own Teacher), so DDP reduces the exits' gradients alone and together with the backbone's.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from conftest import (  # noqa: E402
    BertForSequenceClassification,
    bert_config,
    classification_dataset,
    llama_config,
    make_tokenizer,
    seeded,
    training_settings,
)
from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaForSequenceClassification  # noqa: E402

from llmkd.schemes import EarlyExitConfig, EarlyExitTrainer  # noqa: E402

MODES = {
    "frozen": {"exit_label_weight": 0.5},
    "whole": {"freeze_backbone": False, "hard_label_weight": 0.5, "exit_hint_weight": 0.3},
}


FAMILIES = {
    "bert": (BertForSequenceClassification, bert_config),
    "llama": (LlamaForSequenceClassification, llama_config),
}


def classifier(family="bert", labels=3, std=0.3):
    """A tiny 4-layer classifier (width 32), seeded; `std` spreads its initial logits."""
    build, config = FAMILIES[family]
    return seeded(build, config(num_labels=labels, initializer_range=std), 0).eval()


def make_trainer(
    model, tmp_path, family="bert", data=None, collator=None, trainer_cls=EarlyExitTrainer, **kw
):
    """An exit trainer (exits on layers 1 and 3) with the quiet, deterministic settings of the trainer tests."""
    args = EarlyExitConfig(**training_settings(tmp_path, **({"exit_layers": [1, 3]} | kw)))
    return trainer_cls(
        model=model, args=args, train_dataset=data if data is not None else classification_dataset(),
        data_collator=collator, processing_class=make_tokenizer(family),
    )  # fmt: skip


def train_and_dump(out_dir: str, per_device_batch: int, accumulation: int, mode: str) -> EarlyExitTrainer:
    student = classifier()
    args = EarlyExitConfig(
        output_dir=out_dir,
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=accumulation,
        max_steps=2,
        learning_rate=0.5,
        optim="sgd",  # linear in the gradient: Adam would blow float noise up to lr-sized steps
        save_strategy="no",
        report_to="none",
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        use_cpu=True,
        exit_layers=[1, 3],
        logging_steps=1,
        **MODES[mode],
    )
    trainer = EarlyExitTrainer(
        model=student,
        args=args,
        train_dataset=classification_dataset(8, seed=3),
        processing_class=make_tokenizer("bert"),
    )
    trainer.train()
    if trainer.is_world_process_zero():
        os.makedirs(out_dir, exist_ok=True)
        state = {k: v.contiguous() for k, v in student.state_dict().items() if "llmkd_aux" not in k}
        save_file(state, f"{out_dir}/model.safetensors")
        save_file(dict(trainer.auxiliary_modules.state_dict()), f"{out_dir}/exits.safetensors")
        with open(f"{out_dir}/world_size.txt", "w") as handle:
            handle.write(str(trainer.args.world_size))
    return trainer


if __name__ == "__main__":
    for name in MODES:
        train_and_dump(os.path.join(sys.argv[1], name), per_device_batch=2, accumulation=2, mode=name)
    # Leave together: a rank exiting while its peer still talks to gloo can abort the peer (SIGABRT).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
