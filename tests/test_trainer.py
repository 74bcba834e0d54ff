"""Trainer smoke tier: tiny BERT and Llama pairs, a few steps each, seconds per test."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import classification_dataset, lm_dataset, make_tokenizer, training_settings
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
)

from llmkd import DistillationConfig, DistillationTrainer

TERMS = {
    "logits": [{"knowledge": "logits", "loss": "forward_kl"}],
    "hidden": [{"knowledge": "hidden", "loss": "mse", "layer_map": "uniform"}],
    "attention": [{"knowledge": "attention", "loss": "kl", "layer_map": "uniform"}],
    "relation": [{"knowledge": "relation", "loss": "rkd_distance"}, {"knowledge": "relation", "loss": "sp"}],
    "tinybert": [
        {"knowledge": "logits", "loss": "forward_kl"},
        {"knowledge": "hidden", "loss": "mse"},
        {"knowledge": "attention", "loss": "mse"},
    ],
}


def make_trainer(
    teacher, student, task, tmp_path, terms, train=None, trainer_cls=DistillationTrainer, **overrides
):
    """A DistillationTrainer on the tiny data of `task` ('cls' or 'lm') with quiet, deterministic settings."""
    kind = "bert" if task == "cls" else "llama"
    tok = make_tokenizer(kind)
    data = train if train is not None else (classification_dataset() if task == "cls" else lm_dataset())
    collator = (
        DataCollatorWithPadding(tok) if task == "cls" else DataCollatorForLanguageModeling(tok, mlm=False)
    )
    hard = 0.5 if task == "cls" else 0.0
    args = DistillationConfig(
        **training_settings(tmp_path, **({"terms": terms, "hard_label_weight": hard} | overrides))
    )
    return trainer_cls(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=data,
        data_collator=collator,
        processing_class=tok,
        teacher_processing_class=tok,
    )


def term_logs(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


@pytest.mark.parametrize("knowledge", list(TERMS))
@pytest.mark.parametrize("task", ["cls", "lm"])
def test_each_knowledge_type_trains_and_logs(knowledge, task, bert_pair, llama_pair, tmp_path):
    teacher, student = bert_pair if task == "cls" else llama_pair
    trainer = make_trainer(teacher, student, task, tmp_path, TERMS[knowledge])
    trainer.train()
    for term in trainer.terms:
        values = term_logs(trainer, term.name)
        assert len(values) == 3 and all(torch.isfinite(torch.tensor(values))), (term.name, values)
    if task == "cls":
        assert len(term_logs(trainer, "loss_ce")) == 3


@pytest.mark.parametrize("task", ["cls", "lm"])
def test_loss_goes_down_on_a_repeated_batch(task, bert_pair, llama_pair, tmp_path):
    teacher, student = bert_pair if task == "cls" else llama_pair
    data = classification_dataset(4) if task == "cls" else lm_dataset(4)
    trainer = make_trainer(
        teacher, student, task, tmp_path, TERMS["tinybert"], train=data, max_steps=25, learning_rate=5e-3
    )
    trainer.train()
    losses = term_logs(trainer, "loss")
    assert losses[-1] < 0.5 * losses[0], losses


def test_teacher_is_frozen_untouched_and_kept_in_eval(bert_pair, tmp_path):
    teacher, student = bert_pair
    before = copy.deepcopy(teacher.state_dict())
    student_before = copy.deepcopy(student.state_dict())
    teacher.train()  # even a teacher handed over in train mode must run in eval mode
    trainer = make_trainer(teacher, student, "cls", tmp_path, TERMS["tinybert"])
    trainer.train()
    assert trainer.teacher.training is False
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    for name, tensor in trainer.teacher.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    # the negative control: the student, trained by the same steps, did change
    assert any(not torch.equal(t, student_before[n]) for n, t in student.state_dict().items())


@pytest.mark.parametrize("task", ["cls", "lm"])
def test_saved_student_is_a_plain_checkpoint(task, bert_pair, llama_pair, tmp_path):
    teacher, student = bert_pair if task == "cls" else llama_pair
    trainer = make_trainer(
        teacher, student, task, tmp_path, TERMS["tinybert"], save_strategy="steps", save_steps=2
    )
    trainer.train()
    trainer.save_model()
    auto = AutoModelForSequenceClassification if task == "cls" else AutoModelForCausalLM
    for folder in (tmp_path / "out", tmp_path / "out" / "checkpoint-2"):
        reloaded, info = auto.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert reloaded.config.num_hidden_layers == 2
    assert not any(name.startswith("llmkd") for name in reloaded.state_dict())
    # the projector (student width 16, teacher 32) is kept beside the checkpoint, not in the final student
    assert (tmp_path / "out" / "checkpoint-2" / "llmkd_aux.safetensors").is_file()
    assert not (tmp_path / "out" / "llmkd_aux.safetensors").exists()


def test_evaluation_reports_terms_and_agreement(bert_pair, tmp_path):
    teacher, student = bert_pair
    data = classification_dataset(12).remove_columns("label")  # distillation needs no labels
    trainer = make_trainer(
        teacher, student, "cls", tmp_path, TERMS["tinybert"], hard_label_weight=0.0, train=data
    )
    trainer.eval_dataset = data
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_agreement"] <= 1.0
    assert metrics["eval_distill/logits_forward_kl"] > 0
    # agreement is exactly 1 when the "student" is a copy of the teacher (control)
    clone = copy.deepcopy(teacher)
    twin = make_trainer(teacher, clone, "cls", tmp_path, TERMS["logits"], hard_label_weight=0.0, train=data)
    assert twin.evaluate(eval_dataset=data)["eval_agreement"] == 1.0


def test_columns_the_teacher_needs_survive_remove_unused_columns(tmp_path):
    from conftest import BertForSequenceClassification, bert_config, llama_config, seeded
    from transformers import LlamaForSequenceClassification, Trainer, TrainingArguments

    teacher = seeded(BertForSequenceClassification, bert_config(), 0)  # takes token_type_ids
    student = seeded(
        LlamaForSequenceClassification, llama_config(layers=2, hidden=16, num_labels=2), 1
    )  # does not
    data = classification_dataset(8)
    trainer = make_trainer(teacher, student, "cls", tmp_path, TERMS["logits"], train=data, max_steps=1)
    assert "token_type_ids" in trainer._remove_unused_columns(data).column_names
    trainer.train()
    # control: the plain Trainer, which only looks at the student's forward, drops the column
    plain = Trainer(model=student, args=TrainingArguments(output_dir=str(tmp_path / "p"), report_to="none"))
    assert "token_type_ids" not in plain._remove_unused_columns(data).column_names
