"""Corners a new user hit (a review that tried to break the contracts), each a member of a class the property
tests cover, pinned here with the input that showed it. Each test fails on the code before its fix."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import (
    classification_dataset,
    llama_config,
    lm_dataset,
    make_tokenizer,
    seeded,
    training_settings,
)
from test_trainer import make_trainer, term_logs
from transformers import DataCollatorForLanguageModeling, LlamaForSequenceClassification

from llmkd import DistillationConfig, DistillationTrainer
from llmkd.content import teacher_key
from llmkd.knowledge.adapters import AUX
from llmkd.students import describe

HIDDEN = [{"knowledge": "hidden", "loss": "mse"}, {"knowledge": "logits", "loss": "forward_kl"}]


def test_a_collator_that_masks_labels_on_purpose_keeps_them(llama_pair, tmp_path):
    """Only transformers' own plain-LM collator gets labels from the mask; a completion-only subclass is obeyed."""

    class CompletionOnly(DataCollatorForLanguageModeling):
        def __call__(self, features):
            batch = super().__call__(features)
            batch["labels"][:, :3] = -100  # the prompt
            return batch

    teacher, student = llama_pair
    tok = make_tokenizer("llama")
    args = DistillationConfig(**training_settings(tmp_path, hard_label_weight=0.0))
    trainer = DistillationTrainer(
        model=student, teacher=teacher, args=args, data_collator=CompletionOnly(tok, mlm=False),
        processing_class=tok, teacher_processing_class=tok,
    )  # fmt: skip
    rows = [lm_dataset(2)[i] for i in range(2)]
    assert (trainer.data_collator(rows)["labels"][:, :3] == -100).all()


def test_the_student_carries_no_projector_after_a_second_trainer_and_in_exports(bert_pair, tmp_path):
    teacher, student = bert_pair
    size = describe(student)["parameters"]
    first = make_trainer(teacher, student, "cls", tmp_path / "a", HIDDEN, max_steps=1)
    assert hasattr(student, AUX) and describe(student)["parameters"] == size  # counted without the projector
    first.train()
    second = make_trainer(teacher, student, "cls", tmp_path / "b", HIDDEN[1:], max_steps=1)
    assert not hasattr(student, AUX) and len(second.aux) == 0  # the old projector left with its trainer
    ids = {id(p) for g in second.create_optimizer().param_groups for p in g["params"]}
    assert ids == {id(p) for p in student.parameters() if p.requires_grad}


def test_a_quantised_export_is_the_plain_student(bert_pair, tmp_path):
    from llmkd.students.quantize import export_quantized, load_quantized, quantize_student

    teacher, student = bert_pair
    quantize_student(student, bits=8)
    trainer = make_trainer(teacher, student, "cls", tmp_path, HIDDEN, max_steps=1)
    trainer.train()
    export_quantized(trainer.model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    assert not any(AUX in k for k in loaded.state_dict())


def test_relation_terms_pool_a_decoder_classifier_like_a_decoder(tmp_path):
    """Its first token saw nothing else: pooled there, every example is the same vector and the loss is 0."""
    teacher = seeded(LlamaForSequenceClassification, llama_config(num_labels=2), 0)
    student = seeded(LlamaForSequenceClassification, llama_config(layers=2, hidden=16, num_labels=2), 1)
    terms = [{"knowledge": "relation", "loss": "rkd_distance"}]
    trainer = make_trainer(teacher, student, "lm", tmp_path, terms, hard_label_weight=0.0)
    assert trainer.terms[0].causal == (True, True)
    batch = trainer._prepare_inputs(
        trainer.data_collator([lm_dataset(4)[i] | {"label": 0} for i in range(4)])
    )
    assert trainer.compute_loss(student, batch) > 1e-4


def test_evaluating_and_predicting_unlabelled_data_leave_the_task_loss_out(bert_pair, tmp_path):
    teacher, student = bert_pair
    trainer = make_trainer(teacher, student, "cls", tmp_path, HIDDEN[1:])
    unlabelled = classification_dataset(6).remove_columns("label")
    metrics = trainer.evaluate(eval_dataset=unlabelled)
    assert "eval_loss_ce" not in metrics and metrics["eval_distill/logits_forward_kl"] > 0
    test_split = classification_dataset(6).map(lambda row: {"label": -1})  # GLUE's test splits
    assert "test_loss_ce" not in trainer.predict(test_split).metrics
    half = classification_dataset(6).map(
        lambda row, i: {"label": -1 if i % 2 else row["label"]}, with_indices=True
    )
    labelled = classification_dataset(6).select([0, 2, 4])
    assert trainer.evaluate(eval_dataset=half)["eval_loss_ce"] == pytest.approx(
        trainer.evaluate(eval_dataset=labelled)["eval_loss_ce"], rel=1e-5
    )


def test_the_best_checkpoint_brings_its_projector_back(bert_pair, tmp_path):
    teacher, student = bert_pair
    args = DistillationConfig(**training_settings(
        tmp_path, terms=HIDDEN, max_steps=4, eval_strategy="steps", eval_steps=1, save_strategy="steps",
        save_steps=1, load_best_model_at_end=True, learning_rate=0.5, metric_for_best_model="distill/hidden_mse",
    ))  # fmt: skip
    tok = make_tokenizer("bert")
    trainer = DistillationTrainer(
        model=student, teacher=teacher, args=args, train_dataset=classification_dataset(16),
        eval_dataset=classification_dataset(8, seed=2), processing_class=tok, teacher_processing_class=tok,
    )  # fmt: skip
    trainer.train()
    assert trainer.evaluate()["eval_distill/hidden_mse"] == pytest.approx(trainer.state.best_metric, rel=1e-5)


def test_a_teacher_in_memory_is_keyed_by_its_config_too(llama_pair):
    teacher, _ = llama_pair
    other = copy.deepcopy(teacher)
    other.config.rope_theta = 1.0  # same weights, other outputs
    assert teacher_key(other) != teacher_key(teacher)


def test_logged_loss_and_train_loss_cover_every_item_whatever_logging_steps(llama_pair, tmp_path):
    teacher, student = llama_pair
    trainer = make_trainer(
        teacher, student, "lm", tmp_path, HIDDEN[1:], train=lm_dataset(8, seed=5), max_steps=2, logging_steps=2,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=0.0,
        train_sampling_strategy="sequential",
    )  # fmt: skip
    trainer.train()
    (loss,) = term_logs(trainer, "loss")
    (term,) = term_logs(trainer, "distill/logits_forward_kl")
    (whole,) = term_logs(trainer, "train_loss")
    assert loss == pytest.approx(term, rel=1e-6) and whole == pytest.approx(term, rel=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"student_pad": None}, "decoder classifier .* without config.pad_token_id"),
        ({"dup_terms": True}, None),  # the same loss at two temperatures is two terms, not a repeat
    ],
)
def test_refused_before_training_or_accepted(change, message, tmp_path):
    if "student_pad" in change:
        config = llama_config(layers=2, num_labels=2)
        config.pad_token_id = None
        teacher_config = llama_config(num_labels=2)
        teacher_config.pad_token_id = None
        with pytest.raises(ValueError, match=message):
            make_trainer(
                seeded(LlamaForSequenceClassification, teacher_config, 0),
                seeded(LlamaForSequenceClassification, config, 1), "lm", tmp_path, HIDDEN[1:],
            )  # fmt: skip
        return
    terms = [{**HIDDEN[1], "temperature": 1.0}, {**HIDDEN[1], "temperature": 4.0}]
    assert len(DistillationConfig(**training_settings(tmp_path, terms=terms)).terms) == 2


def test_yaml_numbers_in_quotes_are_numbers_and_booleans_are_not(tmp_path):
    from llmkd.cli.recipe import split_config

    values = {"teacher": "t", "student_layers": [0], "train_file": "x.csv", "output_dir": str(tmp_path)}
    _, args = split_config(values | {"learning_rate": "0.01", "max_steps": 4.0, "max_grad_norm": "1.0"})
    assert (args.learning_rate, args.max_steps, args.max_grad_norm) == (0.01, 4, 1.0)
    with pytest.raises(ValueError, match="temperature must be a number, got True"):
        split_config(values | {"temperature": True})
    _, args = split_config(values | {"warmup_steps": 0.1})  # an int field that also takes a ratio
    assert args.warmup_steps == 0.1


def test_reentrant_checkpointing_with_attention_terms_is_refused(bert_pair, tmp_path):
    teacher, student = bert_pair
    with pytest.raises(ValueError, match="use_reentrant=True returns attention maps without a gradient"):
        make_trainer(
            teacher, student, "cls", tmp_path, [{"knowledge": "attention", "loss": "kl"}],
            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True},
        )  # fmt: skip


def test_a_model_folder_as_teacher_names_the_fix(bert_pair, tmp_path):
    teacher, student = bert_pair
    teacher.save_pretrained(tmp_path / "teacher")
    args = DistillationConfig(**training_settings(tmp_path))
    with pytest.raises(ValueError, match="is a model folder: load it first"):
        DistillationTrainer(model=student, teacher=str(tmp_path / "teacher"), args=args)


def test_eval_without_concatenated_batches_still_scores(bert_pair, tmp_path):
    from llmkd.evaluation.metrics import accuracy

    teacher, student = bert_pair
    trainer = make_trainer(teacher, student, "cls", tmp_path, HIDDEN[1:], eval_do_concat_batches=False,
                           per_device_eval_batch_size=3)  # fmt: skip
    trainer.compute_metrics = accuracy
    assert 0 <= trainer.evaluate(eval_dataset=classification_dataset(7))["eval_accuracy"] <= 1
    json.dumps(trainer.state.log_history)  # every logged value is plain JSON
