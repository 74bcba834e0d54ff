"""Teacher-logit cache: exact round trip, the bucket loss against float64 references, training from the cache
equal to training with the live teacher when nothing is cut (k = V, classifiers), refusals, resume, and a
cached run that never loads the teacher."""

from __future__ import annotations

import copy
import json
import os
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    BertForSequenceClassification,
    LlamaForCausalLM,
    bert_config,
    classification_dataset,
    llama_config,
    lm_dataset,
    make_tokenizer,
    seeded,
)
from safetensors.torch import load_file
from test_trainer import make_trainer

from llmkd import DistillationConfig, DistillationTrainer
from llmkd.losses import LOSSES
from llmkd.losses.bucketed import bucketed_logit_loss
from llmkd.teachers.cached import writer as W
from llmkd.teachers.cached.binding import cached_trainer_kwargs
from llmkd.teachers.cached.fingerprint import CacheMismatchError
from llmkd.teachers.cached.reader import CachedTeacher
from llmkd.teachers.cached.writer import topk_targets, write_cache

V = 62  # conftest's vocabulary
PARAMS = {"forward_kl": {}, "reverse_kl": {}, "jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.1}, "tvd": {}}
PARAMS["skew_reverse_kl"] = {"alpha": 0.2}


def reference(zs, zt, k, temperature, loss, beta=0.5, alpha=0.1):
    """Bucketed divergence in float64, from probabilities (1 − Σ top-k for the rest), formula by formula."""
    ps, pt = ((z.double() / temperature).softmax(-1) for z in (zs, zt))
    ids = zt.topk(k, dim=-1).indices

    def bucket(p):
        top = p.gather(-1, ids)
        return torch.cat([top, 1 - top.sum(-1, keepdim=True)], -1)

    a, b = bucket(pt), bucket(ps)

    def kl(p, q):
        return (p * (p / q).log()).sum(-1)

    return {
        "forward_kl": lambda: kl(a, b),
        "reverse_kl": lambda: kl(b, a),
        "jsd": lambda: (
            beta * kl(a, beta * a + (1 - beta) * b) + (1 - beta) * kl(b, beta * a + (1 - beta) * b)
        ),
        "skew_kl": lambda: kl(a, alpha * a + (1 - alpha) * b),
        "skew_reverse_kl": lambda: kl(b, alpha * b + (1 - alpha) * a),
        "tvd": lambda: 0.5 * (a - b).abs().sum(-1),
    }[loss]()


@pytest.mark.parametrize("loss", list(PARAMS))
def test_bucket_loss_matches_float64_reference_and_bounds_the_full_loss(loss):
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(6, V, generator=g) * 2, torch.randn(6, V, generator=g) * 3
    full = LOSSES["logits"][loss](zs, zt, temperature=2.0, **PARAMS[loss])
    for k in (1, 3, 10):
        ids, values, rest = topk_targets(zt, k, 2.0)
        got = bucketed_logit_loss(zs, ids, values, rest, loss=loss, temperature=2.0, **PARAMS[loss])
        want = reference(zs, zt, k, 2.0, loss, **PARAMS[loss])
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
        assert (got <= full + 1e-6).all()  # data-processing inequality
        assert (got < full - 1e-4).any()  # and the bound is not trivially tight (the control)
    ids, values, rest = topk_targets(zt, V, 2.0)
    zs_grad = zs.clone().requires_grad_(True)
    zs_full = zs.clone().requires_grad_(True)
    cached = bucketed_logit_loss(zs_grad, ids, values, rest, loss=loss, temperature=2.0, **PARAMS[loss])
    live = LOSSES["logits"][loss](zs_full, zt, temperature=2.0, **PARAMS[loss])
    torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-6)  # k = V: nothing cut
    cached.sum().backward()
    live.sum().backward()
    torch.testing.assert_close(zs_grad.grad, zs_full.grad, rtol=1e-4, atol=1e-6)


def test_bucket_loss_is_finite_for_masked_logits_and_refuses_raw_logit_losses():
    zs, zt = torch.randn(3, V), torch.randn(3, V)
    zs[0, 5:] = float("-inf")  # the student masks most of the vocabulary
    zs[1] = float("-inf")  # a dead row
    ids, values, rest = topk_targets(zt, 4, 1.0)
    zs.requires_grad_(True)
    out = bucketed_logit_loss(zs, ids, values, rest)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(zs.grad).all() and out[1] == 0
    with pytest.raises(ValueError, match="raw logits|cannot be computed"):
        bucketed_logit_loss(zs, ids, values, rest, loss="mse")


def test_student_buckets_gradient_is_exact():
    """The hand-written backward against finite differences in float64, masked logits and k = V included."""
    from llmkd.losses.bucketed import student_buckets

    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 9, generator=g, dtype=torch.float64)
    z[0, 1, :4] = float("-inf")
    for k in (1, 4, 9):
        ids = torch.randn(2, 3, 9, generator=g).topk(k, dim=-1).indices
        fn = lambda x, ids=ids: student_buckets(x, ids, temperature=1.7).clamp_min(-1e3)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (z.clone().requires_grad_(True),))
        log_p = (z / 1.7).log_softmax(-1)
        want = torch.cat(
            [log_p.gather(-1, ids), log_p.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)], -1
        )
        torch.testing.assert_close(student_buckets(z, ids, temperature=1.7), want)


def llama_cache(tmp_path, name="cache", k=8, temperature=2.0, dtype="float16", data=None, **kw):
    teacher = seeded(LlamaForCausalLM, llama_config(), 0)
    data = data if data is not None else lm_dataset(8, seed=5)
    path = str(tmp_path / name)
    write_cache(
        teacher,
        make_tokenizer("llama"),
        {"train": data},
        path,
        k=k,
        temperature=temperature,
        value_dtype=dtype,
        max_length=32,
        **kw,
    )
    return teacher, path


def test_round_trip_is_exact(tmp_path):
    teacher, path = llama_cache(tmp_path, batch_size=1, rows_per_shard=3)  # unpadded rows, 3 shards
    cache, data = CachedTeacher(path), lm_dataset(8, seed=5)
    assert cache.manifest["id_dtype"] == "uint16" and len(cache.manifest["shards"]) == 3
    for i in range(len(data)):
        ids = torch.tensor([data[i]["input_ids"]])
        with torch.no_grad():
            logits = teacher(input_ids=ids).logits[0, :-1]
        top, values, rest = topk_targets(logits, 8, 2.0)
        row = cache.row(i)
        assert torch.equal(row["input_ids"], ids[0])
        assert torch.equal(row["topk_ids"], top)
        assert torch.equal(row["topk_logprobs"], values.half().float())
        assert torch.equal(row["rest_logmass"], rest.half().float())
    # the stored mass sums to 1 up to float16 rounding
    buckets = torch.cat([row["topk_logprobs"], row["rest_logmass"][:, None]], -1)
    torch.testing.assert_close(buckets.logsumexp(-1), torch.zeros(len(buckets)), atol=3e-3, rtol=0)


def cached_trainer(path, student, tmp_path, data=None, terms=None, **overrides):
    data = data if data is not None else lm_dataset(8, seed=5)
    args = SimpleNamespace(temperature=overrides.get("temperature", 2.0), teacher_dtype="auto")
    kwargs = cached_trainer_kwargs(
        path, args=args, train_dataset=data, processing_class=make_tokenizer("llama")
    )
    overrides.setdefault("temperature", 2.0)
    terms = terms or [{"knowledge": "logits", "loss": "forward_kl"}]
    return make_trainer(
        kwargs["teacher"],
        student,
        "lm",
        tmp_path,
        terms,
        train=kwargs["train_dataset"],
        trainer_cls=DistillationTrainer,
        **overrides,
    )


STEP = dict(max_steps=2, optim="sgd", learning_rate=0.5, max_grad_norm=0.0, per_device_train_batch_size=4)


def trained(trainer):
    trainer.train()
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def max_gap(a, b):
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)).item() for k in a)


def test_training_from_the_cache_equals_the_live_teacher_when_k_is_the_vocabulary(tmp_path):
    teacher, full = llama_cache(tmp_path, "full", k=V, dtype="float32")
    _, small = llama_cache(tmp_path, "small", k=2)
    start = seeded(LlamaForCausalLM, llama_config(layers=2, hidden=16), 1)
    live_trainer = make_trainer(
        teacher, copy.deepcopy(start), "lm", tmp_path / "live", [{"knowledge": "logits", "loss": "jsd", "beta": 0.3}],
        train=lm_dataset(8, seed=5), temperature=2.0, **STEP,
    )  # fmt: skip
    live = trained(live_trainer)
    terms = [{"knowledge": "logits", "loss": "jsd", "beta": 0.3}]
    cached = trained(cached_trainer(full, copy.deepcopy(start), tmp_path / "c", terms=terms, **STEP))
    moved = max_gap(live, {k: v for k, v in start.state_dict().items()})
    assert moved > 1e-3  # the steps did train
    assert max_gap(live, cached) < 1e-4
    control = trained(cached_trainer(small, copy.deepcopy(start), tmp_path / "s", terms=terms, **STEP))
    assert max_gap(live, control) > 1e-2  # k = 2 cuts most of the distribution: another update


def test_cached_update_is_the_same_under_gradient_accumulation(tmp_path):
    _, path = llama_cache(tmp_path)
    start = seeded(LlamaForCausalLM, llama_config(layers=2, hidden=16), 1)
    updates = []
    for batch, accumulation in ((8, 1), (2, 4)):
        settings = STEP | dict(
            max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation
        )
        updates.append(trained(cached_trainer(path, copy.deepcopy(start), tmp_path / str(batch), **settings)))
    assert max_gap(updates[0], start.state_dict()) > 1e-3
    assert max_gap(updates[0], updates[1]) < 1e-4


def test_classifier_cache_gives_the_live_teacher_training(tmp_path):
    teacher = seeded(BertForSequenceClassification, bert_config(), 0)
    tok, data = make_tokenizer("bert"), classification_dataset(16)
    path = str(tmp_path / "cls")
    write_cache(teacher, tok, {"train": data}, path, max_length=32, batch_size=5)
    student = seeded(BertForSequenceClassification, bert_config(layers=2, hidden=16), 1)
    terms = [{"knowledge": "logits", "loss": "forward_kl"}]
    live = trained(make_trainer(teacher, copy.deepcopy(student), "cls", tmp_path / "l", terms, **STEP))
    args = SimpleNamespace(temperature=5.0, teacher_dtype="auto")  # raw logits: any temperature works
    kwargs = cached_trainer_kwargs(path, args=args, train_dataset=data, processing_class=tok)
    cached_run = make_trainer(
        kwargs["teacher"], copy.deepcopy(student), "cls", tmp_path / "c", terms, train=kwargs["train_dataset"],
        trainer_cls=DistillationTrainer, **STEP,
    )  # fmt: skip
    assert max_gap(live, trained(cached_run)) < 1e-5
    with pytest.raises(
        ValueError,
        match=r"need the teacher's \['hidden_states'\], which this teacher source \(CachedTeacher\) does not provide",
    ):
        make_trainer(
            kwargs["teacher"], copy.deepcopy(student), "cls", tmp_path / "h",
            [*terms, {"knowledge": "hidden", "loss": "mse"}], train=kwargs["train_dataset"],
            trainer_cls=DistillationTrainer,
        )  # fmt: skip


def test_refuses_other_inputs(tmp_path):
    _, path = llama_cache(tmp_path)
    data, tok = lm_dataset(8, seed=5), make_tokenizer("llama")
    args = SimpleNamespace(temperature=2.0, teacher_dtype="auto")
    cached_trainer_kwargs(path, args=args, train_dataset=data, processing_class=tok)  # the same inputs pass
    cases = {
        "temperature": dict(args=SimpleNamespace(temperature=1.0, teacher_dtype="auto")),
        "tokenizer": dict(processing_class=make_tokenizer("bert")),
        "data.train": dict(train_dataset=lm_dataset(8, seed=6)),
        "max_length": dict(run=SimpleNamespace(teacher="org/teacher", teacher_revision=None, max_length=16)),
    }
    for what, change in cases.items():
        kwargs = dict(args=args, train_dataset=data, processing_class=tok) | change
        with pytest.raises(CacheMismatchError, match=f"{what}: cached .*re-run `llmkd cache-teacher"):
            cached_trainer_kwargs(path, **kwargs)
    # a cache-teacher run into the same folder with other settings is refused, not mixed in
    with pytest.raises(CacheMismatchError, match="already holds a teacher cache"):
        llama_cache(tmp_path, temperature=1.0)


def test_refuses_a_truncated_shard_and_a_batch_with_other_ids(tmp_path):
    _, path = llama_cache(tmp_path, rows_per_shard=4)
    data = lm_dataset(8, seed=5)
    args = SimpleNamespace(temperature=2.0, teacher_dtype="auto")
    kwargs = cached_trainer_kwargs(path, args=args, train_dataset=data)
    shuffled = (
        kwargs["train_dataset"].remove_columns("cache_index").add_column("cache_index", [1, 0, *range(2, 8)])
    )
    student = seeded(LlamaForCausalLM, llama_config(layers=2, hidden=16), 1)
    trainer = make_trainer(
        kwargs["teacher"], student, "lm", tmp_path, [{"knowledge": "logits", "loss": "forward_kl"}],
        train=shuffled, trainer_cls=DistillationTrainer, temperature=2.0, max_steps=1, per_device_train_batch_size=8,
    )  # fmt: skip
    with pytest.raises(CacheMismatchError, match=r"cache_index 1\) has .* differ"):
        trainer.train()
    shard = os.path.join(path, W.shard_name(1))
    with open(shard, "r+b") as handle:
        handle.truncate(os.path.getsize(shard) - 10)
    with pytest.raises(CacheMismatchError, match="truncated"):
        CachedTeacher(path)
    llama_cache(tmp_path, rows_per_shard=4)  # the fix the message names: re-running repairs it
    assert CachedTeacher(path).row(5)["input_ids"].tolist() == data[5]["input_ids"]


def test_an_interrupted_cache_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    _, whole = llama_cache(tmp_path, "whole", rows_per_shard=3)
    real, calls = W._shard_tensors, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("stopped")
        return real(*args, **kwargs)

    monkeypatch.setattr(W, "_shard_tensors", flaky)
    with pytest.raises(KeyboardInterrupt):
        llama_cache(tmp_path, "part", rows_per_shard=3)
    assert not os.path.exists(tmp_path / "part" / W.MANIFEST)  # the manifest comes last
    llama_cache(tmp_path, "part", rows_per_shard=3)
    assert len(calls) == 4  # shard 0 was kept: 1 + 1 (interrupted) + 2 (shards 1 and 2)
    assert sorted(os.listdir(whole)) == sorted(os.listdir(tmp_path / "part"))
    with open(os.path.join(whole, W.MANIFEST)) as a, open(tmp_path / "part" / W.MANIFEST) as b:
        assert json.load(a) == json.load(b)
    for name in sorted(os.listdir(whole)):
        if name.endswith(".safetensors"):  # the header's metadata order varies: compare tensors and metadata
            a, b = (load_file(os.path.join(d, name)) for d in (whole, tmp_path / "part"))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
            assert W._shard_meta(os.path.join(whole, name)) == W._shard_meta(tmp_path / "part" / name)


def test_recipe_cache_then_training_never_loads_the_teacher(tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    from llmkd.cli import main
    from llmkd.cli.recipe import RunConfig, load_stages

    teacher_dir, tok = tmp_path / "teacher", make_tokenizer("llama")
    seeded(LlamaForCausalLM, llama_config(), 0).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    data, validation = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"] * 3))
    validation.write_text("".join(json.dumps({"text": s}) + "\n" for s in ["w9 w8", "w7 w6 w5 w4"]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"teacher: {teacher_dir}\nstudent_config: {{num_hidden_layers: 1}}\ntrain_file: {data}\nmax_length: 16\n"
        f"validation_file: {validation}\nteacher_cache: {tmp_path / 'cache'}\ncache_top_k: 4\ntemperature: 2.0\nhard_label_weight: 0.0\n"
        f"output_dir: {tmp_path / 'out'}\nuse_cpu: true\nreport_to: none\n"
    )
    assert main(["cache-teacher", str(recipe)]) == 0
    assert main(["cache-teacher", str(recipe), "--temperature", "1.0"]) == 2  # another key, same folder
    real = PreTrainedModel.from_pretrained.__func__

    def guarded(cls, path, *args, **kwargs):
        assert os.fspath(path) != os.fspath(teacher_dir), "the cached run loaded the teacher"
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(guarded))
    run, args = load_stages(
        str(recipe), ["--max_steps", "2", "--logging_steps", "1"], RunConfig, DistillationConfig
    )[-1]
    from llmkd.cli.pipeline import build_data

    train, evaluation = build_data(run, "causal_lm", tok)  # what `llmkd distill` tokenises
    kwargs = cached_trainer_kwargs(
        run.teacher_cache,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tok,
        run=run,
    )
    student = seeded(LlamaForCausalLM, llama_config(layers=1), 3)
    from transformers import DataCollatorForLanguageModeling

    trainer = DistillationTrainer(
        model=student,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
        **kwargs,
    )
    trainer.train()
    assert [h["distill/logits_forward_kl"] for h in trainer.state.log_history if "loss" in h]
    metrics = trainer.evaluate()  # evaluation reads the eval split's rows of the same cache
    assert 0 <= metrics["eval_agreement"] <= 1 and metrics["eval_distill/logits_forward_kl"] > 0
    with pytest.raises(AssertionError, match="loaded the teacher"):  # the guard does bite
        LlamaForCausalLM.from_pretrained(teacher_dir)
    assert isinstance(trainer.teacher, CachedTeacher) and trainer.source.model is None  # no weights at all
    assert DistillationTrainer in type(trainer).__mro__
