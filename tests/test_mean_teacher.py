"""The mean teacher (Tarvainen & Valpola 2017): an EMA of the student, updated once per optimizer step.

References are written here in float64 from the paper's update θ_T ← d_t θ_T + (1 − d_t) θ_S over the student's
weights recorded after every optimizer step; controls show what a per-micro-batch update, a missing checkpoint
file and an unrestored average would give.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch
from conftest import (
    BertForSequenceClassification,
    LlamaForCausalLM,
    bert_config,
    classification_dataset,
    llama_config,
    run_launcher,
    seeded,
    training_settings,
)
from ema_worker import train_mean_teacher
from safetensors.torch import load_file
from test_born_again import make_tiny_demo
from test_padding import FAMILIES, assert_invariant, per_example, rows, tokenizer
from test_trainer import make_trainer
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    TrainerCallback,
)

from llmkd import DistillationConfig, DistillationTrainer
from llmkd.cli.pipeline import REPORT, distill
from llmkd.teachers import TEACHERS, MeanTeacher
from llmkd.teachers.ema import STATE_FILE, WEIGHTS_FILE, teacher_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "methods", "mean_teacher.yaml")
LOGITS = [{"knowledge": "logits", "loss": "forward_kl"}]


class Recorder(TrainerCallback):
    """The student's weights (float64) at the start and after every optimizer step / every micro-batch."""

    def __init__(self, student):
        self.student, self.steps, self.micro = student, [], []

    def weights(self):
        return {k: v.detach().double().clone() for k, v in teacher_tensors(self.student).items()}

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.weights()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(self.weights())
        self.micro.append(self.steps[-1])

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro.append(self.weights())


def reference_average(start: dict, students: list[dict], decay: float, warmup: bool) -> dict:
    """The paper's EMA, naively in float64: one update per entry of `students` (t = 1, 2, …)."""
    average = {k: v.clone() for k, v in start.items()}
    for t, student in enumerate(students, start=1):
        d = min(decay, 1 - 1 / (t + 1)) if warmup else decay
        for name, value in student.items():
            average[name] = d * average[name] + (1 - d) * value if value.is_floating_point() else value
    return average


def gap(teacher: dict, reference: dict) -> float:
    return max((teacher[k].double() - reference[k]).abs().max().item() for k in reference)


def mean_teacher_run(tmp_path, decay=0.6, warmup=False, batch=4, accumulation=1, **overrides):
    student = seeded(BertForSequenceClassification, bert_config(layers=2, hidden=16), 1)
    source = MeanTeacher(student, decay=decay, warmup=warmup)
    settings = dict(
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        optim="sgd",
        learning_rate=0.5,
    )
    trainer = make_trainer(
        source, student, "cls", tmp_path, LOGITS, train=classification_dataset(16), **(settings | overrides)
    )
    recorder = Recorder(student)
    trainer.add_callback(recorder)
    return trainer, recorder


@pytest.mark.parametrize("warmup", [False, True])
def test_average_matches_the_paper_after_each_step(tmp_path, warmup):
    trainer, rec = mean_teacher_run(tmp_path, warmup=warmup, max_steps=4)
    trainer.train()
    assert TEACHERS["ema"] is MeanTeacher and trainer.teacher is trainer.source.model
    teacher = teacher_tensors(trainer.teacher)
    assert len(rec.steps) == 4
    assert gap(teacher, reference_average(rec.start, rec.steps, 0.6, warmup)) < 1e-6
    assert gap(teacher, rec.steps[-1]) > 1e-3  # control: the teacher is not simply the last student
    assert gap(teacher, reference_average(rec.start, rec.steps, 0.6, not warmup)) > 1e-4  # the flag matters


def test_accumulation_updates_once_per_optimizer_step(tmp_path):
    """4 micro-batches of 2 per step = 1 batch of 8: the same students, the same average (2 updates, not 8)."""
    big, _ = mean_teacher_run(tmp_path / "big", batch=8, max_steps=2)
    big.train()
    split, rec = mean_teacher_run(tmp_path / "split", batch=2, accumulation=4, max_steps=2)
    split.train()
    assert len(rec.steps) == 2 and len(rec.micro) == 8
    one, many = teacher_tensors(big.teacher), teacher_tensors(split.teacher)
    assert gap(many, {k: v.double() for k, v in one.items()}) < 1e-5
    assert gap(many, reference_average(rec.start, rec.steps, 0.6, False)) < 1e-6
    per_micro_batch = reference_average(rec.start, rec.micro, 0.6, False)
    assert (
        gap(many, per_micro_batch) > 1e-3
    )  # control: updating after every micro-batch gives another teacher


def test_the_teacher_is_a_frozen_copy_outside_the_student(tmp_path):
    trainer, _ = mean_teacher_run(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    teacher, student = trainer.teacher, trainer.model
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised and not optimised & {id(p) for p in teacher.parameters()}
    assert not {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
    trainer.save_model()
    out = tmp_path / "out"
    saved = load_file(out / "model.safetensors")
    plain = seeded(BertForSequenceClassification, bert_config(layers=2, hidden=16), 1).state_dict()
    assert set(saved) == set(plain)  # the student only: no teacher copy in the output folder
    _, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (out / "checkpoint-2" / WEIGHTS_FILE).is_file()
    assert json.loads((out / "checkpoint-2" / STATE_FILE).read_text())["step"] == 2
    average = AutoModelForSequenceClassification.from_pretrained(out / "mean-teacher").state_dict()
    assert all(torch.equal(average[k], v) for k, v in teacher.state_dict().items())  # the averaged model kept
    assert not all(torch.equal(average[k], v) for k, v in trainer.model.state_dict().items() if k in average)


def test_resume_restores_the_average_exactly(tmp_path):
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2)
    full, _ = mean_teacher_run(tmp_path / "full", **settings)
    full.train()
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    saved = load_file(checkpoint / WEIGHTS_FILE)
    student_then = load_file(checkpoint / "model.safetensors")
    # control: the saved average is not the checkpoint's student, so restarting it from the student is wrong
    assert max((saved[k] - student_then[k]).abs().max().item() for k in student_then) > 1e-3
    resumed, _ = mean_teacher_run(tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, tensor in teacher_tensors(full.teacher).items():
        torch.testing.assert_close(teacher_tensors(resumed.teacher)[name], tensor, rtol=1e-5, atol=1e-6)
    unrestored, _ = mean_teacher_run(tmp_path / "unrestored", **settings)
    unrestored.source.load = lambda folder, trainer: None  # control: resume without the average
    unrestored.train(resume_from_checkpoint=str(checkpoint))
    assert gap(teacher_tensors(unrestored.teacher), teacher_tensors(full.teacher)) > 1e-4


def test_resume_refuses_a_checkpoint_without_or_with_another_average(tmp_path):
    settings = dict(max_steps=2, save_strategy="steps", save_steps=1)
    full, _ = mean_teacher_run(tmp_path / "full", **settings)
    full.train()
    checkpoint = tmp_path / "full" / "out" / "checkpoint-1"
    meta = json.loads((checkpoint / STATE_FILE).read_text())
    os.remove(
        checkpoint / "llmkd_checkpoint.json"
    )  # edited by hand: the loader's own checks, not the marker's
    (checkpoint / STATE_FILE).write_text(json.dumps(meta | {"step": 2}))
    again, _ = mean_teacher_run(tmp_path / "again", **settings)
    with pytest.raises(ValueError, match="taken at step 2"):
        again.train(resume_from_checkpoint=str(checkpoint))
    os.remove(checkpoint / WEIGHTS_FILE)
    again, _ = mean_teacher_run(tmp_path / "again2", **settings)
    with pytest.raises(FileNotFoundError, match="no mean teacher"):
        again.train(resume_from_checkpoint=str(checkpoint))


@pytest.mark.parametrize("family", ["bert-cls", "llama-lm"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_gives_each_example_its_value_alone(family, side, tmp_path):
    build, kind, causal = FAMILIES[family]
    student = build(2, 16, 1)
    student.set_attn_implementation("eager")
    source = MeanTeacher(student)
    source.model.load_state_dict(build(2, 16, 7).state_dict())  # an average away from the student
    tok = tokenizer(kind, side, pad_is_eos=False)
    collator = DataCollatorForLanguageModeling(tok, mlm=False) if causal else DataCollatorWithPadding(tok)
    args = DistillationConfig(**_settings(tmp_path, hard_label_weight=0.0))
    trainer = DistillationTrainer(
        model=student, teacher=source, args=args, data_collator=collator, processing_class=tok
    )
    features = rows(kind, causal, tok)
    assert_invariant(trainer, features)
    assert per_example(trainer, features)["distill/logits_forward_kl"].min() > 1e-4  # a real teacher signal


def test_refusals_before_training(tmp_path):
    student = seeded(LlamaForCausalLM, llama_config(2, 16), 1)
    for decay in (1.0, -0.1, "0.9", True):
        with pytest.raises(ValueError, match="decay"):
            MeanTeacher(student, decay=decay)
    other = copy.deepcopy(student)
    args = DistillationConfig(**_settings(tmp_path, hard_label_weight=0.0))
    with pytest.raises(ValueError, match="another model"):
        DistillationTrainer(model=other, teacher=MeanTeacher(student), args=args)
    half = DistillationConfig(**_settings(tmp_path, hard_label_weight=0.0, teacher_dtype="bfloat16"))
    with pytest.raises(ValueError, match="half"):
        DistillationTrainer(model=student, teacher=MeanTeacher(student), args=half)
    trainer = DistillationTrainer(model=student, teacher=MeanTeacher(student), args=args)
    trainer.is_fsdp_enabled = True  # as under an FSDP accelerate config (sharded students: no full weights)
    with pytest.raises(ValueError, match="FSDP"):
        trainer.source.place(trainer)


@pytest.mark.multiprocess
def test_two_processes_give_the_average_of_one(tmp_path):
    single = tmp_path / "single"
    train_mean_teacher(str(single), per_device_batch=4, accumulation=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    worker = os.path.join(ROOT, "tests", "ema_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker]
    done = run_launcher([*cmd, str(tmp_path / "ddp")], clean=[tmp_path / "ddp"], env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = load_file(single / "teacher-rank0.safetensors")
    ranks = [load_file(tmp_path / "ddp" / f"teacher-rank{r}.safetensors") for r in (0, 1)]
    start = seeded(LlamaForCausalLM, llama_config(layers=2, hidden=16), 1).state_dict()
    assert max((one[k] - start[k]).abs().max().item() for k in start) > 1e-3  # the average moved
    for key in one:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0, msg=key)  # identical ranks
        torch.testing.assert_close(ranks[0][key], one[key], rtol=1e-5, atol=1e-6, msg=key)


def _settings(tmp_path, **overrides) -> dict:
    return training_settings(tmp_path, terms=LOGITS, **overrides)


def recipe_flags(tiny, out, **extra) -> list[str]:
    values = {
        "smoke": "true", "use_cpu": "true", "teacher": str(tiny / "big"), "output_dir": str(out),
        "train_file": str(tiny / "train.jsonl"), "validation_file": str(tiny / "validation.jsonl"),
    } | extra  # fmt: skip
    return [item for key, value in values.items() for item in (f"--{key}", value)]


def test_recipe_smoke(tmp_path):
    """recipes/methods/mean_teacher.yaml end to end on tiny local models: a plain student, the teacher noted."""
    tiny = make_tiny_demo(tmp_path / "tiny")
    out = tmp_path / "out"
    report = distill(RECIPE, recipe_flags(tiny, out))
    assert report["teacher_source"].startswith("mean_teacher")
    assert report["mean_teacher"] == {"decay": 0.99, "warmup": True}
    assert report["student"]["layers"] == 2 and "eval_accuracy" in report["eval"]
    assert json.loads((out / REPORT).read_text())["mean_teacher"]["decay"] == 0.99
    _, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for value, message in (("{decay: 1.0}", "decay"), ("{decay: 0.9, ramp: 3}", "keys from")):
        with pytest.raises(ValueError, match=message):
            distill(RECIPE, recipe_flags(tiny, out, mean_teacher=value))
    with pytest.raises(ValueError, match="trainer: distill"):
        distill(RECIPE, recipe_flags(tiny, out, trainer="on_policy"))
