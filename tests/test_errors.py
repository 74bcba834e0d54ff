"""Every bad input of DESIGN.md "Contracts" fails before training, naming both values and the fix."""

from __future__ import annotations

import logging

import pytest
from conftest import (
    BertForSequenceClassification,
    LlamaForCausalLM,
    bert_config,
    classification_dataset,
    llama_config,
    make_tokenizer,
    seeded,
)
from test_trainer import TERMS, make_trainer

from llmkd import DistillationConfig


def config(**kw):
    return DistillationConfig(output_dir="unused", report_to="none", use_cpu=True, **kw)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
        ({"temperature": -2}, "temperature must be > 0, got -2"),
        ({"temperature": float("inf")}, "temperature must be > 0, got inf; a finite number"),
        ({"temperature": True}, "temperature must be > 0, got True"),
        ({"hard_label_weight": -0.1}, "hard_label_weight must be a finite number >= 0, got -0.1"),
        (
            {"terms": [{"knowledge": "logits", "loss": "forward_kl", "weight": -1}]},
            "weight must be a finite number >= 0",
        ),
        (
            {"terms": [{"knowledge": "logits", "loss": "forward_kl", "weight": float("nan")}]},
            "weight must be",
        ),
        ({"terms": [{"knowledge": "logits", "loss": "kll"}]}, "unknown logits loss 'kll'; choose one of"),
        ({"terms": [{"knowledge": "features", "loss": "mse"}]}, "unknown knowledge 'features'"),
        ({"terms": [{"knowledge": "logits", "loss": "jsd", "beta": 1.0}]}, "forward_kl"),
        (
            {"terms": [{"knowledge": "logits", "loss": "forward_kl", "bta": 0.5}]},
            "the logits loss 'forward_kl' takes no ['bta']; valid keys",
        ),
        ({"terms": [{"knowledge": "hidden", "loss": "mse", "layer_map": "every"}]}, "layer_map must be"),
        ({"terms": [], "hard_label_weight": 0.0}, "nothing to train on"),
        ({"teacher_dtype": "fp8"}, "teacher_dtype must be one of"),
    ],
)
def test_bad_config_values_raise(kw, message):
    with pytest.raises(ValueError, match=_escape(message)):
        config(**kw)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_layer_index_out_of_range(bert_pair, tmp_path):
    teacher, student = bert_pair
    terms = [{"knowledge": "hidden", "loss": "mse", "layer_map": [[1, 9]]}]
    with pytest.raises(ValueError, match=r"teacher index 9 is out of range; the teacher has 5 hidden_states"):
        make_trainer(teacher, student, "cls", tmp_path, terms)
    terms = [{"knowledge": "attention", "loss": "kl", "layer_map": [[2, 0]]}]
    with pytest.raises(
        ValueError, match=r"student index 2 is out of range; the student has 2 attention maps"
    ):
        make_trainer(teacher, student, "cls", tmp_path, terms)


def test_label_mismatch(tmp_path):
    teacher = seeded(BertForSequenceClassification, bert_config(num_labels=3), 0)
    student = seeded(BertForSequenceClassification, bert_config(layers=2), 1)
    with pytest.raises(ValueError, match="student num_labels=2, teacher num_labels=3"):
        make_trainer(teacher, student, "cls", tmp_path, TERMS["logits"])
    swapped = seeded(
        BertForSequenceClassification,
        bert_config(layers=2, label2id={"neg": 1, "pos": 0}, id2label={1: "neg", 0: "pos"}),
        1,
    )
    named = seeded(
        BertForSequenceClassification,
        bert_config(label2id={"neg": 0, "pos": 1}, id2label={0: "neg", 1: "pos"}),
        0,
    )
    with pytest.raises(ValueError, match="label2id"):
        make_trainer(named, swapped, "cls", tmp_path, TERMS["logits"])


def test_vocab_mismatch_is_an_error_unless_slicing_is_asked_for(tmp_path):
    teacher = seeded(LlamaForCausalLM, llama_config(vocab_size=70), 0)  # lm_head padded to 70 rows
    student = seeded(LlamaForCausalLM, llama_config(layers=2, hidden=16), 1)
    with pytest.raises(
        ValueError, match="the student has 62 logit rows, the teacher 70.*vocab_mismatch=slice"
    ):
        make_trainer(teacher, student, "lm", tmp_path, TERMS["logits"])
    trainer = make_trainer(
        teacher, student, "lm", tmp_path, TERMS["logits"], vocab_mismatch="slice", max_steps=1
    )
    assert trainer.vocab_rows == 62
    trainer.train()


def test_different_tokenizers_are_an_error(llama_pair, tmp_path):
    teacher, student = llama_pair
    other = make_tokenizer("llama")
    other.add_tokens(["brand_new_token"])
    vocab = other.get_vocab()
    assert vocab != make_tokenizer("llama").get_vocab()
    args = config(terms=TERMS["logits"], hard_label_weight=0.0)
    from llmkd import DistillationTrainer

    with pytest.raises(ValueError, match="tokenizer mismatch.*cross-tokenizer loss.*CrossTokenizerTrainer"):
        DistillationTrainer(
            model=student,
            teacher=teacher,
            args=args,
            processing_class=make_tokenizer("llama"),
            teacher_processing_class=other,
        )


def test_teacher_must_not_be_the_student(bert_pair, tmp_path):
    _, student = bert_pair
    with pytest.raises(ValueError, match="same object as the student"):
        make_trainer(student, student, "cls", tmp_path, TERMS["logits"])


def test_task_mismatch(bert_pair, llama_pair, tmp_path):
    with pytest.raises(
        ValueError, match="student is a sequence_classification model but the teacher a causal_lm"
    ):
        make_trainer(llama_pair[0], bert_pair[1], "cls", tmp_path, TERMS["logits"])


def test_empty_dataset(bert_pair, tmp_path):
    teacher, student = bert_pair
    empty = classification_dataset(4).select([])
    with pytest.raises(ValueError, match="the train dataset is empty"):
        make_trainer(teacher, student, "cls", tmp_path, TERMS["logits"], train=empty)


def test_hard_labels_need_a_label_column(bert_pair, tmp_path):
    teacher, student = bert_pair
    unlabelled = classification_dataset(4).remove_columns("label")
    with pytest.raises(ValueError, match="needs a 'label' column.*hard_label_weight=0"):
        make_trainer(teacher, student, "cls", tmp_path, TERMS["logits"], train=unlabelled)


def test_attention_heads_must_match(tmp_path):
    teacher = seeded(BertForSequenceClassification, bert_config(), 0)
    student = seeded(BertForSequenceClassification, bert_config(layers=2, hidden=16, heads=2), 1)
    with pytest.raises(ValueError, match="the student has 2 heads and the teacher 4"):
        make_trainer(teacher, student, "cls", tmp_path, TERMS["attention"])


def test_sdpa_is_switched_to_eager_with_a_warning(bert_pair, tmp_path, caplog):
    teacher, student = bert_pair
    assert student.config._attn_implementation == "sdpa"
    # the trap this guards against: sdpa returns no attention weights at all
    import torch

    out = student(input_ids=torch.tensor([[2, 7, 3]]), output_attentions=True)
    assert not out.attentions
    with caplog.at_level(logging.WARNING, logger="llmkd.knowledge.attention"):
        trainer = make_trainer(teacher, student, "cls", tmp_path, TERMS["attention"], max_steps=1)
    assert "switching the student from attn_implementation='sdpa' to 'eager'" in caplog.text
    assert student.config._attn_implementation == "eager"
    trainer.train()


def test_classifier_pad_ids_must_agree(tmp_path):
    """Batches are padded with the student's pad id; a decoder classifier teacher pools by its own."""
    from conftest import llama_config
    from transformers import LlamaForSequenceClassification

    teacher = seeded(LlamaForSequenceClassification, llama_config(num_labels=2), 0)
    config = llama_config(layers=2, num_labels=2)
    config.pad_token_id = 3
    student = seeded(LlamaForSequenceClassification, config, 1)
    with pytest.raises(
        ValueError, match="pad id mismatch: the student's config.pad_token_id=3, the teacher's 0"
    ):
        make_trainer(teacher, student, "lm", tmp_path, TERMS["logits"])
