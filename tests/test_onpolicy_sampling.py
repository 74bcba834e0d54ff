"""On-policy distillation (GKD): where completions come from. lmbda=0 trains on the dataset's completions,
sampled ones are exactly what an independent sampler draws from the student (or the teacher with seq_kd), and the
on-policy choice is the same on every rank, reproducible and unchanged by a resume. Shares its models, data and
settings with test_onpolicy.py."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from conftest import make_tokenizer
from test_onpolicy import (
    EOS,
    PAD,
    make,
    max_gap,
    models,
    prompt_completion_data,
    reference_samples,
    settings,
    weights,
)

from llmkd import DistillationConfig, DistillationTrainer
from llmkd.data.collate import DistillationCollator
from llmkd.schemes.on_policy import (
    OnPolicyTrainer,
    completion_source,
    example_seeds,
    prompts_of,
    with_completions,
)


class Recording(OnPolicyTrainer):
    """Keeps every batch the loss sees (training only)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.seen = [*getattr(self, "seen", []), {k: v.clone() for k, v in inputs.items()}]
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def ends_at_eos_or_length(completion: list[int], max_new_tokens: int) -> bool:
    if EOS in completion:
        return completion.index(EOS) == len(completion) - 1  # nothing after the first EOS
    return len(completion) == max_new_tokens


# ---- where completions come from ----------------------------------------------------------------


def test_lambda_zero_is_supervised_jsd_on_the_dataset_completions(tmp_path):
    on_policy = make(tmp_path / "a", lmbda=0.0, max_steps=3)
    on_policy.train()
    teacher, student = models()
    start = weights(student)
    values = {k: v for k, v in settings(tmp_path / "b", max_steps=3).items() if k != "max_new_tokens"}
    plain = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=DistillationConfig(**values),
        train_dataset=prompt_completion_data(),
        data_collator=DistillationCollator(make_tokenizer("llama"), causal_lm=True),
    )
    plain.train()
    assert max_gap(weights(on_policy.model), weights(student)) < 1e-6
    assert max_gap(weights(student), start) > 1e-4  # the three steps did move the student
    sampled = make(tmp_path / "c", lmbda=1.0, max_steps=3)
    sampled.train()
    assert (
        max_gap(weights(sampled.model), weights(student)) > 1e-4
    )  # control: on-policy data moves it elsewhere


@pytest.mark.parametrize("seq_kd", [False, True])
def test_sampled_completions_are_the_samplers_and_stop_at_eos(tmp_path, seq_kd):
    """lmbda=1: the loss sees the student's samples; lmbda=0 with seq_kd: the teacher's."""
    data = prompt_completion_data(16, seed=3)
    trainer = make(
        tmp_path,
        data=data,
        trainer_cls=Recording,
        lmbda=0.0 if seq_kd else 1.0,
        seq_kd=seq_kd,
        per_device_train_batch_size=16,
        max_steps=1,
    )
    pair = {"teacher": copy.deepcopy(trainer.teacher), "student": copy.deepcopy(trainer.model)}
    trainer.train()
    source = "teacher" if seq_kd else "student"
    seen = trainer.seen[0]
    prompts = prompts_of(seen)
    seeds = example_seeds(prompts, source, 0, 0, Counter())
    expected = reference_samples(pair[source], prompts, seeds, max_new_tokens=6)
    assert torch.equal(seen["input_ids"], with_completions(prompts, expected, PAD, "cpu")["input_ids"])
    other = reference_samples(pair["student" if seq_kd else "teacher"], prompts, seeds, max_new_tokens=6)
    assert other != expected  # control: not the other model's samples
    completions = [row[row != -100].tolist() for row in seen["labels"]]
    assert completions == expected  # labels: exactly the completion tokens, prompt and padding masked
    assert all(ends_at_eos_or_length(c, 6) for c in completions)
    assert {len(c) == 6 for c in completions} == {True, False}  # some stopped at EOS, some at max_new_tokens
    dataset_completions = [[t for t in row if t != -100] for row in data["labels"]]
    assert not set(map(tuple, completions)) & set(map(tuple, dataset_completions))


def test_choice_is_identical_on_every_rank_and_reproducible(tmp_path):
    """Two 'ranks' with different data make the same choices; another seed makes others (control)."""
    runs = {}
    for name, data_seed, seed in (("rank0", 0, 0), ("rank1", 1, 0), ("again", 0, 0), ("seed1", 0, 1)):
        trainer = make(
            tmp_path / name,
            data=prompt_completion_data(8, seed=data_seed),
            lmbda=0.5,
            seed=seed,
            max_steps=4,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=2,
        )
        trainer.train()
        choices = [h["onpolicy/student_batches"] for h in trainer.state.log_history if "loss" in h]
        runs[name] = (choices, weights(trainer.model))
    assert runs["rank0"][0] == runs["rank1"][0] and len(set(runs["rank0"][0])) > 1
    assert runs["again"][0] == runs["rank0"][0] and max_gap(runs["again"][1], runs["rank0"][1]) == 0
    assert runs["seed1"][0] != runs["rank0"][0] and max_gap(runs["seed1"][1], runs["rank0"][1]) > 1e-4
    draws = [completion_source(0, s, i, 0.3, False) == "student" for s in range(500) for i in range(2)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.05  # lmbda is the on-policy probability


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Choices and samples are keyed by the global step, so a resumed run samples what the full one did."""
    common = dict(lmbda=0.5, max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=1)
    full = make(tmp_path / "full", gradient_accumulation_steps=2, **common)
    full.train()
    resumed = make(tmp_path / "resumed", gradient_accumulation_steps=2, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-2"))
    assert max_gap(weights(resumed.model), weights(full.model)) < 1e-6

    def late(trainer):
        logs = [h for h in trainer.state.log_history if h["step"] > 2 and "loss" in h]
        return [(h["loss"], h["onpolicy/student_batches"]) for h in logs]

    assert late(full) == late(resumed) and len(late(full)) == 2
    assert max(choice for _, choice in late(full)) > 0  # some micro-batches after the resume are sampled
