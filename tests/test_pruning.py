"""Importance-guided structured pruning (`llmkd.students.pruning`, `llmkd.students.importance`) on tiny encoders
of five families built from configs: nothing pruned is the teacher (before and after a plain save/load); dead
neurons and heads prune exactly while live ones do not (negative controls); importance against independent
references (finite differences, explicit loops, a layer skipped by a hook); padding; bad inputs."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import VOCAB, bert_config, llama_config, make_tokenizer, seeded, sentences
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    BertLMHeadModel,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    LlamaForCausalLM,
    NomicBertConfig,
    NomicBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from llmkd.modeling import forward_keys, select_inputs
from llmkd.students.importance import calibration_batches, importance_scores
from llmkd.students.pruning import candidate_shapes, encoder_layout, prune_encoder

FAMILY = dict(
    vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, num_labels=2, initializer_range=0.2
)
BERT_LIKE = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny(family: str):
    """A 4-layer, 4-head encoder classifier of `family` (ELECTRA with narrower embeddings and a projection;
    NomicBERT with a head size of 6, independent of its hidden size of 32)."""
    if family == "bert":
        return seeded(BertForSequenceClassification, bert_config(initializer_range=0.2), 0).eval()
    build = {
        "roberta": (RobertaForSequenceClassification, RobertaConfig(**FAMILY, **BERT_LIKE, **NO_DROPOUT)),
        "electra": (
            ElectraForSequenceClassification,
            ElectraConfig(**FAMILY, **BERT_LIKE, **NO_DROPOUT, embedding_size=16),
        ),
        "distilbert": (
            DistilBertForSequenceClassification,
            DistilBertConfig(
                **FAMILY, dim=32, n_layers=4, n_heads=4, hidden_dim=64, dropout=0.0, attention_dropout=0.0
            ),
        ),
        "nomic_bert": (
            NomicBertForSequenceClassification,
            NomicBertConfig(**FAMILY, **BERT_LIKE, head_dim=6),
        ),
    }[family]
    return seeded(*build, 0).eval()


FAMILIES = ["bert", "roberta", "electra", "distilbert", "nomic_bert"]


def batches(n=8, batch_size=4, seed=0, labels=True):
    texts = sentences(n, seed=seed)
    return calibration_batches(
        make_tokenizer(), texts, [i % 2 for i in range(n)] if labels else None, batch_size=batch_size
    )


def logits(model, batch):
    with torch.no_grad():
        return model(**select_inputs(batch, forward_keys(model))).logits


def _layer(model, i):
    return encoder_layout(model)[2][i]


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_pruned_is_the_teacher_before_and_after_a_plain_save(family, tmp_path):
    teacher = tiny(family)
    batch = batches(n=4)[0]  # right-padded: lengths differ
    assert (batch["attention_mask"] == 0).any()
    model = prune_encoder(teacher, importance=importance_scores(teacher, batches(n=4)))
    assert model is not teacher and torch.equal(logits(model, batch), logits(teacher, batch))
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), (
        info
    )
    assert torch.equal(logits(loaded.eval(), batch), logits(teacher, batch))


def _kill_neurons(model, dead: list[int]) -> None:
    """Zeroes the input rows (weights and bias) of neurons `dead` in every layer: their activation is exactly 0."""
    layout = encoder_layout(model)[0]
    with torch.no_grad():
        for layer in encoder_layout(model)[2]:
            for name in layout.up:
                proj = layer.get_submodule(name)
                proj.weight[dead] = 0
                if proj.bias is not None:
                    proj.bias[dead] = 0


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_dead_neurons_is_exact_and_live_ones_is_not(family, tmp_path):
    teacher = tiny(family)
    dead = [1, 5, 6, 20, 33, 63]
    _kill_neurons(teacher, dead)
    cal, batch = batches(), batches(n=4, seed=1)[0]
    scores = importance_scores(teacher, cal)
    assert (scores["neurons"][:, dead] == 0).all() and (scores["neurons"].sum(0) > 0).sum() == 64 - len(dead)
    model = prune_encoder(teacher, intermediate_size=64 - len(dead), importance=scores)
    torch.testing.assert_close(logits(model, batch), logits(teacher, batch), rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(logits(loaded.eval(), batch), logits(teacher, batch), rtol=1e-5, atol=1e-6)
    # Negative control: the same count of neurons, chosen as the least important, keeps the dead ones.
    worst = prune_encoder(
        teacher, intermediate_size=64 - len(dead), importance={"neurons": -scores["neurons"]}
    )
    assert (logits(worst, batch) - logits(teacher, batch)).abs().max() > 1e-3


def _kill_heads(model, dead: list[int]) -> None:
    """Zeroes the value rows of heads `dead` in every layer: their outputs are exactly 0."""
    layout = encoder_layout(model)[0]
    with torch.no_grad():
        for layer in encoder_layout(model)[2]:
            value = layer.get_submodule(layout.value)
            width = value.out_features // model.config.num_attention_heads
            for h in dead:
                value.weight[h * width : (h + 1) * width] = 0
                if value.bias is not None:
                    value.bias[h * width : (h + 1) * width] = 0


def test_pruning_dead_heads_is_exact_and_live_ones_is_not(tmp_path):
    """NomicBERT has a head-size field, so heads go alone (hidden size kept) and the result round-trips."""
    teacher = tiny("nomic_bert")
    _kill_heads(teacher, [2])
    scores = importance_scores(teacher, batches())
    assert (scores["heads"][:, 2] == 0).all() and (scores["heads_activation"][:, 2] == 0).all()
    assert (scores["heads"][:, [0, 1, 3]] > 0).all()
    model = prune_encoder(teacher, heads_per_layer=3, importance=scores)
    assert (model.config.num_attention_heads, model.config.head_dim, model.config.hidden_size) == (3, 6, 32)
    batch = batches(n=4, seed=1)[0]
    torch.testing.assert_close(logits(model, batch), logits(teacher, batch), rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(logits(loaded.eval(), batch), logits(teacher, batch), rtol=1e-5, atol=1e-6)
    worst = prune_encoder(teacher, heads_per_layer=3, importance={"heads": -scores["heads"]})
    assert (logits(worst, batch) - logits(teacher, batch)).abs().max() > 1e-3


def test_bert_heads_go_with_the_hidden_size_and_weights_are_the_teachers_sliced(tmp_path):
    """BERT's head size is hidden / heads: 2 of 4 heads of size 8 need hidden_size 16; every kept weight is the
    teacher's at the kept heads, neurons and channels, and the checkpoint loads back as plain BERT."""
    teacher = tiny("bert")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    scores = importance_scores(teacher.train(), batches())
    assert teacher.training  # the mode is restored; scores are taken in eval mode (dropout off)
    model = prune_encoder(
        teacher.eval(),
        layers=[1, 3],
        heads_per_layer=2,
        hidden_size=16,
        intermediate_size=40,
        importance=scores,
    )
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # the teacher is untouched
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.hidden_size) == (2, 2, 16)
    assert config.intermediate_size == 40
    channels = scores["hidden"].argsort(descending=True)[:16].sort().values
    torch.testing.assert_close(
        model.bert.embeddings.word_embeddings.weight,
        teacher.bert.embeddings.word_embeddings.weight[:, channels],
    )
    for j, i in enumerate([1, 3]):
        heads = scores["heads"][i].argsort(descending=True)[:2].sort().values
        rows = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in heads])
        mine, theirs = model.bert.encoder.layer[j].attention, teacher.bert.encoder.layer[i].attention
        torch.testing.assert_close(mine.self.query.weight, theirs.self.query.weight[rows][:, channels])
        torch.testing.assert_close(mine.output.dense.weight, theirs.output.dense.weight[channels][:, rows])
        torch.testing.assert_close(mine.output.LayerNorm.weight, theirs.output.LayerNorm.weight[channels])
    torch.testing.assert_close(model.classifier.weight, teacher.classifier.weight[:, channels])
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    batch = batches(n=4, seed=1)[0]
    assert torch.equal(logits(loaded.eval(), batch), logits(model.eval(), batch))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_round_trips_a_pruned_shape_as_a_plain_checkpoint(family, tmp_path):
    """Depth, heads (with the hidden size where the head size is hidden / heads) and FFN at once; the parameter
    count is the one candidate_shapes announces."""
    teacher = tiny(family)
    hidden = None if family == "nomic_bert" else 24
    model = prune_encoder(
        teacher, layers=3, heads_per_layer=3, hidden_size=hidden, intermediate_size=40,
        importance=importance_scores(teacher, batches(n=4)),
    )  # fmt: skip
    (shape,) = candidate_shapes(teacher, depths=[3], heads=[3], intermediate_sizes=[40])
    assert shape["parameters"] == sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), (
        info
    )
    batch = batches(n=4, seed=1)[0]
    assert torch.equal(logits(loaded.eval(), batch), logits(model.eval(), batch))


def _example_loss(model, example, label):
    out = model(**select_inputs(example, forward_keys(model))).logits
    return torch.nn.functional.cross_entropy(out, torch.tensor([label])).item()


def test_head_importance_equals_finite_differences_of_the_loss():
    """Michel et al.'s |∂ℓ/∂m_h|, against central differences of each example's loss when head h's columns of
    the attention output projection are scaled by 1 ± ε (the same as m_h = 1 ± ε), example by example."""
    teacher, eps = tiny("bert").double(), 1e-5
    cal = batches(n=4, batch_size=4)
    ref = torch.zeros(4, 4, dtype=torch.float64)
    examples = batches(n=4, batch_size=1)
    for i, layer in enumerate(teacher.bert.encoder.layer):
        weight = layer.attention.output.dense.weight
        for h in range(4):
            original = weight.detach().clone()
            for example in examples:
                losses = []
                for scale in (1 + eps, 1 - eps):
                    with torch.no_grad():
                        weight.copy_(original)
                        weight[:, h * 8 : (h + 1) * 8] *= scale
                    losses.append(_example_loss(teacher, example, int(example["labels"])))
                ref[i, h] += abs(losses[0] - losses[1]) / (2 * eps) / 4
            with torch.no_grad():
                weight.copy_(original)
    scores = importance_scores(teacher, cal, layer_removal=False)
    torch.testing.assert_close(scores["heads"].double(), ref, rtol=1e-4, atol=1e-9)


def test_activation_scores_equal_explicit_loops():
    """Neurons, head norms, hidden channels and block importance against per-example, per-token loops on module
    outputs (not the hooks importance_scores uses)."""
    teacher = tiny("bert")
    examples = batches(n=4, batch_size=1)
    ref = {"neurons": torch.zeros(4, 64), "heads_activation": torch.zeros(4, 4)}
    ref |= {"hidden": torch.zeros(32), "layer_cosine": torch.zeros(4)}
    seen, tokens = {}, 0
    hooks = [
        layer.intermediate.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("ffn", i), out[0]))
        for i, layer in enumerate(teacher.bert.encoder.layer)
    ] + [
        layer.attention.self.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(("att", i), out[0][0])
        )
        for i, layer in enumerate(teacher.bert.encoder.layer)
    ]
    for example in examples:
        with torch.no_grad():
            out = teacher(**select_inputs(example, forward_keys(teacher)), output_hidden_states=True)
        for t in range(example["input_ids"].shape[1]):
            tokens += 1
            for i in range(4):
                ref["neurons"][i] += seen[("ffn", i)][t].abs()
                ref["heads_activation"][i] += torch.stack(
                    [seen[("att", i)][t, h * 8 : h * 8 + 8].norm() for h in range(4)]
                )
                a, b = out.hidden_states[i][0, t], out.hidden_states[i + 1][0, t]
                ref["layer_cosine"][i] += 1 - (a @ b) / (a.norm() * b.norm())
            ref["hidden"] += sum(h[0, t].abs() for h in out.hidden_states) / 5
    for hook in hooks:
        hook.remove()
    scores = importance_scores(teacher, batches(n=4, batch_size=4), layer_removal=False)
    assert scores["tokens"] == tokens
    for key, value in ref.items():
        torch.testing.assert_close(scores[key], value / tokens, rtol=1e-4, atol=1e-6, msg=key)


def test_layer_removal_score_equals_skipping_the_layer_with_a_hook():
    teacher = tiny("bert")
    cal = batches()
    full = torch.cat([logits(teacher, b) for b in cal]).log_softmax(-1)
    ref = []
    for layer in teacher.bert.encoder.layer:
        hook = layer.register_forward_hook(lambda m, args, kwargs, out: args[0], with_kwargs=True)
        skipped = torch.cat([logits(teacher, b) for b in cal]).log_softmax(-1)
        hook.remove()
        ref.append((full.exp() * (full - skipped)).sum(-1).mean())
    scores = importance_scores(teacher, cal)
    torch.testing.assert_close(scores["layers"], torch.stack(ref), rtol=1e-4, atol=1e-9)
    assert scores["layers"].min() > 0


def test_layer_pruning_keeps_the_chosen_layers_exactly():
    teacher = tiny("bert")
    for layers, expected in (([0, 2], [0, 2]), ("first:3", [0, 1, 2]), (2, [1, 3])):
        importance = {"layers": torch.tensor([0.1, 0.9, 0.0, 0.5])}
        model = prune_encoder(teacher, layers=layers, importance=importance)
        assert model.config.num_hidden_layers == len(expected)
        for j, i in enumerate(expected):
            mine, theirs = (
                model.bert.encoder.layer[j].state_dict(),
                teacher.bert.encoder.layer[i].state_dict(),
            )
            assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("labels", [True, False])
def test_scores_ignore_padding(labels):
    """A padded batch gives the scores of its examples one by one (labels given, or the teacher's own)."""
    teacher = tiny("bert")
    padded = importance_scores(teacher, batches(n=6, batch_size=6, labels=labels))
    alone = importance_scores(teacher, batches(n=6, batch_size=1, labels=labels))
    assert padded["tokens"] == alone["tokens"] and padded["examples"] == alone["examples"] == 6
    for key in padded:
        torch.testing.assert_close(padded[key], alone[key], rtol=1e-4, atol=1e-7, msg=key)


def test_a_left_padding_tokenizer_gives_the_same_scores():
    teacher, tokenizer, texts = tiny("bert"), make_tokenizer(), sentences(6, seed=0)  # left shifts positions
    alone = importance_scores(teacher, calibration_batches(tokenizer, texts, [0, 1] * 3, batch_size=1))
    tokenizer.padding_side = "left"
    padded = importance_scores(teacher, calibration_batches(tokenizer, texts, [0, 1] * 3, batch_size=6))
    assert tokenizer.padding_side == "left"  # restored
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-7)  # every score, key by key


def test_candidate_shapes_count_the_parameters_of_the_pruned_models():
    teacher = tiny("bert")
    shapes = candidate_shapes(teacher)
    assert len(shapes) == 4 * 3 * 4
    full = [s for s in shapes if (s["layers"], s["heads_per_layer"], s["intermediate_size"]) == (4, 4, 64)]
    assert full[0]["fraction"] == 1 and full[0]["parameters"] == sum(p.numel() for p in teacher.parameters())
    scores = importance_scores(teacher, batches(n=4))
    (shape,) = candidate_shapes(teacher, depths=[2], heads=[2], intermediate_sizes=[16])
    model = prune_encoder(
        teacher, layers=2, heads_per_layer=2, hidden_size=16, intermediate_size=16, importance=scores
    )
    assert shape["hidden_size"] == 16 and shape["parameters"] == sum(p.numel() for p in model.parameters())


BAD = [
    (dict(heads_per_layer=5), "heads_per_layer=5: need an integer in 1..4"),
    (dict(intermediate_size=65), "intermediate_size=65: need an integer in 1..64"),
    (dict(intermediate_size=0), "intermediate_size=0"),
    (dict(layers=[]), "layers=[]: keep at least one layer"),
    (dict(layers=0), "layers=0: keep between 1 and 4"),
    (dict(layers=[0, 7]), "student_layers=[0, 7]"),
    (dict(heads_per_layer=2), "heads_per_layer=2 needs hidden_size=16"),
    (dict(hidden_size=16), "hidden_size=16 needs heads_per_layer=2"),
    (dict(intermediate_size=32, importance={"neurons": torch.full((4, 64), float("nan"))}), "contains NaN"),
    (dict(intermediate_size=32), "pass importance=importance_scores"),
    (
        dict(intermediate_size=32, importance={"neurons": torch.ones(4, 32)}),
        "importance['neurons'] is (4, 32)",
    ),
    (dict(layers=2, importance={}), "importance['layers'] is NoneType"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_sizes_are_refused_naming_the_value_and_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        prune_encoder(tiny("bert"), **kwargs)


def test_unsupported_models_are_refused():
    causal = [
        seeded(LlamaForCausalLM, llama_config(), 0),
        seeded(BertLMHeadModel, bert_config(is_decoder=True), 0),
    ]
    for model in causal:
        with pytest.raises(ValueError, match="causal/decoder model.*student_from_teacher"):
            prune_encoder(model)
    albert = AlbertForSequenceClassification(
        AlbertConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4)
    )
    with pytest.raises(ValueError, match="albert .* is not supported for head/FFN pruning"):
        importance_scores(albert, batches(n=2))
    with pytest.raises(ValueError, match="needs a sequence classifier.*AutoModelForSequenceClassification"):
        importance_scores(seeded(BertModel, bert_config(), 0), batches(n=2))
    with pytest.raises(ValueError, match="batches is empty"):
        importance_scores(tiny("bert"), [])
    with pytest.raises(ValueError, match="heads=5: need an integer in 1..4"):
        candidate_shapes(tiny("bert"), heads=[5])
