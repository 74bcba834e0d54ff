"""LoRA / QLoRA students: only adapters learn, the trainer saves an adapter that reloads to the same logits."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
from conftest import bert_config, llama_config, seeded
from peft import PeftModel
from safetensors.torch import load_file
from test_trainer import TERMS, make_trainer
from transformers import AutoModelForCausalLM, BertForSequenceClassification, LlamaForCausalLM

from llmkd import modeling as A
from llmkd.students import lora

BUILD = {"lm": (LlamaForCausalLM, llama_config), "cls": (BertForSequenceClassification, bert_config)}


def pair(task, student_width=16):
    build, config = BUILD[task]
    teacher = seeded(build, config(), 0)
    student = seeded(build, config(layers=2, hidden=student_width), 1)
    return teacher, student


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model):
    return {n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p.detach())}


def probe(task):
    ids = torch.tensor(
        [[2, 7, 9, 11, 3, 0], [2, 8, 12, 3, 0, 0]] if task == "cls" else [[4, 7, 9, 11, 13, 8]]
    )
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


@pytest.mark.parametrize(
    "task,knowledge",
    [("lm", "logits"), ("cls", "logits"), ("lm", "tinybert"), ("cls", "hidden")],
)
def test_only_adapters_change_and_the_saved_adapter_reloads(task, knowledge, tmp_path):
    teacher, student = pair(task)
    base_copy = copy.deepcopy(student)
    student = lora.lora_student(student, r=4, alpha=8)
    before = snapshot(student)
    trainer = make_trainer(
        teacher, student, task, tmp_path, TERMS[knowledge], save_strategy="steps", save_steps=2
    )
    projector_before = {n: p.detach().clone() for n, p in trainer.auxiliary_modules.named_parameters()}
    trainer.train()
    moved = changed(before, student)
    # Base weights bit-identical; adapters (and a classifier's head copy) moved.
    assert moved and all("lora_" in n or "modules_to_save" in n for n in moved), moved
    assert any("lora_B" in n for n in moved)  # B starts at zero: a changed B means gradients reached it
    if task == "cls":
        assert any("modules_to_save" in n and "classifier" in n for n in moved)
    for (
        name,
        p,
    ) in trainer.auxiliary_modules.named_parameters():  # width 16 vs 32: hidden terms learn a projector
        assert not torch.equal(projector_before[name], p.detach())
    trainer.save_model()
    out = tmp_path / "out"
    files = set(os.listdir(out))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not {"model.safetensors", "pytorch_model.bin"} & files
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(out / "checkpoint-2"))
    saved = load_file(out / "adapter_model.safetensors")
    assert all("lora_" in k or "classifier" in k for k in saved)  # no base weights in the adapter file
    base_copy.set_attn_implementation(A.text_config(student)._attn_implementation)  # attention terms: eager
    reloaded = lora.load_lora_student(out, base_copy).eval()
    student.eval()
    with torch.no_grad():
        got, want = reloaded(**probe(task)).logits, student(**probe(task)).logits
    assert torch.equal(got, want)


def test_control_without_lora_every_weight_changes(tmp_path):
    teacher, student = pair("lm")
    before = snapshot(student)
    make_trainer(teacher, student, "lm", tmp_path, TERMS["logits"]).train()
    frozen = set(before) - changed(before, student)
    assert not frozen, frozen  # the test above would catch a LoRA wrapper that froze nothing


def test_base_reload_without_adapter_differs_and_merge_saves_a_plain_model(tmp_path):
    teacher, student = pair("lm")
    base_copy = copy.deepcopy(student)
    student = lora.lora_student(student, r=4, alpha=8)
    make_trainer(teacher, student, "lm", tmp_path, TERMS["logits"]).train()
    student.eval()
    with torch.no_grad():
        adapted = student(**probe("lm")).logits
        plain = base_copy(**probe("lm")).logits
    assert not torch.allclose(adapted, plain, atol=1e-4)  # the adapter does something
    merged = lora.merge_and_save(student, tmp_path / "merged")
    assert not isinstance(merged, PeftModel)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k for k in loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**probe("lm")).logits, adapted, rtol=1e-5, atol=1e-5)


def test_alignment_sees_through_the_peft_wrapper():
    for task in ("lm", "cls"):
        _, student = pair(task)
        plain_keys, plain_task = A.forward_keys(student), A.task_of(student)
        wrapped = lora.lora_student(student)
        assert A.forward_keys(wrapped) == plain_keys and "input_ids" in plain_keys
        assert A.task_of(wrapped) == plain_task
        assert A.text_config(wrapped) is student.config
        assert A.hidden_width(wrapped) == 16
    teacher, student = pair("lm")
    wrapped = lora.lora_student(student)
    assert A.output_head(wrapped) is student.lm_head  # lm_head is not an adapter target: fused path is exact
    with torch.no_grad():
        out = wrapped(**probe("lm"), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3


def test_adapter_on_the_head_turns_the_fused_path_off(tmp_path):
    teacher, student = pair("lm")
    student = lora.lora_student(student, target_modules=["q_proj", "lm_head"])
    trainer = make_trainer(teacher, student, "lm", tmp_path, TERMS["logits"])
    assert not trainer.fused  # the fused path reads head.weight and would skip the adapter
    plain_teacher, plain_student = pair("lm")
    assert make_trainer(
        plain_teacher, lora.lora_student(plain_student), "lm", tmp_path, TERMS["logits"]
    ).fused


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"r": 0}, "positive integer"),
        ({"alpha": -1}, "alpha must be > 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"target_modules": 3}, "target_modules"),
        ({"target_modules": ["no_such_layer"]}, "Linear layers here"),
    ],
)
def test_bad_lora_settings_fail_before_training(kwargs, match):
    _, student = pair("lm")
    with pytest.raises(ValueError, match=match):
        lora.lora_student(student, **kwargs)


def test_lora_summary_counts_only_adapters():
    _, student = pair("lm")
    total = sum(p.numel() for p in student.parameters())
    counts = lora.trainable_summary(lora.lora_student(student, r=2))
    assert counts["total"] > total > counts["trainable"] > 0


# ---- QLoRA ---------------------------------------------------------------------------------------

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def test_qlora_without_bitsandbytes_names_the_package(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a)
    )
    with pytest.raises(ImportError, match=r"bitsandbytes.*pip install 'llmkd\[qlora\]'"):
        lora.qlora_student(tmp_path / "never-loaded")  # fails before it looks for the model


def test_qlora_old_bitsandbytes_or_missing_gpu_names_the_fix(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object())
    monkeypatch.setattr(lora.importlib.metadata, "version", lambda n: "0.43.1")
    with pytest.raises(RuntimeError, match=r"bitsandbytes 0.43.1 is too old.*>=0.46.1"):
        lora.check_qlora_available()
    monkeypatch.setattr(lora.importlib.metadata, "version", lambda n: "0.50.2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lora.check_qlora_available()  # a recent bitsandbytes runs on CPU
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        lora.check_qlora_available("cuda")


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed (pip install 'llmkd[qlora]')")
def test_qlora_student_trains_its_adapters_only(tmp_path):
    teacher, student = pair("lm", student_width=64)  # bitsandbytes packs 4-bit blocks of 64 weights
    student.save_pretrained(tmp_path / "base")
    qstudent = lora.qlora_student(tmp_path / "base", r=4, alpha=8, compute_dtype=torch.float32, device="cpu")
    assert type(qstudent.get_base_model().model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    before = snapshot(qstudent)
    make_trainer(teacher, qstudent, "lm", tmp_path, TERMS["logits"]).train()
    moved = changed(before, qstudent)
    assert moved and all("lora_" in n for n in moved), moved
    with pytest.raises(ValueError, match="4-bit"):
        lora.merge_and_save(qstudent, tmp_path / "merged")


def test_resume_from_an_adapter_checkpoint_matches_an_uninterrupted_run(tmp_path):
    runs = {}
    for name, resume in (("straight", None), ("resumed", "checkpoint-2")):
        teacher, student = pair("lm")
        student = lora.lora_student(student, r=4, alpha=8)
        out = tmp_path / "straight"  # the resumed run continues from the first run's checkpoint
        kwargs = {"save_strategy": "steps", "save_steps": 2} if resume is None else {"save_strategy": "no"}
        trainer = make_trainer(
            teacher, student, "lm", tmp_path / name, TERMS["logits"], max_steps=4, **kwargs
        )
        trainer.train(resume_from_checkpoint=None if resume is None else str(out / "out" / resume))
        runs[name] = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    assert runs["straight"].keys() == runs["resumed"].keys()
    for n in runs["straight"]:
        torch.testing.assert_close(runs["resumed"][n], runs["straight"][n], rtol=1e-5, atol=1e-6)
