"""Model surgery is exact and the fused logit path is allowed only where it equals the plain one, for every family.

Each family is built tiny from its transformers config class. References are independent of llmkd: a student
keeping layers K must equal the teacher with its layer list replaced by those very modules and the per-layer
config fields listed here (not discovered by llmkd) selected at K.
"""

from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn

from llmkd.students.from_teacher import student_from_teacher
from llmkd.students.heads import head_mismatch

VOCAB, PAD = 96, 0
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    pad_token_id=PAD,
    bos_token_id=1,
    eos_token_id=2,
)
GQA = dict(num_key_value_heads=2)
SLIDING = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
# family: (config class, model classes, config fields, per-layer config fields that must follow the kept layers)
# Sliding windows of 2 tokens on 7-token inputs, soft-caps and logit scales far from the identity make a wrong
# per-layer setting or a skipped logit transform visible in the logits.
FAMILIES = {
    "bert": ("BertConfig", ["BertForSequenceClassification"], {}, []),
    "roberta": ("RobertaConfig", ["RobertaForSequenceClassification"], {"pad_token_id": 3}, []),
    "distilbert": ("DistilBertConfig", ["DistilBertForSequenceClassification"], {"hidden_dim": 64}, []),
    "electra": ("ElectraConfig", ["ElectraForSequenceClassification"], {"embedding_size": 16}, []),
    "deberta-v2": (
        "DebertaV2Config",
        ["DebertaV2ForSequenceClassification"],
        {"relative_attention": True, "position_buckets": 8, "pos_att_type": ["p2c", "c2p"]},
        [],
    ),
    "gpt2": ("GPT2Config", ["GPT2LMHeadModel", "GPT2ForSequenceClassification"], {}, []),
    "gpt_neox": ("GPTNeoXConfig", ["GPTNeoXForCausalLM"], {}, []),
    "opt": ("OPTConfig", ["OPTForCausalLM"], {"ffn_dim": 64, "word_embed_proj_dim": 32}, []),
    "llama": ("LlamaConfig", ["LlamaForCausalLM", "LlamaForSequenceClassification"], GQA, []),
    "mistral": ("MistralConfig", ["MistralForCausalLM"], {**GQA, "sliding_window": 3}, []),
    "qwen2": (
        "Qwen2Config",
        ["Qwen2ForCausalLM", "Qwen2ForSequenceClassification"],
        {**GQA, "use_sliding_window": True, "sliding_window": 2, "max_window_layers": 2},
        ["layer_types"],
    ),
    "qwen3": ("Qwen3Config", ["Qwen3ForCausalLM"], {**GQA, "head_dim": 8}, ["layer_types"]),
    "gemma": ("GemmaConfig", ["GemmaForCausalLM"], {**GQA, "head_dim": 8}, []),
    "gemma2": (
        "Gemma2Config",
        ["Gemma2ForCausalLM", "Gemma2ForSequenceClassification"],
        {
            **GQA,
            "head_dim": 8,
            "sliding_window": 2,
            "final_logit_softcapping": 1.0,
            "attn_logit_softcapping": 5.0,
        },
        ["layer_types"],
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        ["Gemma3ForCausalLM"],
        {**GQA, "head_dim": 8, "sliding_window": 2, "layer_types": SLIDING},
        ["layer_types"],
    ),
    "phi3": ("Phi3Config", ["Phi3ForCausalLM"], GQA, []),
    "olmo2": ("Olmo2Config", ["Olmo2ForCausalLM"], GQA, []),
    "cohere": ("CohereConfig", ["CohereForCausalLM"], {**GQA, "logit_scale": 4.0}, []),
    "cohere2": (
        "Cohere2Config",
        ["Cohere2ForCausalLM"],
        {**GQA, "logit_scale": 4.0, "sliding_window": 2},
        ["layer_types"],
    ),
    "granite": ("GraniteConfig", ["GraniteForCausalLM"], {**GQA, "logits_scaling": 4.0}, []),
    "falcon": ("FalconConfig", ["FalconForCausalLM"], {}, []),
    "bloom": ("BloomConfig", ["BloomForCausalLM"], {}, []),
    "smollm3": (
        "SmolLM3Config",
        ["SmolLM3ForCausalLM"],
        {**GQA, "no_rope_layer_interval": 2},
        ["no_rope_layers", "layer_types"],
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        ["Qwen3MoeForCausalLM"],
        {**GQA, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
        [],
    ),
}
# Where each family keeps its layers: what the old `.layers?.N.` rule could and could not see.
LAYER_LISTS = {
    "distilbert": "distilbert.transformer.layer",
    "gpt2": "transformer.h",
    "opt": "model.decoder.layers",
}
CASES = [(family, cls) for family, (_, classes, _, _) in FAMILIES.items() for cls in classes]
CAUSAL = [(family, cls) for family, cls in CASES if "SequenceClassification" not in cls]
# The logits each family computes from z = lm_head(h): the independent reference for head_mismatch.
TRANSFORMS = {
    "gemma2": lambda z, c: c.final_logit_softcapping * torch.tanh(z / c.final_logit_softcapping),
    "cohere": lambda z, c: z * c.logit_scale,
    "cohere2": lambda z, c: z * c.logit_scale,
    "granite": lambda z, c: z / c.logits_scaling,
}
KEEPS = [[0, 2], [1, 3], [1, 2]]


@functools.cache
def teacher(family: str, cls: str, **extra) -> nn.Module:
    """A tiny seeded teacher in eval mode; never modified by the tests (they copy it). Tuples in `extra` (hashable
    for the cache) become the lists the strict configs want."""
    config_cls, _, fields, _ = FAMILIES[family]
    extra = {k: list(v) if isinstance(v, tuple) else v for k, v in extra.items()}
    config = getattr(T, config_cls)(**{**COMMON, **fields, **extra})
    config._attn_implementation = "eager"  # one attention path for teacher, student and reference
    torch.manual_seed(0)
    return getattr(T, cls)(config).eval()


def batch(model: nn.Module) -> dict:
    """Two right-padded rows (7 and 4 real tokens) with their attention mask."""
    pad = model.config.pad_token_id
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, pad, pad, pad]])
    return {"input_ids": ids, "attention_mask": (ids != pad).long()}


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model.eval()(**batch(model), use_cache=False).logits


def reference(model: nn.Module, family: str, keep: list[int]) -> nn.Module:
    """The teacher with its layer list replaced by the kept modules and FAMILIES' per-layer fields selected."""
    ref = copy.deepcopy(model)
    layers = [m for m in ref.modules() if isinstance(m, nn.ModuleList) and len(m) == 4][0]
    for parent in ref.modules():
        for name, child in parent.named_children():
            if child is layers:
                setattr(parent, name, nn.ModuleList([layers[i] for i in keep]))
    for field in FAMILIES[family][3]:
        setattr(ref.config, field, [getattr(ref.config, field)[i] for i in keep])
    ref.config.num_hidden_layers = len(keep)
    return ref


@pytest.mark.parametrize("family, cls", CASES)
def test_student_with_all_layers_is_the_teacher(family, cls):
    model = teacher(family, cls)
    student = student_from_teacher(model, list(range(4)))
    torch.testing.assert_close(logits(student), logits(model), atol=1e-6, rtol=0)
    assert not {p.data_ptr() for p in student.parameters()} & {p.data_ptr() for p in model.parameters()}


@pytest.mark.parametrize("family, cls", CASES)
def test_student_keeping_some_layers_is_the_cut_teacher(family, cls):
    model = teacher(family, cls)
    for keep in KEEPS:
        student = student_from_teacher(model, keep)
        torch.testing.assert_close(logits(student), logits(reference(model, family, keep)), atol=1e-6, rtol=0)
        assert student.config.num_hidden_layers == len(keep)
        for field in FAMILIES[family][3]:
            assert getattr(student.config, field) == [getattr(model.config, field)[i] for i in keep], field
        # control: the kept layers are not the first ones, so this comparison can fail
        assert not torch.allclose(logits(student), logits(reference(model, family, list(range(len(keep))))))


def test_index_lists_are_renumbered_not_selected():
    model = teacher("qwen3_moe", "Qwen3MoeForCausalLM", mlp_only_layers=(1, 3))  # dense MLP in layers 1 and 3
    for keep, dense in (([0, 1, 3], [1, 2]), ([0, 2], []), ([1, 2], [0])):
        student = student_from_teacher(model, keep)
        assert list(student.config.mlp_only_layers) == dense
        torch.testing.assert_close(
            logits(student), logits(reference(model, "qwen3_moe", keep)), atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("family, cls", CAUSAL)
def test_fused_head_allowed_exactly_where_logits_are_the_head_of_the_last_hidden_state(family, cls):
    model = teacher(family, cls)
    with torch.no_grad():
        out = model(**batch(model), output_hidden_states=True, use_cache=False)
    head = model.get_output_embeddings()
    z = F.linear(out.hidden_states[-1], head.weight, head.bias)
    plain = torch.allclose(out.logits, z, atol=1e-6, rtol=0)
    assert plain == (family not in TRANSFORMS)
    if not plain:  # the family's own formula, so the difference is the documented transform and not a bug
        torch.testing.assert_close(out.logits, TRANSFORMS[family](z, model.config), atol=1e-5, rtol=1e-5)
    reason = head_mismatch(model)
    assert (reason is None) == plain, reason
    if not plain:
        assert reason.startswith(f"{family}: logits = ")
        assert re.search(r"(final_logit_softcapping|logit_scale|logits_scaling)=", reason), reason


def test_head_mismatch_refuses_wrapped_heads_and_leaves_the_model_alone():
    model = copy.deepcopy(teacher("llama", "LlamaForCausalLM")).train()
    state = torch.get_rng_state()
    assert head_mismatch(model) is None
    assert all(m.training for m in model.modules()) and torch.equal(torch.get_rng_state(), state)

    class FakeQuantLinear(nn.Linear):  # any subclass may change what .weight means in forward
        pass

    head = FakeQuantLinear(32, VOCAB, bias=False)
    model.lm_head = head
    assert "not a plain nn.Linear" in head_mismatch(model)
    model.lm_head = nn.Linear(32, VOCAB, bias=False)
    torch.nn.utils.parametrize.register_parametrization(model.lm_head, "weight", nn.Identity())
    assert "not a plain nn.Linear" in head_mismatch(model)  # a parametrized module is a subclass too
    model.lm_head = nn.Linear(32, VOCAB, bias=False)
    model.lm_head.register_forward_hook(lambda module, args, out: 2 * out)
    assert "forward hooks" in head_mismatch(model)
    assert "no output head" in head_mismatch(teacher("bert", "BertForSequenceClassification"))


def test_head_mismatch_measures_transforms_no_config_field_names():
    model = copy.deepcopy(teacher("llama", "LlamaForCausalLM"))
    model.register_forward_hook(lambda module, args, out: out.__setitem__("logits", 2 * out.logits))
    assert head_mismatch(model) == "llama: the logits are not lm_head(last hidden state)"
    tiny_cap = teacher("gemma2", "Gemma2ForCausalLM", final_logit_softcapping=1e4)  # numerically ~identity
    assert "final_logit_softcapping=10000.0" in head_mismatch(
        tiny_cap
    )  # refused from its config all the same


def test_per_layer_rules_llmkd_cannot_select_are_refused():
    # decoder_sparse_step=2: MoE in layers 1 and 3 by index arithmetic, which no config list records
    model = teacher("qwen3_moe", "Qwen3MoeForCausalLM", decoder_sparse_step=2)
    with pytest.raises(ValueError, match=r"qwen3_moe .*student layer 0 is not built like teacher layer 1"):
        student_from_teacher(model, [1, 2])
    prefix = student_from_teacher(model, "first:2")
    torch.testing.assert_close(
        logits(prefix), logits(reference(model, "qwen3_moe", [0, 1])), atol=1e-6, rtol=0
    )


def test_albert_shared_layers_are_refused():
    config = T.AlbertConfig(**COMMON, embedding_size=16, num_labels=2)
    with pytest.raises(ValueError, match=r"albert .*share weights.*student_config"):
        student_from_teacher(T.AlbertForSequenceClassification(config), [0, 2])


def test_layers_whose_maths_depend_on_their_index_are_refused():
    model = teacher("gpt2", "GPT2LMHeadModel", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ValueError, match=r"gpt2 .*scale_attn_by_inverse_layer_idx.*student_config"):
        student_from_teacher(model, [1, 3])
    prefix = student_from_teacher(model, "first:2")  # layers stay at their index: allowed and exact
    torch.testing.assert_close(logits(prefix), logits(reference(model, "gpt2", [0, 1])), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "family, cls, keep",
    [
        ("gemma2", "Gemma2ForCausalLM", [0, 2]),
        ("gemma2", "Gemma2ForCausalLM", [1, 3]),
        ("qwen2", "Qwen2ForCausalLM", [1, 2]),
        ("smollm3", "SmolLM3ForCausalLM", [0, 2]),
    ],
)
def test_truncating_per_layer_lists_gives_another_model(family, cls, keep):
    """Negative control: the old rule `layer_types[:n]` builds a different model than the cut teacher."""
    model = teacher(family, cls)
    student = student_from_teacher(model, keep)
    config = copy.deepcopy(model.config)
    for field in FAMILIES[family][3]:
        setattr(config, field, getattr(config, field)[: len(keep)])
    config.num_hidden_layers = len(keep)
    truncated = type(model)(config)
    truncated.load_state_dict(student.state_dict())
    assert any(getattr(config, f) != getattr(student.config, f) for f in FAMILIES[family][3])
    expected = logits(reference(model, family, keep))
    torch.testing.assert_close(logits(student), expected, atol=1e-6, rtol=0)
    assert (logits(truncated) - expected).abs().max() > 1e-3


def old_rule_leftovers(model: nn.Module, keep: list[int]) -> list[str]:
    """Keys the former regex renumbering (`.layers?.N.`) could not place in a len(keep)-layer student."""
    layer_key = re.compile(r"(\.layers?\.)(\d+)(\.)")
    student_keys = set(student_from_teacher(model, keep).state_dict())
    renumber = {str(t): str(s) for s, t in enumerate(keep)}
    placed = set()
    for name in model.state_dict():
        match = layer_key.search(name)
        if match is None:
            placed.add(name)
        elif match.group(2) in renumber:
            placed.add(layer_key.sub(lambda m: f"{m[1]}{renumber[m[2]]}{m[3]}", name, 1))
    return sorted(placed - student_keys)


def test_gpt2_layout_was_refused_by_the_old_key_rule_and_now_works():
    gpt2 = teacher("gpt2", "GPT2LMHeadModel")
    assert any(k.startswith("transformer.h.3.") for k in old_rule_leftovers(gpt2, [0, 2]))
    assert old_rule_leftovers(teacher("llama", "LlamaForCausalLM"), [0, 2]) == []  # control: the rule itself
    names = {k for k in student_from_teacher(gpt2, [0, 2]).state_dict() if k.startswith(LAYER_LISTS["gpt2"])}
    assert {k.split(".")[2] for k in names} == {"0", "1"}
