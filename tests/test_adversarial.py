"""Adversarial distillation: losses vs float64 references, disjoint gradients, D's own optimizer, and the
properties every method keeps (padding, accumulation, 2 processes, resume, YAML)."""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path
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
    run_launcher,
    seeded,
)
from safetensors.torch import load_file
from test_normalisation import PerBatchMeanTrainer, max_relative_gap
from test_padding import rows, tokenizer
from test_recipes import tiny_glue  # noqa: F401  (a fixture)
from test_trainer import make_trainer
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    LlamaForSequenceClassification,
)

from llmkd import DistillationConfig, DistillationTrainer
from llmkd.cli.pipeline import distill
from llmkd.knowledge import parse_term
from llmkd.losses.adversarial import discriminator_accuracy, discriminator_bce, nonsaturating_generator
from llmkd.schemes.own_optimizers import OwnOptimizers
from llmkd.schemes.tally import per_example_sums

ROOT = Path(__file__).resolve().parent.parent
ADV = {"knowledge": "adversarial", "loss": "nonsaturating", "weight": 0.5, "discriminator_lr": 0.05}
KL = {"knowledge": "logits", "loss": "forward_kl"}
NAME = "distill/adversarial_nonsaturating"


def bert(layers, hidden, seed):
    return seeded(BertForSequenceClassification, bert_config(layers, hidden), seed)


def d_state(trainer) -> dict:
    return {k: v.clone() for k, v in trainer.auxiliary_modules.state_dict().items()}


# ---- losses ------------------------------------------------------------------------------------------------


def test_losses_match_naive_float64_references():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(5, 3, generator=g) * 4, torch.randn(5, 3, generator=g) * 4
    sigmoid = lambda a: 1 / (1 + math.exp(-a))  # noqa: E731
    bce, gen, acc = (torch.zeros(5, 3, dtype=torch.float64) for _ in range(3))
    for i in range(5):
        for j in range(3):
            d_t, d_s = sigmoid(real[i, j].item()), sigmoid(fake[i, j].item())
            bce[i, j] = -(math.log(d_t) + math.log(1 - d_s))
            gen[i, j] = -math.log(d_s)
            acc[i, j] = ((d_t > 0.5) + (d_s < 0.5)) / 2
    torch.testing.assert_close(discriminator_bce(real, fake).double(), bce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nonsaturating_generator(fake).double(), gen, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(discriminator_accuracy(real, fake).double(), acc)
    saturating = torch.log1p(-torch.sigmoid(fake.double()))  # control: Goodfellow's minimax form differs
    assert (saturating - gen).abs().max() > 0.1
    huge = torch.tensor([200.0, -200.0])  # softplus form: finite where log(σ(a)) would be log(0)
    assert (
        torch.isfinite(discriminator_bce(huge, -huge)).all()
        and torch.isfinite(nonsaturating_generator(-huge)).all()
    )
    with pytest.raises(ValueError, match="one shape"):
        discriminator_bce(real, fake[:2])


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"what": "hidden"}, "what must be one of"),
        ({"discriminator_width": 0}, "discriminator_width must be a positive integer"),
        ({"discriminator_lr": -1.0}, "discriminator_lr must be a finite number > 0"),
        ({"betas": [0.5, 0.9]}, "takes no \\['betas'\\]"),
        ({"layer_map": "every"}, "layer_map must be"),
    ],
)
def test_bad_settings_fail_when_the_term_is_parsed(extra, message):
    with pytest.raises(ValueError, match=message):
        parse_term(ADV | extra)


def test_runs_that_cannot_work_are_refused_before_training(bert_pair, llama_pair, tmp_path):
    cases = [
        (bert_pair, "cls", {"what": "pooled"}, "equal widths"),  # 16 vs 32: no projector in front of D
        (bert_pair, "cls", {"layer_map": "last"}, "what: logits takes no layer_map"),
        (llama_pair, "lm", {"what": "pooled"}, "only a bidirectional"),
    ]
    for (teacher, student), task, extra, message in cases:
        with pytest.raises(ValueError, match=message):
            make_trainer(teacher, student, task, tmp_path, [ADV | extra])
    own = OwnOptimizers({"0": torch.optim.Adam([torch.nn.Parameter(torch.ones(1))])})
    for engine, fp16, message in ((True, False, "DeepSpeed own or shard"), (False, True, "use bf16")):
        trainer = SimpleNamespace(
            is_fsdp_enabled=False, is_deepspeed_enabled=engine, args=SimpleNamespace(fp16=fp16)
        )
        with pytest.raises(ValueError, match=message):
            own.check(trainer)
    own.check(
        SimpleNamespace(is_fsdp_enabled=False, is_deepspeed_enabled=False, args=SimpleNamespace(fp16=False))
    )


# ---- gradients and D's own optimizer -----------------------------------------------------------------------


def test_student_term_sends_no_gradient_into_d_and_d_loss_none_into_the_student(bert_pair, tmp_path):
    trainer = make_trainer(*bert_pair, "cls", tmp_path, [KL, ADV])
    term, d = trainer.terms[1], trainer.auxiliary_modules["1"]
    logits = torch.randn(4, 2, requires_grad=True)
    out = type("Out", (), {"logits": logits})
    adapted = term.adapt(d, out)
    term.loss(adapted["student"]).sum().backward()
    assert logits.grad.abs().sum() > 0 and all(p.grad is None for p in d.parameters())
    nonsaturating_generator(d(term.features(out, 0))).sum().backward()  # control: without the detach it would
    assert all(p.grad.abs().sum() > 0 for p in d.parameters())
    d.zero_grad(set_to_none=True)
    logits.grad = None
    discriminator_bce(d(torch.rand(4, 2)), adapted["fake"]).sum().backward()
    assert logits.grad is None and all(p.grad.abs().sum() > 0 for p in d.parameters())


def test_one_backward_gives_d_exactly_the_gradient_of_its_own_loss(bert_pair, tmp_path):
    """Through the trainer: D's gradient is ∇ of mean L_D alone (float64 reference from both models' logits);
    with the student's term reaching D (no detach), it would also carry weight · ∇(−log D(s))."""
    teacher, student = bert_pair
    trainer = make_trainer(teacher, student, "cls", tmp_path, [KL, ADV], temperature=1.5)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.compute_loss(trainer.model.train(), batch).backward()
    d = trainer.auxiliary_modules["1"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        probs = [torch.softmax(m(**inputs).logits.double() / 1.5, -1) for m in (teacher, student.eval())]
    reference = copy.deepcopy(d).double()
    t, s = (reference(p) for p in probs)
    loss_d = (-(torch.sigmoid(t).log() + (1 - torch.sigmoid(s)).log())).mean()
    expected = torch.autograd.grad(loss_d, list(reference.parameters()))
    for (name, p), g in zip(d.named_parameters(), expected):
        torch.testing.assert_close(p.grad.double(), g, rtol=1e-4, atol=1e-7, msg=name)


def test_d_is_not_in_the_trainer_optimizer_and_moves_only_through_its_own(bert_pair, tmp_path, monkeypatch):
    settings = dict(max_steps=2, optim="adamw_torch", weight_decay=0.5, gradient_accumulation_steps=2)
    runs = {}
    for own_steps in (True, False):
        teacher, student = (copy.deepcopy(m) for m in bert_pair)
        trainer = make_trainer(teacher, student, "cls", tmp_path / str(own_steps), [KL, ADV], **settings)
        d_ids = {id(p) for p in trainer.auxiliary_modules.parameters()}
        optimizer = trainer.create_optimizer()
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert held == {id(p) for p in student.parameters()} - d_ids  # the student (and only it) is there
        assert all(p.requires_grad for p in trainer.auxiliary_modules.parameters())
        start = d_state(trainer)
        if not own_steps:  # control: with D's own step switched off, nothing else may move D
            monkeypatch.setattr(trainer.own_optimizers, "step", lambda: None)
        trainer.train()
        runs[own_steps] = max((v - start[k]).abs().max().item() for k, v in d_state(trainer).items())
        if own_steps:  # one Adam step per optimizer step (2 micro-batches each)
            adam = trainer.own_optimizers.optimizers["1"]
            assert {s["step"].item() for s in adam.state.values()} == {2.0}
    assert runs[True] > 1e-3 and runs[False] == 0.0


def test_logged_loss_is_the_weighted_terms_and_d_is_logged_beside_them(bert_pair, tmp_path):
    trainer = make_trainer(*bert_pair, "cls", tmp_path, [KL, ADV])
    trainer.train()
    for h in [h for h in trainer.state.log_history if "loss" in h]:
        mix = h["distill/logits_forward_kl"] + 0.5 * h[NAME] + 0.5 * h["loss_ce"]
        assert h["loss"] == pytest.approx(mix, rel=1e-5)
        assert abs(h["loss"] - mix - h[f"{NAME}/discriminator_loss"]) > 1e-2  # control: D's loss is not in it
        assert 0 <= h[f"{NAME}/discriminator_accuracy"] <= 1


def test_clipping_keeps_d_and_the_student_apart(bert_pair, tmp_path):
    trainer = make_trainer(*bert_pair, "cls", tmp_path, [KL, ADV], max_grad_norm=1e-3)
    model, batch = trainer.model, trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.create_optimizer()
    trainer.compute_loss(model.train(), batch).backward()
    grads = lambda params: torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))  # noqa: E731
    d_params = list(trainer.auxiliary_modules.parameters())
    main = trainer._main_parameters(model)
    main = [p for p in main if p.grad is not None]
    assert grads(d_params) > 1e-2 and grads(main) > 1e-2
    logged = trainer._clip_grad_norm(model)
    assert logged > 1e-2  # the main optimizer's norm before clipping
    torch.testing.assert_close(grads(d_params), torch.tensor(1e-3), rtol=1e-3, atol=0)
    torch.testing.assert_close(grads(main), torch.tensor(1e-3), rtol=1e-3, atol=0)  # jointly: both < 1e-3


def test_discriminator_learns_a_separable_case(tmp_path):
    teacher, student = bert(2, 16, 0), bert(2, 16, 1)
    with torch.no_grad():  # the teacher is sure of class 0, the student unsure: one threshold separates them
        teacher.classifier.bias.copy_(torch.tensor([6.0, -6.0]))
    trainer = make_trainer(
        teacher, student, "cls", tmp_path, [ADV | {"discriminator_lr": 1e-2}], max_steps=30, learning_rate=1e-5,
        train=classification_dataset(8), per_device_train_batch_size=8, temperature=1.0,
    )  # fmt: skip
    trainer.train()
    accuracy = [h[f"{NAME}/discriminator_accuracy"] for h in trainer.state.log_history if "loss" in h]
    loss = [h[f"{NAME}/discriminator_loss"] for h in trainer.state.log_history if "loss" in h]
    assert accuracy[0] <= 0.75 and min(accuracy[-5:]) == 1.0
    assert loss[-1] < 0.5 * loss[0] and loss[0] == pytest.approx(2 * math.log(2), abs=0.3)


# ---- properties: accumulation, padding, processes, resume, YAML -------------------------------------------


def two_step_update(pair, batch, accumulation, tmp_path, trainer_cls=DistillationTrainer):
    teacher, student = (copy.deepcopy(m) for m in pair)
    trainer = make_trainer(
        teacher, student, "lm", tmp_path, [KL, ADV], train=lm_dataset(8, seed=5), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=2, optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
        temperature=1.0, trainer_cls=trainer_cls,
    )  # fmt: skip
    start = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.train()
    return {k: v - start[k] for k, v in student.state_dict().items()}


def test_accumulation_gives_the_big_batch_update_of_student_and_d(llama_pair, tmp_path):
    full = two_step_update(llama_pair, 8, 1, tmp_path / "a")
    d_keys = [k for k in full if k.startswith("llmkd_aux.")]
    assert d_keys and min(full[k].abs().max().item() for k in d_keys) > 1e-3
    split = two_step_update(llama_pair, 4, 2, tmp_path / "b")
    assert max_relative_gap(full, split) < 1e-4
    broken = two_step_update(llama_pair, 2, 4, tmp_path / "c", trainer_cls=PerBatchMeanTrainer)
    assert max_relative_gap({k: full[k] for k in d_keys}, {k: broken[k] for k in d_keys}) > 1e-2


FAMILIES = {  # build(layers, hidden, seed), tokenizer, causal LM, term settings
    "bert-cls-pooled": (bert, "bert", False, {"what": "pooled", "layer_map": [[2, 4]]}),
    "bert-cls-logits": (bert, "bert", False, {}),
    "llama-lm": (lambda n, h, s: seeded(LlamaForCausalLM, llama_config(n, h), s), "llama", True, {}),
    "llama-cls": (
        lambda n, h, s: seeded(LlamaForSequenceClassification, llama_config(n, h, num_labels=2), s), "llama",
        False, {},
    ),
}  # fmt: skip


def padded_trainer(family, side, tmp_path):
    build, kind, causal, extra = FAMILIES[family]
    teacher, student = build(4, 32, 0), build(2, 32, 1)
    tok = tokenizer(kind, side, False)
    collator = DataCollatorForLanguageModeling(tok, mlm=False) if causal else DataCollatorWithPadding(tok)
    args = DistillationConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", terms=[ADV | extra])
    trainer = DistillationTrainer(
        model=student, teacher=teacher, args=args, data_collator=collator, processing_class=tok,
        teacher_processing_class=tok, train_dataset=None,
    )  # fmt: skip
    return trainer, rows(kind, causal, tok)


def per_example(trainer, batch, n) -> dict:
    batch = trainer._prepare_inputs(batch)
    with torch.no_grad():
        student_out, adapted = trainer._student_forward(trainer.model.eval(), batch, training=False)
        tv = trainer.terms[0].values(student_out, trainer._teacher_forward(batch, False), batch, adapted["0"])
    return {k: per_example_sums(v.values, v.mask, n) for k, v in {"term": tv, **tv.side}.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_gives_each_example_its_value_alone(family, side, tmp_path):
    trainer, features = padded_trainer(family, side, tmp_path)
    together = per_example(trainer, trainer.data_collator(features), len(features))
    for i, row in enumerate(features):
        alone = per_example(trainer, trainer.data_collator([row]), 1)
        for name, values in together.items():
            torch.testing.assert_close(values[i], alone[name][0], rtol=1e-5, atol=1e-6, msg=f"{name} {i}")
    if family == "bert-cls-pooled" and side == "left":  # control: left padding as it is puts a pad at [CLS]
        raw = per_example(trainer, dict(trainer.data_collator.collator(features)), len(features))
        alone = per_example(trainer, trainer.data_collator(features[:1]), 1)
        assert not torch.allclose(raw["term"][0], alone["term"][0], rtol=1e-3)


@pytest.mark.multiprocess
def test_two_processes_give_the_one_process_student_and_d(tmp_path):
    from adversarial_worker import train_and_dump

    train_and_dump(str(tmp_path / "single"), per_device_batch=4, accumulation=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(ROOT / "tests" / "adversarial_worker.py"), str(tmp_path / "ddp")]
    done = run_launcher(cmd, clean=[tmp_path / "ddp"], env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ddp" / "world_size.txt").read_text() == "2"
    start = d_state(make_trainer(*(seeded(LlamaForCausalLM, llama_config(**c), s) for c, s in (({}, 0), (
        {"layers": 2, "hidden": 16}, 1))), "lm", tmp_path / "init", [KL, ADV], temperature=1.0))  # fmt: skip
    moved = load_file(tmp_path / "single" / "discriminator.safetensors")
    assert max((moved[k] - start[k]).abs().max().item() for k in start) > 1e-3  # D did learn in 2 steps
    for name in ("student", "discriminator", "discriminator_adam"):
        one, two = (load_file(tmp_path / run / f"{name}.safetensors") for run in ("single", "ddp"))
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=f"{name}:{key}")


def flat(state: dict) -> dict:
    """A state dict with one level of nesting (Adam's {index: {name: tensor}}) as {"index.name": tensor}."""
    return {
        f"{k}.{n}": t for k, v in state.items() for n, t in (v.items() if isinstance(v, dict) else [("", v)])
    }


def test_resume_restores_d_and_its_adam(bert_pair, tmp_path, monkeypatch):
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, weight_decay=0.0)

    def run(folder, resume=None):
        teacher, student = (copy.deepcopy(m) for m in bert_pair)
        trainer = make_trainer(teacher, student, "cls", tmp_path / folder, [KL, ADV], **settings)
        trainer.train(resume_from_checkpoint=resume)
        adam = trainer.own_optimizers.optimizers["1"].state_dict()["state"]
        return student.state_dict(), d_state(trainer), adam

    full = run("full")
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    assert "llmkd_aux" not in " ".join(load_file(checkpoint / "model.safetensors"))  # the student stays plain
    assert (
        json.loads((checkpoint / "llmkd_own_optimizers.json").read_text())["1"]["param_groups"][0]["lr"]
        == 0.05
    )
    resumed = run("resumed", str(checkpoint))
    for one, two in zip(full, resumed):
        for key, value in flat(one).items():
            torch.testing.assert_close(flat(two)[key], value, rtol=1e-5, atol=1e-6, msg=key)
    monkeypatch.setattr(OwnOptimizers, "load", lambda self, folder: None)  # control: a fresh Adam
    fresh = run("fresh", str(checkpoint))
    assert max((fresh[1][k] - full[1][k]).abs().max().item() for k in full[1]) > 1e-4
    monkeypatch.undo()
    os.remove(checkpoint / "llmkd_own_optimizers.json")
    with pytest.raises(ValueError, match="llmkd_own_optimizers.json is missing"):  # the marker lists it
        run("missing", str(checkpoint))
    os.remove(checkpoint / "llmkd_checkpoint.json")  # a checkpoint llmkd did not mark: the loader's own check
    with pytest.raises(FileNotFoundError, match="own optimizers"):
        run("unmarked", str(checkpoint))


def test_recipe_smoke(tiny_glue, tmp_path):  # noqa: F811
    recipe = ROOT / "recipes" / "methods" / "adversarial.yaml"
    flags = ["--smoke", "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--teacher"]
    flags += [str(tiny_glue / "teacher"), "--train_file", str(tiny_glue / "train.jsonl")]
    flags += ["--validation_file", str(tiny_glue / "validation.jsonl")]
    report = distill(str(recipe), flags)
    assert report["student"]["layers"] == 2 and "eval_accuracy" in report["eval"]
    assert 0 <= report["eval"][f"eval_{NAME}/discriminator_accuracy"] <= 1
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert saved and not any("llmkd_aux" in k for k in saved)  # D never reaches the student's folder
