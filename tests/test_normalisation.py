"""Gradient accumulation, resume and 2-process DDP must give the update of one big batch."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from conftest import (
    GLOO_ABORT,
    LlamaForCausalLM,
    classification_dataset,
    llama_config,
    lm_dataset,
    run_launcher,
    seeded,
)
from ddp_worker import train_and_dump
from safetensors.torch import load_file
from test_trainer import TERMS, make_trainer

from llmkd import DistillationTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PerBatchMeanTrainer(DistillationTrainer):
    """The classic bug, as a negative control: average each micro-batch, then divide by the accumulation steps."""

    loss_is_scaled_for_ga = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch=None)


def one_step_update(pair, batch, accumulation, tmp_path, trainer_cls=DistillationTrainer):
    teacher, student = (copy.deepcopy(m) for m in pair)
    start = copy.deepcopy(student.state_dict())
    trainer = make_trainer(
        teacher,
        student,
        "lm",
        tmp_path,
        [*TERMS["logits"], *TERMS["hidden"]],
        train=lm_dataset(8, seed=5),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        max_grad_norm=0.0,
        hard_label_weight=0.5,
        trainer_cls=trainer_cls,
    )
    trainer.train()
    return {k: v - start[k] for k, v in student.state_dict().items() if k in start}


def test_fused_logit_path_gives_the_plain_update(llama_pair, tmp_path):
    """Logit-only causal-LM terms run from hidden states + lm_head in chunks; the update must not change.

    In float64: the fused path's closed-form gradients and autograd's round differently in float32, and on an
    update this small (the updates of some tensors are mostly cancellation noise) that alone moves them 1e-4."""
    updates = {}
    for fused in (True, False):
        teacher, student = (copy.deepcopy(m).double() for m in llama_pair)
        start = copy.deepcopy(student.state_dict())
        trainer = make_trainer(
            teacher,
            student,
            "lm",
            tmp_path / str(fused),
            [{"knowledge": "logits", "loss": "jsd", "beta": 0.3}],
            train=lm_dataset(8, seed=5),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=4,
            max_steps=1,
            optim="sgd",
            learning_rate=0.5,
            max_grad_norm=0.0,
            fused_logits=fused,
            **({"logit_chunk_size": 5} if fused else {}),  # a chunk size without the fused path is refused
        )
        assert trainer.fused is fused
        trainer.train()
        updates[fused] = {k: v - start[k] for k, v in student.state_dict().items() if k in start}
    assert max(v.abs().max().item() for v in updates[True].values()) > 1e-4
    assert max_relative_gap(updates[False], updates[True]) < 1e-9


def max_relative_gap(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)).item() for k in a)


def test_accumulation_matches_one_big_batch_with_variable_lengths(llama_pair, tmp_path):
    full = one_step_update(llama_pair, 8, 1, tmp_path / "a")
    assert max(v.abs().max().item() for v in full.values()) > 1e-4  # the step did move the student
    for batch, accumulation in ((2, 4), (1, 8)):
        split = one_step_update(llama_pair, batch, accumulation, tmp_path / f"b{batch}")
        assert max_relative_gap(full, split) < 1e-4, (batch, accumulation)
    broken = one_step_update(llama_pair, 2, 4, tmp_path / "c", trainer_cls=PerBatchMeanTrainer)
    assert max_relative_gap(full, broken) > 1e-2  # the control: per-batch means weight short rows too much


def test_resume_reproduces_the_uninterrupted_run(bert_pair, tmp_path):
    teacher, student = bert_pair
    student_copy, teacher_copy = copy.deepcopy(student), copy.deepcopy(teacher)
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=4)
    full = make_trainer(teacher, student, "cls", tmp_path / "full", TERMS["tinybert"], **settings)
    full.train()
    assert len(full.auxiliary_modules) == 1  # widths 16 vs 32: the hidden term trains a projector
    resumed = make_trainer(
        teacher_copy, student_copy, "cls", tmp_path / "resumed", TERMS["tinybert"], **settings
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-2"))
    for name, tensor in student.state_dict().items():
        torch.testing.assert_close(student_copy.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    for name, tensor in full.auxiliary_modules.state_dict().items():
        torch.testing.assert_close(resumed.auxiliary_modules.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)
    late = [h for h in full.state.log_history if "loss" in h and h["step"] > 2]
    late_resumed = [h for h in resumed.state.log_history if "loss" in h and h["step"] > 2]
    assert [round(h["loss"], 5) for h in late] == [round(h["loss"], 5) for h in late_resumed]
    # control: without the projector file the resume is refused rather than silently re-initialised
    os.remove(tmp_path / "full" / "out" / "checkpoint-2" / "llmkd_aux.safetensors")
    again = make_trainer(
        copy.deepcopy(teacher_copy),
        copy.deepcopy(student_copy),
        "cls",
        tmp_path / "again",
        TERMS["tinybert"],
        train=classification_dataset(),
        **settings,
    )
    with pytest.raises(ValueError, match="llmkd_aux.safetensors is missing"):  # the completion marker's list
        again.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-2"))
    os.remove(
        tmp_path / "full" / "out" / "checkpoint-2" / "llmkd_checkpoint.json"
    )  # unmarked: the loader's check
    with pytest.raises(FileNotFoundError, match="auxiliary"):
        again.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-2"))


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["mixed", "fused"])
def test_two_process_ddp_matches_one_process(tmp_path, mode):
    single = tmp_path / "single"
    trainer = train_and_dump(str(single), per_device_batch=4, accumulation=2, mode=mode)
    assert trainer.fused is (mode == "fused")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        os.path.join(ROOT, "tests", "ddp_worker.py"),
        str(tmp_path / "ddp"),
        mode,
    ]
    done = run_launcher(cmd, clean=[tmp_path / "ddp"], env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ddp" / "world_size.txt").read_text() == "2"  # two processes really ran
    start = seeded(LlamaForCausalLM, llama_config(layers=2, hidden=16), 1).state_dict()  # the worker's init
    moved = load_file(single / "student.safetensors")
    assert max((moved[k] - start[k]).abs().max().item() for k in start) > 1e-3
    for name in ("student.safetensors", "projectors.safetensors"):
        one, two = load_file(single / name), load_file(tmp_path / "ddp" / name)
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=f"{name}:{key}")


def test_launches_are_rerun_only_after_a_gloo_abort(tmp_path):
    """run_launcher reruns once after gloo's std::terminate, and never after any other failure (the control)."""
    marker = tmp_path / "ran_once"
    script = (
        "import pathlib, sys; m = pathlib.Path(sys.argv[1]); first = not m.exists(); m.touch(); "
        "sys.stderr.write(sys.argv[2] if first else ''); sys.exit(1 if first else 0)"
    )
    done = run_launcher([sys.executable, "-c", script, str(marker), GLOO_ABORT], clean=[tmp_path / "x"])
    assert done.returncode == 0
    marker.unlink()
    done = run_launcher([sys.executable, "-c", script, str(marker), "Traceback: a real error"])
    assert done.returncode == 1 and "real error" in done.stderr
