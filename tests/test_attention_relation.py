"""MiniLM / MiniLMv2 attention relations: float64 references from the papers, hooks, padding, accumulation, DDP.

The reference re-implements R = softmax(X_r X_rᵀ / √d_r) and KL(R_T ‖ R_S) with Python loops in float64 from
the papers' definitions (Wang et al. 2020, arXiv 2002.10957; 2021, arXiv 2012.15828). At trainer level the queries,
keys and values are recomputed from each example's hidden states alone (no padding, no hooks) by calling the
attention projections directly, so the hooks, the layer map and the padding are all checked against it.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import sys

import pytest
import test_padding
import torch
from conftest import (
    VOCAB,
    BertForSequenceClassification,
    LlamaForCausalLM,
    bert_config,
    llama_config,
    lm_dataset,
    run_launcher,
    seeded,
)
from relation_worker import train_and_dump
from safetensors.torch import load_file
from test_graph_knowledge import ROOT, demo, gap, recipe_flags, update  # noqa: F401  (demo: a fixture)
from test_normalisation import PerBatchMeanTrainer
from test_padding import per_example
from test_trainer import make_trainer
from transformers import DistilBertConfig, DistilBertForSequenceClassification

from llmkd.cli.pipeline import distill
from llmkd.knowledge import Pair, parse_term
from llmkd.knowledge.attention_relation import AttentionRelationKnowledge
from llmkd.losses.attention_relation import self_attention_relations
from llmkd.modeling import forward_keys
from llmkd.teachers.base import TeacherSource

F64 = torch.float64
NAMES = ("query", "key", "value")


# ---- the reference (loops, float64) ------------------------------------------------------------------------


def softmax_row(x: list, q: int, size: int) -> list[float]:
    scores = [sum(a * b for a, b in zip(x[q], x[k], strict=True)) / math.sqrt(size) for k in range(len(x))]
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    return [e / sum(exps) for e in exps]


def head(rows: list, r: int, heads: int) -> list:
    """Columns of relation head r: the r-th of `heads` equal slices of the concatenated projection."""
    size = len(rows[0]) // heads
    return [row[r * size : (r + 1) * size] for row in rows]


def relation_ref(student: dict, teacher: dict, heads: int, names=NAMES) -> list[float]:
    """Per query token: mean over relation types and heads of Σ_k R_T log(R_T / R_S), one example's real tokens."""
    length = len(student[names[0]])
    out = [0.0] * length
    for name in names:
        for side in (student, teacher):
            assert len(side[name][0]) % heads == 0
        for r in range(heads):
            xs, xt = head(student[name].tolist(), r, heads), head(teacher[name].tolist(), r, heads)
            for q in range(length):
                ps, pt = softmax_row(xs, q, len(xs[0])), softmax_row(xt, q, len(xt[0]))
                out[q] += sum(t * math.log(t / s) for s, t in zip(ps, pt, strict=True))
    return [v / (len(names) * heads) for v in out]


# ---- the pure loss -----------------------------------------------------------------------------------------


def test_loss_matches_the_paper_formula_with_other_widths_and_padding():
    g = torch.Generator().manual_seed(0)
    lengths, heads = [4, 6], 2
    widths_s, widths_t = {"query": 8, "key": 4, "value": 4}, {"query": 12, "key": 6, "value": 12}  # GQA-like
    student = {n: torch.randn(2, 6, w, generator=g, dtype=F64) for n, w in widths_s.items()}
    teacher = {n: torch.randn(2, 6, w, generator=g, dtype=F64) for n, w in widths_t.items()}
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    for x in (*student.values(), *teacher.values()):
        x[mask == 0] = 1e3  # padded keys may hold anything
    got = self_attention_relations(student, teacher, relation_heads=heads, key_mask=mask)
    assert got.shape == (2, 6) and got.dtype == F64
    for b, n in enumerate(lengths):
        want = relation_ref(
            {k: v[b, :n] for k, v in student.items()}, {k: v[b, :n] for k, v in teacher.items()}, heads
        )
        torch.testing.assert_close(got[b, :n], torch.tensor(want, dtype=F64), rtol=1e-9, atol=1e-12)
    # controls: the teacher against itself gives 0; another teacher changes every row; unmasked keys change it
    assert self_attention_relations(teacher, teacher, relation_heads=heads, key_mask=mask).abs().max() < 1e-12
    other = {k: v.flip(1) for k, v in teacher.items()}
    assert (self_attention_relations(student, other, relation_heads=heads, key_mask=mask) - got).abs()[
        0, :4
    ].min() > 0
    unmasked = self_attention_relations(student, teacher, relation_heads=heads)
    assert not torch.allclose(unmasked[0, :4], got[0, :4])


def test_loss_selects_relations_and_stays_finite_without_real_keys():
    g = torch.Generator().manual_seed(1)
    s = {n: torch.randn(1, 3, 4, generator=g, requires_grad=True) for n in NAMES}
    t = {n: torch.randn(1, 3, 4, generator=g) for n in NAMES}
    value_only = self_attention_relations(s, t, relations=["value"], relation_heads=2)
    torch.testing.assert_close(
        value_only[0].double(),
        torch.tensor(
            relation_ref(
                {k: v[0].detach().double() for k, v in s.items()},
                {k: v[0].double() for k, v in t.items()},
                2,
                ("value",),
            ),
            dtype=F64,
        ),
        rtol=1e-5,
        atol=1e-6,
    )  # fmt: skip  (float32 maths against the float64 reference)
    empty = self_attention_relations(s, t, relation_heads=2, key_mask=torch.zeros(1, 3))
    empty.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in s.values())


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"relations": ["query", "query"]}, "distinct names"),
        ({"relations": ["queries"]}, "distinct names"),
        ({"relations": []}, "non-empty"),
        ({"relation_heads": 0}, "positive integer"),
        ({"relation_heads": 2.5}, "positive integer"),
        ({"relation_heads": 3}, "does not divide the projection width 4"),
    ],
)
def test_loss_refuses_bad_parameters(params, message):
    x = {n: torch.randn(1, 2, 4) for n in NAMES}
    with pytest.raises(ValueError, match=message):
        self_attention_relations(x, x, **params)


def test_bad_parameters_are_refused_when_the_term_is_parsed():
    with pytest.raises(ValueError, match="distinct names"):
        parse_term({"knowledge": "attention_relation", "loss": "kl", "relations": ["qk"]})
    with pytest.raises(ValueError, match="layer_map"):
        parse_term({"knowledge": "attention_relation", "loss": "kl", "layer_map": [[0]]})
    term = parse_term({"knowledge": "attention_relation", "loss": "kl", "relation_heads": 48})
    assert term.layer_map == "last" and term.params == {"relation_heads": 48}


# ---- through the trainer: hooks, padding, other head counts ------------------------------------------------


def distilbert(layers, hidden, seed):
    config = DistilBertConfig(
        vocab_size=VOCAB, dim=hidden, n_layers=layers, n_heads=hidden // 8, hidden_dim=2 * hidden,
        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, pad_token_id=0, num_labels=2,
        initializer_range=WIDE,
    )  # fmt: skip
    return seeded(DistilBertForSequenceClassification, config, seed)


# Weights drawn wider than the default 0.02, so relations are far from uniform and the values far from 0.
WIDE = 0.3
# family -> (build(layers, width, seed): student width 16 with 2 heads, teacher 32 with 4, tokenizer, causal LM)
FAMILIES = {
    "bert-2v4heads": (
        lambda n, h, s: seeded(
            BertForSequenceClassification, bert_config(n, h, heads=h // 8, initializer_range=WIDE), s
        ),
        "bert",
        False,
    ),
    "distilbert-2v4heads": (distilbert, "bert", False),
    "llama-gqa": (
        lambda n, h, s: seeded(LlamaForCausalLM, llama_config(n, h, heads=h // 8, initializer_range=WIDE), s),
        "llama",
        True,
    ),
}


def projections(model, layer: int, hidden: torch.Tensor) -> dict:
    """q, k, v of one attention layer recomputed from its input hidden state, calling the projections directly."""
    root = getattr(model, model.base_model_prefix)
    if hasattr(root, "encoder"):  # BERT: the layer's input feeds the projections
        attention = root.encoder.layer[layer].attention.self
        return {n: getattr(attention, n)(hidden) for n in NAMES}
    if hasattr(root, "transformer"):  # DistilBERT
        attention = root.transformer.layer[layer].attention
        return {n: getattr(attention, f"{n[0]}_lin")(hidden) for n in NAMES}
    block = root.layers[layer]  # Llama: pre-norm
    normed = block.input_layernorm(hidden)
    return {n: getattr(block.self_attn, f"{n[0]}_proj")(normed) for n in NAMES}


def reference_sums(trainer, row) -> float:
    """Σ over the example's tokens of the term's value, from its hidden states run alone (float64 maths)."""
    term = trainer.terms[0]
    sides = []
    for model, index in ((trainer.student, 0), (trainer.teacher, 1)):
        inputs = {k: torch.tensor([v]) for k, v in row.items() if k in forward_keys(model)}
        with torch.no_grad():
            hidden = model(**inputs, output_hidden_states=True).hidden_states
            sides.append({p[index]: projections(model, p[index], hidden[p[index]]) for p in term.pairs})
    total = 0.0
    for s, t in term.pairs:
        student = {n: sides[0][s][n][0].double() for n in term.relations}
        teacher = {n: sides[1][t][n][0].double() for n in term.relations}
        total += sum(relation_ref(student, teacher, term.params["relation_heads"], term.relations))
    return total / len(term.pairs)


CASES = [
    ("bert-2v4heads", "right", {}),
    ("bert-2v4heads", "left", {"layer_map": [[0, 1], [1, 3]], "relations": ["value"]}),
    ("distilbert-2v4heads", "right", {"layer_map": [[1, 2]], "relation_heads": 8}),
    ("llama-gqa", "right", {"layer_map": [[0, 1], [1, 3]]}),
    ("llama-gqa", "left", {"relation_heads": 8, "relations": ["key", "query"]}),
]


@pytest.mark.parametrize(("family", "side", "params"), CASES)
def test_values_of_a_padded_batch_are_the_reference_on_examples_alone(
    family, side, params, tmp_path, monkeypatch
):
    monkeypatch.setitem(test_padding.FAMILIES, family, FAMILIES[family])
    monkeypatch.setitem(
        test_padding.TERMS, "rel", {"knowledge": "attention_relation", "loss": "kl", **params}
    )
    trainer, features = test_padding.make(family, "rel", "hf", side, False, tmp_path)
    term = trainer.terms[0]
    assert term.params["relation_heads"] == params.get("relation_heads", 4)  # default: the teacher's heads
    got = per_example(trainer, features)["distill/attention_relation_kl"]
    assert all(not c.outputs for c in term.captures.values())  # read once, then dropped
    for i, row in enumerate(features):
        assert math.isclose(got[i].item(), reference_sums(trainer, row), rel_tol=1e-4, abs_tol=1e-6), i


def test_models_without_known_projections_are_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(test_padding.TERMS, "rel", {"knowledge": "attention_relation", "loss": "kl"})
    with pytest.raises(ValueError, match=r"student \(GPT2LMHeadModel\) has none llmkd knows"):
        test_padding.make("gpt2-lm", "rel", "hf", "right", False, tmp_path)


def test_relation_heads_must_divide_every_width(llama_pair, tmp_path):
    teacher, student = llama_pair
    term = {"knowledge": "attention_relation", "loss": "kl", "relation_heads": 3}
    with pytest.raises(ValueError, match="relation_heads=3 does not divide the student's query width 16"):
        make_trainer(teacher, student, "lm", tmp_path, [term])


def test_a_teacher_without_a_model_is_refused(llama_pair):
    teacher, student = llama_pair

    class LogitsOnly(TeacherSource):  # what a logit cache looks like to a term: a config, no model
        provides, task, config = frozenset({"logits", "topk"}), "causal_lm", teacher.config

    term = parse_term({"knowledge": "attention_relation", "loss": "kl"})
    pair = Pair(student, LogitsOnly(), args=None, task="causal_lm")
    with pytest.raises(ValueError, match="has no model .a logit cache.; use a live teacher"):
        AttentionRelationKnowledge(term, pair)


def test_reentrant_checkpointing_is_refused(llama_pair, tmp_path):
    teacher, student = llama_pair
    with pytest.raises(ValueError, match="use_reentrant=True"):
        make_trainer(
            teacher, student, "lm", tmp_path, [{"knowledge": "attention_relation", "loss": "kl"}],
            activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True},
        )  # fmt: skip


RELATION = {"knowledge": "attention_relation", "loss": "kl", "layer_map": [[0, 1], [1, 3]]}


@pytest.fixture
def wide_pair():
    """(teacher, student) Llama pair (GQA teacher) with wide weights: relations far from uniform."""
    build = FAMILIES["llama-gqa"][0]
    return build(4, 32, 0), build(2, 16, 1)


def test_gradient_checkpointing_gives_the_same_update_and_keeps_nothing(wide_pair, tmp_path):
    """The backward pass re-runs checkpointed layers (and their hooks): nothing is captured then, and the update
    is the one without checkpointing."""
    data = lm_dataset(4, seed=2)
    plain = update(wide_pair, [RELATION], "lm", tmp_path / "a", data, 4, 1)
    teacher, student = (copy.deepcopy(m) for m in wide_pair)
    start = copy.deepcopy(student.state_dict())
    trainer = make_trainer(
        teacher, student, "lm", tmp_path / "b", [RELATION], train=data, per_device_train_batch_size=4,
        max_steps=1, optim="sgd", learning_rate=0.5, max_grad_norm=0.0, activation_checkpointing=True,
    )  # fmt: skip
    trainer.train()
    assert student.model.gradient_checkpointing
    assert all(not c.outputs for c in trainer.terms[0].captures.values())
    assert max(v.abs().max().item() for v in plain.values()) > 1e-4
    assert gap(plain, {k: v - start[k] for k, v in student.state_dict().items() if k in start}) < 1e-4


def test_hooks_leave_with_the_trainer(llama_pair, tmp_path):
    teacher, student = llama_pair
    hooked = [student.model.layers[1].self_attn.q_proj, teacher.model.layers[3].self_attn.v_proj]
    trainer = make_trainer(
        teacher, student, "lm", tmp_path, [{"knowledge": "attention_relation", "loss": "kl"}], max_steps=1
    )
    assert all(len(m._forward_hooks) == 1 for m in hooked)  # the last layers ("last"), one hook each
    assert all(len(m._forward_pre_hooks) == 1 for m in (student, teacher))  # arms the capture per forward
    trainer.train()
    del trainer
    gc.collect()
    for module in (*hooked, student, teacher):
        assert len(module._forward_hooks) == 0 and len(module._forward_pre_hooks) == 0


def test_accumulation_gives_the_update_of_one_big_batch(wide_pair, tmp_path):
    data = lm_dataset(8, seed=5)
    terms = [RELATION]
    full = update(wide_pair, terms, "lm", tmp_path / "a", data, 8, 1)
    assert max(v.abs().max().item() for v in full.values()) > 1e-4
    split = update(wide_pair, terms, "lm", tmp_path / "b", data, 2, 4)
    assert gap(full, split) < 1e-4
    broken = update(wide_pair, terms, "lm", tmp_path / "c", data, 2, 4, trainer_cls=PerBatchMeanTrainer)
    assert gap(full, broken) > 1e-2  # the control: per-batch means weight short rows too much


@pytest.mark.multiprocess
def test_two_process_ddp_matches_one_process(tmp_path):
    single = tmp_path / "single"
    train_and_dump(str(single), per_device_batch=4, accumulation=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "tests" / "relation_worker.py"), str(tmp_path / "ddp"),
    ]  # fmt: skip
    done = run_launcher(cmd, clean=[tmp_path / "ddp"], env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ddp" / "world_size.txt").read_text() == "2"
    start = seeded(LlamaForCausalLM, llama_config(layers=2, hidden=16, heads=2), 1).state_dict()
    moved = load_file(single / "student.safetensors")
    assert max((moved[k] - start[k]).abs().max().item() for k in start) > 1e-3
    for name in ("student.safetensors", "projectors.safetensors"):
        one, two = load_file(single / name), load_file(tmp_path / "ddp" / name)
        assert one.keys() == two.keys() and len(one)
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=f"{name}:{key}")


def test_recipe_smoke(demo, tmp_path):  # noqa: F811  (demo: the fixture imported above)
    report = distill(
        str(ROOT / "recipes" / "methods" / "minilm_relations.yaml"), recipe_flags(demo, tmp_path / "out")
    )
    assert report["student"]["layers"] == 2
    assert math.isfinite(report["eval"]["eval_distill/attention_relation_kl"])
    assert (tmp_path / "out" / "model.safetensors").is_file()
