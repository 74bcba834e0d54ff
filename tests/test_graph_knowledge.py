"""Graph (IRG) and flow (FSP) knowledge: float64 references written from the papers, padding, accumulation, recipes.

The references below re-implement each formula with Python loops in float64 from the papers' definitions (Liu et
al. 2019, IRG; Yim et al. 2017, FSP), not from llmkd's code; the trainer-level tests recompute every example
alone (no padding) and compare with the trainer's values on a padded batch.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import test_padding
import torch
from conftest import (
    BertForSequenceClassification,
    bert_config,
    classification_dataset,
    make_tokenizer,
    seeded,
    sentences,
)
from test_padding import assert_invariant, per_example
from test_trainer import make_trainer

from llmkd.cli.pipeline import distill
from llmkd.knowledge import parse_term
from llmkd.losses import LOSSES
from llmkd.losses.graph import flow_matrix, fsp, irg

F64 = torch.float64
ROOT = Path(__file__).resolve().parent.parent


# ---- references (loops, float64) ---------------------------------------------------------------------------


def sq_dist(a, b) -> float:
    return sum((float(x) - float(y)) ** 2 for x, y in zip(a, b, strict=True))


def edges_ref(x) -> list[list[float]]:
    d = [[sq_dist(x[i], x[j]) for j in range(len(x))] for i in range(len(x))]
    top = max(max(max(row) for row in d), 1e-12)
    return [[v / top for v in row] for row in d]


def irg_ref(student, teacher, vertex=None, lv=1.0, le=1.0, lt=1.0) -> float:
    """Liu et al. 2019: λ_V·vertex MSE (top layer) + λ_E·mean edge MSE + λ_T·mean vertex-transformation MSE."""
    layers, n = len(student), len(student[0])
    vertex = student[-1] if vertex is None else vertex
    v = sum(sq_dist(vertex[i], teacher[-1][i]) for i in range(n)) / (n * len(teacher[-1][0]))
    e = 0.0
    for s, t in zip(student, teacher):
        es, et = edges_ref(s), edges_ref(t)
        e += sum((es[i][j] - et[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2
    tr = 0.0
    for k in range(layers - 1):
        moves = []
        for side in (student, teacher):
            m = [sq_dist(side[k][i], side[k + 1][i]) for i in range(n)]
            moves.append([x / max(max(m), 1e-12) for x in m])
        tr += sum((a - b) ** 2 for a, b in zip(*moves)) / n
    return lv * v + le * e / layers + (lt * tr / (layers - 1) if layers > 1 else 0.0)


def gram_ref(f1, f2) -> list[list[float]]:
    """G_ij = Σ_t F1[t, i] F2[t, j] / n over the n rows (real tokens) given."""
    n = len(f1)
    return [
        [sum(float(f1[t][i]) * float(f2[t][j]) for t in range(n)) / n for j in range(len(f2[0]))]
        for i in range(len(f1[0]))
    ]


def fsp_ref(s1, s2, t1, t2) -> float:
    gs, gt = gram_ref(s1, s2), gram_ref(t1, t2)
    return sum((a - b) ** 2 for ra, rb in zip(gs, gt) for a, b in zip(ra, rb))


# ---- the pure losses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.3, 2.0, 0.0), (0.0, 0.0, 5.0)])
def test_irg_matches_the_paper_formula(weights):
    g = torch.Generator().manual_seed(0)
    student, teacher = (
        torch.randn(3, 5, 4, generator=g, dtype=F64),
        torch.randn(3, 5, 6, generator=g, dtype=F64),
    )
    vertex = torch.randn(5, 6, generator=g, dtype=F64)
    lv, le, lt = weights
    got = irg(student, teacher, vertex, lambda_vertex=lv, lambda_edge=le, lambda_transform=lt)
    assert got.dtype == F64
    assert math.isclose(got.item(), irg_ref(student, teacher, vertex, lv, le, lt), rel_tol=1e-10)
    # controls: another teacher changes it; the teacher against itself gives exactly 0
    other = irg(student, teacher.flip(1), vertex, lambda_vertex=lv, lambda_edge=le, lambda_transform=lt)
    assert abs(other.item() - got.item()) > 1e-3
    assert irg(teacher, teacher).item() == 0.0


def test_irg_is_finite_for_duplicates_and_single_examples():
    x = torch.ones(2, 3, 4, requires_grad=True)  # every example identical: distances 0 / max clamped
    irg(x, torch.randn(2, 3, 4)).backward()
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(irg(torch.randn(2, 1, 4), torch.randn(2, 1, 4)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lambda_edge": -1.0}, "lambda_edge must be a finite number >= 0"),
        ({"lambda_vertex": float("nan")}, "lambda_vertex"),
        ({"lambda_transform": True}, "lambda_transform"),
    ],
)
def test_irg_refuses_bad_weights(kwargs, message):
    with pytest.raises(ValueError, match=message):
        irg(torch.randn(2, 3, 4), torch.randn(2, 3, 4), **kwargs)


def test_irg_refuses_shapes_it_cannot_compare():
    with pytest.raises(ValueError, match="project the student"):
        irg(torch.randn(2, 3, 4), torch.randn(2, 3, 8))  # vertex widths differ, no projection
    assert torch.isfinite(irg(torch.randn(2, 3, 4), torch.randn(2, 3, 8), lambda_vertex=0.0))
    with pytest.raises(ValueError, match="lambda_transform: 0"):
        irg(torch.randn(1, 3, 4), torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="same layers and examples"):
        irg(torch.randn(2, 3, 4), torch.randn(2, 4, 4))


def test_fsp_matches_the_paper_formula_over_real_tokens_only():
    g = torch.Generator().manual_seed(1)
    lengths = [3, 7, 5]
    s1, s2 = torch.randn(3, 7, 4, generator=g, dtype=F64), torch.randn(3, 7, 4, generator=g, dtype=F64)
    t1, t2 = torch.randn(3, 7, 4, generator=g, dtype=F64), torch.randn(3, 7, 4, generator=g, dtype=F64)
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    for x in (s1, s2, t1, t2):  # padded positions may hold anything: they must not count
        x[mask == 0] = 1e6
    got = fsp(flow_matrix(s1, s2, mask), flow_matrix(t1, t2, mask))
    want = [fsp_ref(s1[b, :n], s2[b, :n], t1[b, :n], t2[b, :n]) for b, n in enumerate(lengths)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), rtol=1e-10, atol=0)
    assert (fsp(flow_matrix(t1, t2, mask), flow_matrix(t1, t2, mask)) == 0).all()  # control: itself gives 0
    unmasked = fsp(flow_matrix(s1, s2), flow_matrix(t1, t2))  # control: counting padding changes every row
    assert not torch.allclose(unmasked, got)
    with pytest.raises(ValueError, match="project the student"):
        fsp(torch.randn(2, 4, 4), torch.randn(2, 8, 8))


def test_losses_are_registered_with_their_parameters():
    assert LOSSES["graph"]["irg"].params == {"lambda_vertex", "lambda_edge", "lambda_transform"}
    assert LOSSES["flow"]["fsp"].params == frozenset()


# ---- parsing and set-up ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"knowledge": "flow", "loss": "fsp", "layer_map": [[1, 2]]}, r"\[\[student_from, student_to\]"),
        ({"knowledge": "flow", "loss": "fsp", "layer_map": "last"}, "flow"),
        ({"knowledge": "graph", "loss": "irg", "lambda_edge": -2}, "lambda_edge"),
        ({"knowledge": "graph", "loss": "irg", "alpha": 1}, "takes no"),
    ],
)
def test_bad_terms_are_refused_when_parsed(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_term(spec)


@pytest.mark.parametrize(
    ("term", "message"),
    [
        (
            {"knowledge": "flow", "loss": "fsp", "layer_map": [[[0, 1], [0, 9]]]},
            "teacher index 9 is out of range",
        ),
        ({"knowledge": "graph", "loss": "irg", "layer_map": "last"}, "map at least two layer pairs"),
    ],
)
def test_bad_layer_maps_are_refused_before_training(term, message, bert_pair, tmp_path):
    teacher, student = bert_pair
    with pytest.raises(ValueError, match=message):
        make_trainer(teacher, student, "cls", tmp_path, [term])


def test_irg_edges_need_three_examples_per_micro_batch(bert_pair, tmp_path):
    # Edges normalised by the batch's largest distance are [[0, 1], [1, 0]] for any 2 examples: always 0.
    pairs = torch.randn(2, 2, 5, dtype=torch.float64), torch.randn(2, 2, 7, dtype=torch.float64)
    assert irg(*pairs, lambda_vertex=0.0, lambda_transform=0.0).item() == 0.0
    assert irg(*(torch.randn(2, 3, d) for d in (5, 7)), lambda_vertex=0.0, lambda_transform=0.0).item() > 0
    teacher, student = bert_pair
    term = {"knowledge": "graph", "loss": "irg", "layer_map": [[1, 2], [2, 4]]}
    with pytest.raises(ValueError, match="per_device_train_batch_size=2"):
        make_trainer(teacher, student, "cls", tmp_path, [term], per_device_train_batch_size=2)
    make_trainer(
        teacher, student, "cls", tmp_path, [term | {"lambda_edge": 0.0}], per_device_train_batch_size=2
    )


def test_flow_uniform_map_is_the_flow_through_each_student_block(bert_pair, tmp_path):
    teacher, student = bert_pair  # 2 student layers, 4 teacher layers
    trainer = make_trainer(teacher, student, "cls", tmp_path, [{"knowledge": "flow", "loss": "fsp"}])
    assert trainer.terms[0].pairs == [((0, 1), (0, 2)), ((1, 2), (2, 4))]
    assert len(trainer.auxiliary_modules) == 1  # widths 16 vs 32: one learnt projector


# ---- through the trainer: padded batches against each example alone ---------------------------------------

GRAPH = {"knowledge": "graph", "loss": "irg", "layer_map": [[1, 2], [2, 4]], "lambda_vertex": 0.5}
FLOW = {"knowledge": "flow", "loss": "fsp"}


def alone(model, row) -> tuple:
    """Hidden states of one example run alone (no padding), in float64 off the model's float32."""
    keys = ("input_ids", "attention_mask", "token_type_ids")
    inputs = {k: torch.tensor([row[k]]) for k in keys if k in row}
    with torch.no_grad():
        return tuple(h[0].double() for h in model(**inputs, output_hidden_states=True).hidden_states)


def projector(trainer):
    module = trainer.auxiliary_modules[str(trainer.terms[0].index)]
    weight, bias = module.weight.detach().double(), module.bias.detach().double()
    return lambda x: x @ weight.T + bias


@pytest.mark.parametrize("family", ["bert-cls", "llama-lm", "llama-cls"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_irg_of_a_padded_batch_is_the_reference_on_examples_alone(family, side, tmp_path, monkeypatch):
    monkeypatch.setitem(test_padding.TERMS, "graph", GRAPH)
    trainer, features = test_padding.make(family, "graph", "hf", side, False, tmp_path)
    got = per_example(trainer, features)["distill/graph_irg"]
    causal = test_padding.FAMILIES[family][2] or family == "llama-cls"
    first = lambda h: h.mean(0) if causal else h[0]  # noqa: E731  (decoders: mean of real tokens; else [CLS])
    s_alone = [alone(trainer.student, row) for row in features]
    t_alone = [alone(trainer.teacher, row) for row in features]
    student = [[first(h[s]) for h in s_alone] for s, _ in trainer.terms[0].pairs]
    teacher = [[first(h[t]) for h in t_alone] for _, t in trainer.terms[0].pairs]
    vertex = [projector(trainer)(first(h[2])) for h in s_alone]
    want = irg_ref(student, teacher, vertex, lv=0.5)
    torch.testing.assert_close(got, torch.full_like(got, want), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["bert-cls", "llama-lm", "llama-cls"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_fsp_of_a_padded_batch_is_the_reference_on_examples_alone(family, side, tmp_path, monkeypatch):
    monkeypatch.setitem(test_padding.TERMS, "flow", FLOW)
    trainer, features = test_padding.make(family, "flow", "hf", side, False, tmp_path)
    assert_invariant(trainer, features)
    got = per_example(trainer, features)["distill/flow_fsp"]
    project = projector(trainer)
    for i, row in enumerate(features):
        hs, ht = alone(trainer.student, row), alone(trainer.teacher, row)
        pairs = trainer.terms[0].pairs
        want = sum(fsp_ref(project(hs[a]), project(hs[b]), ht[c], ht[d]) for (a, b), (c, d) in pairs)
        assert math.isclose(got[i].item(), want / len(pairs), rel_tol=1e-4), (i, got[i].item(), want)


# ---- accumulation: the window's update -------------------------------------------------------------------


def update(pair, terms, task, tmp_path, data, batch, accumulation, **overrides) -> dict:
    teacher, student = (copy.deepcopy(m) for m in pair)
    start = copy.deepcopy(student.state_dict())
    trainer = make_trainer(
        teacher, student, task, tmp_path, terms, train=data, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=0.5,
        max_grad_norm=0.0, **overrides,
    )  # fmt: skip
    trainer.train()
    return {k: v - start[k] for k, v in student.state_dict().items() if k in start}


def gap(a: dict, b: dict) -> float:
    """Largest relative difference of two updates, tensor by tensor. The floor: attention key biases get no
    gradient (softmax ignores a shift common to every key), so their ~1e-11 updates are float noise."""
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-6)).item() for k in a)


def test_fsp_accumulation_gives_the_update_of_one_big_batch(bert_pair, tmp_path):
    data = classification_dataset(8, seed=4)
    full = update(bert_pair, [FLOW], "cls", tmp_path / "a", data, 8, 1)
    assert max(v.abs().max().item() for v in full.values()) > 1e-4
    split = update(bert_pair, [FLOW], "cls", tmp_path / "b", data, 2, 4)
    assert gap(full, split) < 1e-4


def test_irg_accumulation_weighs_each_batch_by_its_examples(bert_pair, tmp_path):
    """IRG is one number per batch: a window of two batches of 4 is the mean of the two batches' updates
    (each weighs 4/8); one batch of 8 relates all 8 examples and differs (the control)."""
    data = classification_dataset(8, seed=4)
    settings = {"train_sampling_strategy": "sequential"}
    window = update(bert_pair, [GRAPH], "cls", tmp_path / "w", data, 4, 2, **settings)
    halves = [
        update(
            bert_pair,
            [GRAPH],
            "cls",
            tmp_path / f"h{i}",
            data.select(range(4 * i, 4 * i + 4)),
            4,
            1,
            **settings,
        )
        for i in range(2)
    ]
    assert max(v.abs().max().item() for v in window.values()) > 1e-4
    assert gap(window, {k: (halves[0][k] + halves[1][k]) / 2 for k in window}) < 1e-4
    whole = update(bert_pair, [GRAPH], "cls", tmp_path / "x", data, 8, 1, **settings)
    assert gap(window, whole) > 1e-2


# ---- recipes ------------------------------------------------------------------------------------------------


def tiny_demo(root):
    """A 6-layer BERT 'teacher' (width 48, 12 heads: the demo's head count) with the demo's labels, and data."""
    config = bert_config(layers=6, hidden=48, heads=12, id2label={0: "negative", 1: "positive"})
    config.label2id = {"negative": 0, "positive": 1}
    seeded(BertForSequenceClassification, config, 0).save_pretrained(root / "teacher")
    make_tokenizer("bert").save_pretrained(root / "teacher")
    for split, n in (("train", 40), ("validation", 16)):
        rows = [{"sentence": s, "label": int("w1" in s)} for s in sentences(n, seed=n)]
        (root / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def recipe_flags(demo, out) -> list[str]:
    return [
        "--smoke", "--teacher", str(demo / "teacher"), "--train_file", str(demo / "train.jsonl"),
        "--validation_file", str(demo / "validation.jsonl"), "--output_dir", str(out), "--use_cpu", "true",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return tiny_demo(tmp_path_factory.mktemp("demo"))


@pytest.mark.parametrize(("name", "term"), [("irg", "distill/graph_irg"), ("fsp", "distill/flow_fsp")])
def test_recipe_smoke(name, term, demo, tmp_path):
    """The shipped recipe end to end on tiny local models: its term trains, is logged and evaluated."""
    report = distill(str(ROOT / "recipes" / "methods" / f"{name}.yaml"), recipe_flags(demo, tmp_path / "out"))
    assert report["student"]["layers"] == 2  # student_layers: [0, 3] of the 6-layer teacher
    assert math.isfinite(report["eval"][f"eval_{term}"]) and "eval_accuracy" in report["eval"]
    assert (tmp_path / "out" / "model.safetensors").is_file()
