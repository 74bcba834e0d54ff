"""Multi-teacher distillation: the combinations vs float64 references, the ensemble source vs plain teachers,
teachers with other tokenizers, the padding / accumulation / resume / 2-process properties and the YAML path."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import sys

import ensemble_worker as tiny
import pytest
import torch
import yaml
from conftest import (
    LlamaForCausalLM,
    bert_config,
    llama_config,
    lm_dataset,
    make_tokenizer,
    run_launcher,
    seeded,
    training_settings,
)
from safetensors.torch import load_file
from transformers import DataCollatorWithPadding, LlamaForSequenceClassification

from llmkd import DistillationConfig, DistillationTrainer
from llmkd.data.loading import tokenize
from llmkd.losses.ensemble import COMBINATIONS, combine_teachers, random_teacher
from llmkd.modeling import SEQ_CLS
from llmkd.teachers.ensemble import EnsembleTeacher, label_order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGITS, HIDDEN = {"knowledge": "logits", "loss": "forward_kl"}, {"knowledge": "hidden", "loss": "mse"}

# ---- the combinations, against naive float64 re-implementations of the formulas ---------------------------------


def naive_weights(z, mode, a=None, route=None, draw=None):
    """w[i][b] from (n, B, C) float64 logits, one example at a time."""
    n, batch, _ = z.shape
    out = [[0.0] * batch for _ in range(n)]
    for b in range(batch):
        exps = [[math.exp(v) for v in z[i, b].tolist()] for i in range(n)]
        probs = [[x / sum(e) for x in e] for e in exps]
        if mode == "mean":
            raw = [1.0] * n
        elif mode in ("weights", "random") and draw is None:
            raw = list(a)
        elif mode == "random":
            raw = [float(i == draw) for i in range(n)]
        elif mode == "route":
            raw = [float(i == route[b]) for i in range(n)]
        elif mode == "confidence":
            raw = [max(p) for p in probs]
        else:  # entropy: softmax of -H
            raw = [math.exp(sum(q * math.log(q) for q in p)) for p in probs]
        for i in range(n):
            out[i][b] = raw[i] / sum(raw)
    return out


def naive_mixture(z, w, temperature):
    """T · log Σ_i w_i softmax(z_i / T), per example and class, in float64."""
    n, batch, classes = z.shape
    out = torch.empty(batch, classes, dtype=torch.float64)
    for b in range(batch):
        mix = [0.0] * classes
        for i in range(n):
            e = [math.exp(v / temperature) for v in z[i, b].tolist()]
            for c in range(classes):
                mix[c] += w[i][b] * e[c] / sum(e)
        out[b] = torch.tensor([temperature * math.log(m) for m in mix])
    return out


@pytest.mark.parametrize("mode", COMBINATIONS)
@pytest.mark.parametrize("shape", [(3, 5, 4), (2, 3, 4, 6)], ids=["classifier", "causal_lm"])
def test_combinations_match_the_float64_formulas(mode, shape):
    torch.manual_seed(0)
    z = torch.randn(shape, dtype=torch.float64) * 3
    n, temperature, a = shape[0], 2.0, [1.0, 3.0, 0.5][: shape[0]]
    route = torch.randint(0, n, shape[1:2])
    kwargs = {"weights": a, "route": route, "draw": 1 if mode == "random" else None}
    got = combine_teachers(z.float(), mode, temperature, **kwargs)
    flat = z.flatten(1, -2)  # causal LMs: every position is an example (the route is per sequence)
    per_position = route.repeat_interleave(flat.shape[1] // shape[1])
    weights = naive_weights(flat, mode, a, per_position.tolist(), kwargs["draw"])
    want = naive_mixture(flat, weights, temperature)
    torch.testing.assert_close(got.double().flatten(0, -2), want, rtol=1e-5, atol=1e-5)
    # softmax(z / T) is the mixture itself: a logit loss at T compares the student with it
    assert got.double().div(temperature).logsumexp(-1).abs().max() < 1e-5
    if mode in ("mean", "confidence", "entropy"):  # control: mixing logits instead of probabilities is not it
        naive = combine_teachers(z.mean(0, keepdim=True).float(), "mean", temperature)
        assert not torch.allclose(naive.double().flatten(0, -2), want, atol=1e-3)


def test_random_draw_is_a_function_of_seed_and_step_only():
    state = torch.random.get_rng_state()
    draws = [random_teacher(7, step, [1.0, 1.0, 2.0]) for step in range(4000)]
    assert torch.equal(torch.random.get_rng_state(), state)  # no generator consumed: dropout etc. unchanged
    assert draws == [random_teacher(7, step, [1.0, 1.0, 2.0]) for step in range(4000)]
    shares = [draws.count(i) / len(draws) for i in range(3)]
    assert all(abs(s - e) < 0.03 for s, e in zip(shares, (0.25, 0.25, 0.5))), shares
    assert draws != [random_teacher(8, step, [1.0, 1.0, 2.0]) for step in range(4000)]  # the seed matters
    assert 1 not in {random_teacher(7, step, [1.0, 0.0, 1.0]) for step in range(500)}  # weight 0: never


def test_label_spaces_are_aligned_by_name():
    def config(names):
        return bert_config(num_labels=len(names), id2label=dict(enumerate(names)))

    student = config(["neg", "pos", "neu"])
    order = label_order(student, {"a": config(["neg", "pos", "neu"]), "b": config(["pos", "neu", "neg"])})
    assert order["a"] is None
    member_logits = torch.tensor([[10.0, 20.0, 30.0]])  # pos, neu, neg
    assert member_logits[:, order["b"]].tolist() == [[30.0, 10.0, 20.0]]  # neg, pos, neu
    generic = bert_config(num_labels=3)  # a student without names: the first named teacher's order is the one
    order = label_order(generic, {"a": generic, "b": config(["pos", "neu", "neg"]), "c": student})
    assert order["a"] is None and order["b"] is None and order["c"].tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="aligns teachers by class name"):
        label_order(student, {"c": config(["neg", "pos", "other"])})
    with pytest.raises(ValueError, match="num_labels=2"):
        label_order(student, {"d": config(["neg", "pos"])})


def test_one_teacher_ensemble_is_the_live_teacher(tmp_path):
    terms, teacher = [LOGITS, HIDDEN, {"knowledge": "relation", "loss": "rkd_distance"}], tiny.bert()

    def run(source, folder, terms):
        return tiny.loss_and_grads(tiny.trainer_for(source, tmp_path / folder, terms=terms))

    plain = run(teacher, "a", terms)
    tiny.assert_same(plain, run(EnsembleTeacher({"t": teacher}), "b", terms))
    named = [LOGITS, *({**term, "teacher": "t"} for term in terms[1:])]
    other = tiny.bert(seed=5)
    kept = EnsembleTeacher({"t": teacher, "o": other}, "weights", {"t": 1.0, "o": 0.0})
    tiny.assert_same(plain, run(kept, "c", named))
    # the control: the same two teachers with another weight give another loss and other gradients
    mixed = EnsembleTeacher({"t": teacher, "o": other}, "weights", {"t": 0.5, "o": 0.5})
    tiny.assert_same(plain, run(mixed, "d", named), same=False)


def test_one_teacher_ensemble_is_the_live_causal_lm_teacher(tmp_path):
    teacher = seeded(LlamaForCausalLM, llama_config(), 0)
    student = seeded(LlamaForCausalLM, llama_config(layers=2, hidden=16), 1)
    tok = make_tokenizer("llama")
    results = []
    for source, extra in ((teacher, {"fused_logits": False}), (EnsembleTeacher({"t": teacher}), {})):
        settings = training_settings(tmp_path, terms=[LOGITS], hard_label_weight=0.0, **extra)
        trainer = DistillationTrainer(
            model=copy.deepcopy(student), teacher=source, args=DistillationConfig(**settings),
            train_dataset=lm_dataset(4), processing_class=tok,
        )  # fmt: skip
        results.append(tiny.loss_and_grads(trainer, rows=4))
    tiny.assert_same(*results)


def test_teachers_with_other_vocabularies_teach_one_student(tmp_path):
    """A BERT-vocabulary teacher reads the student's ids, a RoBERTa-style one (other ids, other size) its own."""
    source = tiny.ensemble("mean")
    trainer = tiny.trainer_for(source, tmp_path, terms=tiny.TERMS, max_steps=2)
    rows = [trainer.train_dataset[i] for i in range(6)]
    assert len({len(r["teacher@roberta.input_ids"]) for r in rows}) > 1  # padding happens in its stream too
    out, members = source.outputs(trainer.data_collator(rows), {}), source.sources
    for b, text in enumerate(
        tiny.raw_data(8)["text"][:6]
    ):  # each member alone, on its own tokenisation of the sentence
        alone = {
            name: members[name].model(**tok(text, return_tensors="pt")).logits[0].double()
            for name, tok in (("bert", make_tokenizer("bert")), ("roberta", tiny.other_tokenizer()))
        }
        torch.testing.assert_close(
            out.members["roberta"].logits[b].double(), alone["roberta"], atol=1e-5, rtol=1e-5
        )
        want = naive_mixture(torch.stack(list(alone.values())).unsqueeze(1), [[0.5], [0.5]], 2.0)[0]
        torch.testing.assert_close(out.logits[b].double(), want, atol=1e-5, rtol=1e-5)
    before = copy.deepcopy(trainer.model.state_dict())
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_a_padded_batch_gives_each_example_its_values_alone(tmp_path):
    """Both streams padded (the student's and a decoder classifier's own, whose pad id is 1, not the collator's 0)."""
    config = llama_config(2, 16, vocab_size=len(tiny.other_tokenizer()), num_labels=2, initializer_range=0.5)
    config.pad_token_id = 1
    decoder = seeded(LlamaForSequenceClassification, config, 3)
    source = EnsembleTeacher(
        {"bert": tiny.bert(), "llama": decoder}, "entropy", tokenizers={"llama": tiny.other_tokenizer()}
    )
    trainer = tiny.trainer_for(source, tmp_path)
    rows = [trainer.train_dataset[i] for i in range(6)]
    padded = source.outputs(trainer.data_collator(rows), {})
    for b, row in enumerate(rows):
        alone = source.outputs(trainer.data_collator([row]), {})
        torch.testing.assert_close(padded.logits[b], alone.logits[0], atol=1e-5, rtol=1e-5)
    # the control: read as collated (0 in the padded slots) the decoder pools a padded slot of shorter rows
    raw = source.sources["llama"].outputs(trainer.data_collator(rows), {}).logits
    assert not torch.allclose(raw, padded.members["llama"].logits, atol=1e-3)


def test_left_and_right_padding_give_the_same_loss(tmp_path):
    results = []
    for side in ("right", "left"):
        tok = make_tokenizer("bert")
        tok.padding_side = side
        source = EnsembleTeacher({"a": tiny.bert(), "b": tiny.bert(seed=5)}, "confidence")
        terms = [LOGITS, {**HIDDEN, "teacher": "b"}]
        trainer = tiny.trainer_for(
            source, tmp_path / side, collator=DataCollatorWithPadding(tok), terms=terms
        )
        results.append(tiny.loss_and_grads(trainer))
    tiny.assert_same(*results)


def one_step_update(tmp_path, batch, accumulation):
    student = tiny.small_student()
    start = copy.deepcopy(student.state_dict())
    source = tiny.ensemble("confidence")
    trainer = tiny.trainer_for(
        source, tmp_path, student=student, terms=tiny.TERMS, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
    )  # fmt: skip
    trainer.train()
    return {k: v - start[k] for k, v in student.state_dict().items() if k in start}


def test_accumulation_gives_the_update_of_one_batch(tmp_path):
    full = one_step_update(tmp_path / "a", 8, 1)
    assert max(v.abs().max().item() for v in full.values()) > 1e-4
    split = one_step_update(tmp_path / "b", 2, 4)
    for key in full:
        torch.testing.assert_close(split[key], full[key], rtol=1e-4, atol=1e-6, msg=key)


def test_random_draws_survive_a_resume(tmp_path):
    def run(folder, resume=None):
        source = tiny.ensemble("random")
        draws = tiny.record_draws(source)
        settings = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=4)
        trainer = tiny.trainer_for(source, folder, terms=tiny.TERMS, seed=2, **settings)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, sorted(set(draws))

    full, full_draws = run(tmp_path / "full")
    assert {name for _, name in full_draws} == {"bert", "roberta"}  # both teachers taught
    resumed, resumed_draws = run(tmp_path / "resumed", str(tmp_path / "full" / "out" / "checkpoint-2"))
    assert resumed_draws == [d for d in full_draws if d[0] >= 2]
    for name, tensor in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path):
    single = tmp_path / "single"
    tiny.train_and_dump(str(single), per_device_batch=4, accumulation=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    script = os.path.join(ROOT, "tests", "ensemble_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script]
    done = run_launcher([*cmd, str(tmp_path / "ddp")], clean=[tmp_path / "ddp"], env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ddp" / "world_size.txt").read_text() == "2"
    draws = [json.loads((tmp_path / "ddp" / f"draws-{r}.json").read_text()) for r in (0, 1)]
    assert draws[0] == draws[1] == json.loads((single / "draws-0.json").read_text())
    assert {name for _, name in draws[0]} == {"bert", "roberta"}
    for name in ("student.safetensors", "projectors.safetensors"):
        one, two = load_file(single / name), load_file(tmp_path / "ddp" / name)
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=f"{name}:{key}")


REFUSED = [
    (False, [HIDDEN], "add `teacher: NAME` with one of ['a', 'b']"),
    (False, [{**HIDDEN, "teacher": "c"}], "names teacher 'c'; this ensemble has ['a', 'b']"),
    (False, [LOGITS, {"knowledge": "logits", "loss": "jsd", "temperature": 4.0}], "temperatures [2.0, 4.0]"),
    (False, [{"knowledge": "logits", "loss": "mse"}], "compares raw logits"),
    (
        False,
        [LOGITS, {"knowledge": "adversarial", "loss": "nonsaturating", "temperature": 4.0}],
        "[2.0, 4.0]",
    ),
    (False, [{"knowledge": "adversarial", "loss": "nonsaturating", "what": "pooled"}], "add `teacher: NAME`"),
    (True, [LOGITS, {**HIDDEN, "teacher": "b"}], "reads its own tokenisation"),
]


@pytest.mark.parametrize(("own", "terms", "message"), REFUSED)
def test_terms_an_ensemble_cannot_serve_are_refused(own, terms, message, tmp_path):
    b, tokenizers = (tiny.roberta(), {"b": tiny.other_tokenizer()}) if own else (tiny.bert(seed=5), None)
    source = EnsembleTeacher({"a": tiny.bert(), "b": b}, tokenizers=tokenizers)
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny.trainer_for(source, tmp_path, terms=terms)


def test_settings_an_ensemble_would_ignore_are_refused(tmp_path):
    teachers = {"a": tiny.bert(), "b": tiny.bert(seed=5)}
    with pytest.raises(ValueError, match="have no effect with combination 'mean'"):
        EnsembleTeacher(teachers, "mean", {"a": 1.0, "b": 2.0})
    with pytest.raises(ValueError, match="needs route_column"):
        EnsembleTeacher(teachers, "route")
    with pytest.raises(ValueError, match="letters, digits"):
        EnsembleTeacher({"a.b": tiny.bert()})
    source = EnsembleTeacher(teachers, "route", route_column="domain")
    with pytest.raises(ValueError, match=r"rows \[1\] have \['c'\]"):
        source.prepare(
            tiny.raw_data(3), tiny.raw_data(3).add_column("domain", ["a", "c", "b"]), text_columns="text"
        )
    own = EnsembleTeacher({"a": tiny.bert(), "r": tiny.roberta()}, tokenizers={"r": tiny.other_tokenizer()})
    tok = make_tokenizer("bert")
    data = tokenize(tiny.raw_data(4), tok, SEQ_CLS, "text")  # not prepared: no teacher@r.* columns
    with pytest.raises(ValueError, match="teacher@r.input_ids"):
        DistillationTrainer(
            model=tiny.small_student(), teacher=own, args=DistillationConfig(**training_settings(tmp_path)),
            train_dataset=data, processing_class=tok,
        )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    tiny.save_tiny_teachers(root)
    return root


def recipe_flags(root, out, teachers) -> list[str]:
    return [
        "--smoke", "--use_cpu", "true", "--teacher", str(root / "first"), "--output_dir", str(out),
        "--train_file", str(root / "train.jsonl"), "--validation_file", str(root / "validation.jsonl"),
        "--per_device_train_batch_size", "4",
        "--teachers", yaml.safe_dump(teachers, default_flow_style=True).strip(),
    ]  # fmt: skip


def test_the_multi_teacher_recipe_runs_on_tiny_teachers(tiny_teachers, tmp_path):
    from llmkd.cli.pipeline import distill

    teachers = [
        {"model": str(tiny_teachers / "first"), "name": "seed42"},
        {"model": str(tiny_teachers / "swapped"), "name": "seed43"},
        {"model": str(tiny_teachers / "other"), "name": "seed44"},
    ]
    recipe = os.path.join(ROOT, "recipes", "methods", "multi_teacher.yaml")
    report = distill(recipe, recipe_flags(tiny_teachers, tmp_path / "out", teachers))
    assert report["own_tokenisation"] == ["seed44"] and report["teacher_combination"] == "mean"
    assert {"eval_accuracy", "eval_distill/hidden_cosine@seed42", "eval_agreement"} <= set(report["eval"])
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_yaml_route_and_cache_members(tiny_teachers, tmp_path):
    """`route` reads the domain column; a classifier cache of the swapped teacher joins as a member."""
    from llmkd.cli.cache import cache_teacher
    from llmkd.cli.pipeline import distill

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "teacher": str(tiny_teachers / "first"), "student_layers": [0, 3], "text_columns": ["sentence"],
        "max_length": 32, "terms": [LOGITS], "report_to": "none",
    }))  # fmt: skip
    cache = tmp_path / "cache"
    cache_flags = ["--teacher", str(tiny_teachers / "swapped"), "--teacher_cache", str(cache)]
    base = recipe_flags(tiny_teachers, tmp_path / "out", [])[:-2]
    cache_teacher(str(recipe), [*base, *cache_flags])
    check_cache_member(tiny_teachers, cache, tmp_path / "check")
    teachers = [{"model": str(tiny_teachers / "first")}, {"model": str(tiny_teachers / "other")},
                {"cache": str(cache), "name": "swapped"}]  # fmt: skip
    flags = recipe_flags(tiny_teachers, tmp_path / "out", teachers)
    report = distill(str(recipe), [*flags, "--teacher_combination", "route", "--route_column", "domain"])
    assert [t["name"] for t in report["teachers"]] == ["first", "other", "swapped"]
    assert math.isfinite(report["eval"]["eval_loss"])
    with pytest.raises(ValueError, match="route_column is read only by route"):
        distill(str(recipe), [*flags, "--route_column", "domain"])
    with pytest.raises(ValueError, match="have no weight"):
        distill(str(recipe), [*flags[:-1], yaml.safe_dump([{**teachers[0], "weight": 1}, teachers[1]])])


def check_cache_member(root, cache, tmp_path):
    """The cache member serves the swapped teacher's logits, aligned by class name like the live one."""
    from transformers import AutoModelForSequenceClassification

    from llmkd.data.loading import read_files

    swapped = AutoModelForSequenceClassification.from_pretrained(root / "swapped")
    tok, labels = make_tokenizer("bert"), ["negative", "positive"]
    data = tokenize(read_files({"train": str(root / "train.jsonl")})["train"], tok, SEQ_CLS, ["sentence"],
                    max_length=32, label_names=labels)  # fmt: skip
    source = EnsembleTeacher({"live": swapped, "cached": str(cache)})
    student = tiny.small_student(id2label=dict(enumerate(labels)))
    args = DistillationConfig(**training_settings(tmp_path))
    trainer = DistillationTrainer(
        model=student, teacher=source, args=args, train_dataset=source.prepare(data), processing_class=tok
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    out = source.outputs(batch, {})
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    torch.testing.assert_close(out.members["live"].logits, swapped(**inputs).logits[:, [1, 0]])
    torch.testing.assert_close(out.members["cached"].logits, out.members["live"].logits, atol=1e-5, rtol=1e-5)
