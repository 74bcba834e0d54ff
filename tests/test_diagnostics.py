"""Training diagnostics (llmkd.schemes.diagnostics) and the training-curves PNG (llmkd.evaluation.curves).

References are float64 and written independently of the code under test: explicit loops over positions with the
target rule spelt out (the next token is real and labelled), or a separate run of the term alone.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys

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
    run_launcher,
    seeded,
    training_settings,
    two_step_settings,
)
from test_logit_cache import cached_trainer, llama_cache
from test_trainer import make_trainer

from llmkd import DistillationConfig, DistillationTrainer
from llmkd.cli.pipeline import REPORT, train_and_report
from llmkd.evaluation.curves import CURVES, curve_series, write_training_curves
from llmkd.schemes import diagnostics
from llmkd.schemes.diagnostics import KEYS, soft_target_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGITS = [{"knowledge": "logits", "loss": "forward_kl"}]
MIXED = LOGITS + [{"knowledge": "hidden", "loss": "mse", "layer_map": "uniform"}]
LAYERS = ["layer0->0", "layer2->1", "layer4->2"]  # uniform map, 4-layer teacher into 2-layer student


def first_log(trainer) -> dict:
    return next(h for h in trainer.state.log_history if "loss" in h)


def train_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


def padded_lm_batch(side: str) -> dict:
    """Three rows of lengths 7, 4, 6 padded on `side`; labels -100 on padding, on <s> and on one inner token."""
    g = torch.Generator().manual_seed(7)
    rows = [torch.randint(6, 62, (n,), generator=g) for n in (7, 4, 6)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[b, span], mask[b, span] = row, 1
        ids[b, span.start] = 4  # <s>
    labels = ids.masked_fill(mask == 0, -100)
    labels[torch.arange(3), (mask == 1).int().argmax(1)] = -100  # <s> is never a target
    labels[0, 3] = -100  # an ignored token inside a row
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference_stats(student_logits, teacher_logits, batch, temperature, causal=True) -> dict:
    """float64 by loops: causal LMs count position t iff token t+1 is real and labelled; classifiers every row."""
    sums = {"teacher_entropy": 0.0, "student_entropy": 0.0, "agreement": 0.0}
    count = 0
    for b in range(student_logits.shape[0]):
        positions = range(student_logits.shape[1] - 1) if causal else [None]
        for t in positions:
            if causal and not (batch["attention_mask"][b, t + 1] == 1 and batch["labels"][b, t + 1] != -100):
                continue
            s = (student_logits[b, t] if causal else student_logits[b]).double()
            z = (teacher_logits[b, t] if causal else teacher_logits[b]).double()
            for key, logits in (("student_entropy", s), ("teacher_entropy", z)):
                p = torch.softmax(logits / temperature, -1)
                sums[key] -= float((p * p.log()).sum())
            sums["agreement"] += float(s.argmax() == z.argmax())
            count += 1
    return {k: v / count for k, v in sums.items()}


def logged_stats(trainer, batch) -> dict:
    """What one training micro-batch tallies, flushed as a log would."""
    trainer.model.train()
    trainer.state.logging_steps = 1  # as train() sets it: this step logs, so diagnostics are measured
    trainer.tally.reset("train")
    trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    return trainer.tally.flush("train")


def sharp_pair():
    """A teacher with a sharpened lm_head (entropies far from log V) and a student whose head is the teacher's
    plus noise: they agree on about half the targets, so agreement is not a trivial 0 or 1."""
    teacher = seeded(LlamaForCausalLM, llama_config(), 0)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40)
        student = copy.deepcopy(teacher)
        noise = torch.randn(student.lm_head.weight.shape, generator=torch.Generator().manual_seed(1))
        student.lm_head.weight.add_(noise * 0.5 * teacher.lm_head.weight.std())
    return teacher, student


@pytest.mark.parametrize("side", ["right", "left"])
def test_entropies_and_agreement_match_a_float64_reference_on_a_padded_batch(tmp_path, side):
    teacher, student = sharp_pair()
    trainer = make_trainer(teacher, student, "lm", tmp_path, MIXED, temperature=1.5, fused_logits=False)
    batch = padded_lm_batch(side)
    logged = logged_stats(trainer, batch)
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        s, t = student(**inputs).logits, teacher(**inputs).logits
    want = reference_stats(s, t, batch, 1.5)
    assert want["teacher_entropy"] < math.log(62) - 1 and 0.2 < want["agreement"] < 0.8  # not degenerate
    for key, value in want.items():
        assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # Control: counting the unlabelled positions too gives other numbers.
    loose = reference_stats(s, t, batch | {"labels": batch["input_ids"]}, 1.5)
    assert loose["student_entropy"] != pytest.approx(logged["student_entropy"], rel=1e-4)


def test_classifier_entropies_are_per_example(bert_pair, tmp_path):
    teacher, student = bert_pair
    trainer = make_trainer(teacher, student, "cls", tmp_path, LOGITS, temperature=0.7)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(5)])
    logged = logged_stats(trainer, batch)
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        want = reference_stats(student(**inputs).logits, teacher(**inputs).logits, batch, 0.7, causal=False)
    for key, value in want.items():
        assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # Tiny random classifiers predict one class for every row: agreement on random (B, C) logits instead.
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(40, 3, generator=g) * 3, torch.randn(40, 3, generator=g) * 3
    stats = soft_target_stats(lambda i: s[i], lambda i: t[i], torch.ones(40, dtype=torch.bool), 0.7, 7, 3)
    want = reference_stats(s, t, {}, 0.7, causal=False)
    assert 0.1 < want["agreement"] < 0.9
    for key, (total, count) in stats.items():
        assert float(total / count) == pytest.approx(want[key], rel=1e-5), key


def run_two_steps(tmp_path, name, batch, accumulation, terms=MIXED, **overrides) -> list[dict]:
    settings = two_step_settings(tmp_path / name, batch, accumulation, **overrides)
    args = DistillationConfig(
        **settings, terms=terms, hard_label_weight=0.0, train_sampling_strategy="sequential"
    )
    tok = make_tokenizer("llama")
    trainer = DistillationTrainer(
        model=seeded(LlamaForCausalLM, llama_config(layers=2, hidden=16), 1),
        teacher=seeded(LlamaForCausalLM, llama_config(), 0),
        args=args,
        train_dataset=lm_dataset(8, seed=3),
        processing_class=tok,
    )
    trainer.train()
    return train_logs(trainer)


def diagnostic_keys(log: dict) -> dict:
    return {k: v for k, v in log.items() if k in KEYS or "/layer" in k}


def test_gradient_accumulation_logs_the_same_diagnostics(tmp_path):
    one = run_two_steps(tmp_path, "ga1", 4, 1)
    two = run_two_steps(tmp_path, "ga2", 2, 2)
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        keys = diagnostic_keys(a)
        assert (
            set(keys) == set(diagnostic_keys(b)) >= {*KEYS[:3], *(f"distill/hidden_mse/{x}" for x in LAYERS)}
        )
        for key, value in keys.items():
            assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_fused_path_logs_the_plain_paths_diagnostics(tmp_path):
    """The fused path recomputes the logits from hidden states and lm_heads: the same values, on logging steps."""
    terms = [{"knowledge": "logits", "loss": "reverse_kl"}]
    plain = run_two_steps(tmp_path, "plain", 4, 1, terms, fused_logits=False)
    fused = run_two_steps(tmp_path, "fused", 4, 1, terms)
    for a, b in zip(plain, fused):
        for key in KEYS[:3]:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_per_layer_values_are_the_term_of_each_layer_pair_alone(llama_pair, tmp_path):
    teacher, student = llama_pair
    batch = padded_lm_batch("right")
    terms = [{"knowledge": "hidden", "loss": "mse"}, {"knowledge": "attention", "loss": "kl"}]
    logged = logged_stats(make_trainer(teacher, student, "lm", tmp_path, terms), batch)
    for kind, pairs in (("hidden_mse", [(0, 0), (1, 2), (2, 4)]), ("attention_kl", [(0, 1), (1, 3)])):
        per_layer = [logged[f"distill/{kind}/layer{t}->{s}"] for s, t in pairs]
        assert sum(per_layer) / len(per_layer) == pytest.approx(logged[f"distill/{kind}"], rel=1e-5)
        for (s, t), value in zip(pairs, per_layer):
            alone = [terms[0 if kind == "hidden_mse" else 1] | {"layer_map": [[s, t]]}]
            single = logged_stats(make_trainer(teacher, student, "lm", tmp_path, alone), batch)
            assert value == pytest.approx(single[f"distill/{kind}"], rel=1e-5), (kind, s, t)
            assert not any("/layer" in k for k in single)  # one pair: the term itself, no copy


def test_topk_mass_matches_the_teachers_full_distribution(tmp_path, llama_pair):
    teacher, path = llama_cache(tmp_path, k=8, temperature=2.0, dtype="float32")
    trainer = cached_trainer(path, llama_pair[1], tmp_path, max_steps=1)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    logged = logged_stats(trainer, batch)
    assert "teacher_entropy" not in logged and {"student_entropy", "agreement"} <= set(logged)
    with torch.no_grad():
        z = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    p = torch.softmax(z[:, :-1] / 2.0, -1).sort(-1, descending=True).values[..., :8].sum(-1)
    counted = (batch["attention_mask"][:, 1:] == 1) & (batch["labels"][:, 1:] != -100)
    assert logged["topk_mass"] == pytest.approx(float(p[counted].mean()), rel=1e-5)
    assert logged["topk_mass"] > 8 / 62 + 0.01  # control: more than a flat teacher's k / V


def guard_run(tmp_path, caplog, student, temperature=2.0, data=None, **overrides):
    """Trains 4 steps (4 logs) with llmkd's own collator, which keeps given labels; returns the guard's warnings."""
    teacher = seeded(LlamaForCausalLM, llama_config(), 0)
    settings = training_settings(tmp_path, max_steps=4) | overrides
    args = DistillationConfig(**settings, terms=LOGITS, temperature=temperature, hard_label_weight=0.0)
    with caplog.at_level(logging.WARNING, logger="llmkd.schemes.diagnostics"):
        trainer = DistillationTrainer(
            model=student(teacher),
            teacher=teacher,
            args=args,
            train_dataset=data if data is not None else lm_dataset(),
            processing_class=make_tokenizer("llama"),
        )
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if r.name == "llmkd.schemes.diagnostics"]
    assert len(warnings) <= 1  # once at most
    return trainer, warnings


def other_student(teacher):
    return seeded(LlamaForCausalLM, llama_config(layers=2, hidden=16), 1)


def all_masked():
    """Every label -100: the collator keeps given labels, so no position is a target."""
    data = lm_dataset(8)
    return data.add_column("labels", [[-100] * len(ids) for ids in data["input_ids"]])


@pytest.mark.parametrize(
    "case, student, temperature, data, cause",
    [
        ("identical", copy.deepcopy, 2.0, None, "identical outputs"),
        ("flat", other_student, 1e4, None, "flat distributions at temperature T=10000"),
        ("masked", other_student, 2.0, all_masked, "no unmasked positions"),
    ],
)
def test_the_no_signal_guard_names_each_cause_once(tmp_path, caplog, case, student, temperature, data, cause):
    trainer, warnings = guard_run(
        tmp_path, caplog, student, temperature, data() if data else None, max_steps=4
    )
    assert len(warnings) == 1 and cause in warnings[0] and "fix:" in warnings[0], warnings
    assert trainer.diagnostics.warning == warnings[0]


def test_the_guard_is_silent_for_a_normal_run_and_diagnostics_can_be_turned_off(tmp_path, caplog):
    trainer, warnings = guard_run(tmp_path, caplog, other_student)
    assert warnings == [] and trainer.diagnostics.warning is None
    assert set(KEYS[:3]) <= set(first_log(trainer))
    quiet, warnings = guard_run(tmp_path, caplog, copy.deepcopy, diagnostics=False, max_steps=2)
    assert warnings == [] and not set(KEYS) & set(first_log(quiet))
    with pytest.raises(ValueError, match="diagnostics must be true or false"):
        DistillationConfig(**training_settings(tmp_path), diagnostics="yes")


def test_diagnostics_are_measured_on_logging_steps_only(tmp_path, caplog, monkeypatch):
    calls = []
    measure = diagnostics.soft_target_stats
    monkeypatch.setattr(diagnostics, "soft_target_stats", lambda *a: calls.append(1) or measure(*a))
    trainer, _ = guard_run(tmp_path, caplog, other_student, logging_steps=2)  # 4 steps, logs at 2 and 4
    assert len(calls) == 2 and all("agreement" in h for h in train_logs(trainer))


def test_mutual_peers_log_their_own_agreement(tmp_path):
    from llmkd.schemes.mutual import MutualConfig, MutualTrainer

    peers = [seeded(BertForSequenceClassification, bert_config(layers=1, hidden=16), s) for s in (1, 2)]
    args = MutualConfig(**training_settings(tmp_path, max_steps=1), num_peers=2, terms=LOGITS)
    trainer = MutualTrainer(
        model=peers,
        args=args,
        train_dataset=classification_dataset(),
        processing_class=make_tokenizer("bert"),
    )
    trainer.train()
    log = first_log(trainer)
    assert {f"peer{k}/{key}" for k in (0, 1) for key in KEYS[:3]} <= set(log)
    # Two peers: each one's teacher is the other, so their agreements are the same number.
    assert log["peer0/agreement"] == log["peer1/agreement"]


def test_training_curves_png_is_written_beside_the_report(tmp_path, llama_pair):
    teacher, student = llama_pair
    trainer = make_trainer(teacher, student, "lm", tmp_path, MIXED, max_steps=2)
    train_and_report(trainer, trainer.args, {})
    out = tmp_path / "out"
    assert (out / REPORT).is_file()
    png = (out / CURVES).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    from PIL import Image

    with Image.open(out / CURVES) as image:
        image.verify()  # decodes: a complete, valid PNG
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]  # written atomically, nothing left over
    panels = curve_series(trainer.state.log_history)
    assert set(panels["entropy of the soft targets (nats)"]) == {"teacher_entropy", "student_entropy"}
    assert "distill/hidden_mse/layer2->1" in panels["per layer pair"]
    assert write_training_curves([{"step": 1, "learning_rate": 0.1}], out / "none.png") is None


@pytest.mark.multiprocess
def test_two_processes_log_the_one_process_diagnostics(tmp_path):
    """tests/metrics_worker.py: the same global batch on 1 process (4 rows) and on 2 (2 rows each)."""
    from metrics_worker import run

    one = run(str(tmp_path / "one"), per_device=4)["train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [os.path.join(ROOT, "tests", "metrics_worker.py"), str(tmp_path / "two")]
    done = run_launcher(cmd, clean=[tmp_path / "two"], env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())["train"]
    keys = diagnostic_keys(one)
    assert set(keys) == set(diagnostic_keys(two)) >= {*KEYS[:3], "distill/hidden_mse/layer2->1"}
    for key, value in keys.items():
        assert two[key] == pytest.approx(value, rel=1e-4), key
