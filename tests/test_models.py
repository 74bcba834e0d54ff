"""Student construction: layers copied from the teacher, fresh configs, layer maps."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import BertForSequenceClassification, LlamaForCausalLM, bert_config, llama_config, seeded

from llmkd.knowledge.layer_maps import resolve as resolve_layer_map
from llmkd.students.from_teacher import (
    select_config_layers,
    select_layers,
    student_from_config,
    student_from_teacher,
)


@pytest.mark.parametrize(
    "spec, expected",
    [([0, 2], [0, 2]), ("every:2", [0, 2]), ("first:3", [0, 1, 2]), ("last:1", [3]), ([3, 1], [1, 3])],
)
def test_select_layers(spec, expected):
    assert select_layers(spec, 4) == expected


@pytest.mark.parametrize("spec", [[0, 4], [1, 1], [], "every:0", "middle:2", [-1]])
def test_select_layers_rejects(spec):
    with pytest.raises(ValueError, match="student_layers"):
        select_layers(spec, 4)


def test_bert_student_copies_the_chosen_layers():
    teacher = seeded(BertForSequenceClassification, bert_config(), 0)
    student = student_from_teacher(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2
    t, s = teacher.state_dict(), student.state_dict()
    for j, i in enumerate([0, 3]):
        for name, tensor in teacher.bert.encoder.layer[i].state_dict().items():
            assert torch.equal(s[f"bert.encoder.layer.{j}.{name}"], tensor), (j, name)
    for name in ("bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight", "classifier.weight"):
        assert torch.equal(s[name], t[name])
    # control: student layer 1 is teacher layer 3, not teacher layer 1
    assert not torch.equal(
        s["bert.encoder.layer.1.attention.self.query.weight"],
        t["bert.encoder.layer.1.attention.self.query.weight"],
    )
    ids = torch.tensor([[2, 9, 17, 3]])
    assert student(input_ids=ids).logits.shape == (1, 2)


def test_llama_student_copies_layers_norm_and_head():
    teacher = seeded(LlamaForCausalLM, llama_config(), 0)
    student = student_from_teacher(teacher, "every:2")
    s, t = student.state_dict(), teacher.state_dict()
    assert torch.equal(s["model.layers.1.mlp.up_proj.weight"], t["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(s["lm_head.weight"], t["lm_head.weight"])
    assert torch.equal(s["model.norm.weight"], t["model.norm.weight"])
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2


def test_student_from_config_is_fresh_and_smaller():
    teacher = seeded(BertForSequenceClassification, bert_config(), 0)
    student = student_from_config(
        teacher, {"num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 24}
    )
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (2, 16)
    assert student.config.num_labels == teacher.config.num_labels
    with pytest.raises(ValueError, match="not fields of BertConfig"):
        student_from_config(teacher, {"num_layerz": 2})


def test_uniform_layer_maps_follow_tinybert():
    # 12-layer teacher, 4-layer student: hidden g(m) = 3m with embeddings to embeddings
    assert resolve_layer_map("uniform", 4, 12, "hidden") == [(0, 0), (1, 3), (2, 6), (3, 9), (4, 12)]
    assert resolve_layer_map("uniform", 4, 12, "attention") == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert resolve_layer_map("uniform", 6, 12, "hidden")[-1] == (6, 12)
    assert resolve_layer_map("last", 6, 12, "hidden") == [(6, 12)]
    assert resolve_layer_map("last", 6, 12, "attention") == [(5, 11)]
    assert resolve_layer_map([[0, 0], [2, 7]], 2, 12, "hidden") == [(0, 0), (2, 7)]


def _tiny(config_cls, model_cls, layers=4, **kw):
    config = getattr(transformers, config_cls)(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        **kw,
    )
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config)


def test_student_from_config_keeps_per_layer_lists_consistent():
    teacher = _tiny("Gemma2Config", "Gemma2ForCausalLM", num_key_value_heads=2, head_dim=8)
    types = teacher.config.layer_types
    assert types[0] != types[1]  # control: alternating, so a wrong cut would be visible
    student = student_from_config(teacher, {"num_hidden_layers": 2})
    assert student.config.layer_types == types[:2] and len(student.model.layers) == 2
    with pytest.raises(ValueError, match=r"deeper than the teacher's 4 layers.*layer_types"):
        student_from_config(teacher, {"num_hidden_layers": 6})
    deeper = student_from_config(teacher, {"num_hidden_layers": 6, "layer_types": ["full_attention"] * 6})
    assert deeper.config.layer_types == ["full_attention"] * 6


def test_student_from_config_understands_layer_count_aliases():
    teacher = _tiny("GPT2Config", "GPT2LMHeadModel")
    student = student_from_config(teacher, {"n_layer": 2})
    assert student.config.num_hidden_layers == 2 and len(student.transformer.h) == 2


def test_per_layer_overrides_move_with_their_layer():
    overrides = {1: {"intermediate_size": 48}, 3: {"intermediate_size": 40}}
    config = transformers.LlamaConfig(num_hidden_layers=4, intermediate_size=64, per_layer_config=overrides)
    select_config_layers(config, [1, 2])  # teacher layer 1 (48) then layer 2 (the global 64)
    assert [c.intermediate_size for c in config.per_layer_config] == [48, 64]
    assert config.to_dict()["per_layer_config"] == {"0": {"intermediate_size": 48}}
