"""Property tier: every logged or reported number is Σ values / Σ items over what it covers, computed once.

Covered: eval agreement and eval terms over uneven evaluation batches; the eval loss; training term logs under
uneven gradient accumulation (a single term of weight 1 equals the logged loss); the same numbers on 2 processes
with a distributed sampler that repeats samples to even out the last batch; and training-time task metrics equal
to `llmkd eval` on the saved checkpoint, in the dataset's label space. Each test has a control showing that the
mean of per-batch means (the old rule) gives another number on the same data.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import yaml
from conftest import (
    BertForSequenceClassification,
    bert_config,
    classification_dataset,
    lm_dataset,
    make_tokenizer,
    run_launcher,
    seeded,
    sentences,
)
from test_padding import per_example
from test_trainer import make_trainer, term_logs
from transformers import AutoModelForSequenceClassification

from llmkd.cli.pipeline import distill
from llmkd.data.glue import load_validation
from llmkd.evaluation.checkpoints import evaluate_checkpoints, predict_logits
from llmkd.evaluation.metrics import compute_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TERMS = [{"knowledge": "logits", "loss": "forward_kl"}, {"knowledge": "hidden", "loss": "mse"}]


def reference(trainer, data) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> ((N,) per-example sums, (N,) items), each example computed alone (independent of batching)."""
    rows = [data[i] for i in range(len(data))]
    singles = [per_example(trainer, [row]) for row in rows]
    out = {}
    for term in trainer.terms:
        counts = torch.stack([s[term.count][0] for s in singles])
        out[term.name] = (torch.stack([s[term.name][0] for s in singles]), counts)
    return out


def mean_of_batch_means(sums: torch.Tensor, counts: torch.Tensor, batch_size: int) -> float:
    means = [
        sums[i : i + batch_size].sum() / counts[i : i + batch_size].sum()
        for i in range(0, len(sums), batch_size)
    ]
    return float(torch.stack(means).mean())


def test_eval_agreement_and_terms_are_global_over_uneven_batches(tmp_path):
    """20 examples in batches of 7, 7 and 6 (the issue's example); wide initialisations make predictions vary."""
    teacher = seeded(BertForSequenceClassification, bert_config(initializer_range=0.5), 0)
    student = seeded(
        BertForSequenceClassification, bert_config(layers=2, hidden=16, initializer_range=0.5), 10
    )
    data = classification_dataset(20, seed=0)
    trainer = make_trainer(teacher, student, "cls", tmp_path, TERMS, per_device_eval_batch_size=7)
    metrics = trainer.evaluate(eval_dataset=data)
    collate = trainer.data_collator
    batch = trainer._prepare_inputs(collate([data[i] for i in range(20)]))
    with torch.no_grad():
        agree = (student.eval()(**batch).logits.argmax(-1) == teacher(**batch).logits.argmax(-1)).float()
    assert metrics["eval_agreement"] == pytest.approx(agree.mean().item(), abs=1e-6)
    assert 0 < agree.mean() < 1
    assert mean_of_batch_means(agree, torch.ones(20), 7) != pytest.approx(
        agree.mean().item(), abs=1e-3
    )  # control
    for name, (sums, counts) in reference(trainer, data).items():
        assert metrics[f"eval_{name}"] == pytest.approx((sums.sum() / counts.sum()).item(), rel=1e-5), name
    logged = sum(t.term.weight * metrics[f"eval_{t.name}"] for t in trainer.terms)
    assert metrics["eval_loss"] == pytest.approx(logged, rel=1e-5)


def test_eval_loss_of_a_causal_lm_weighs_tokens_not_batches(llama_pair, tmp_path):
    teacher, student = llama_pair
    data = lm_dataset(8, seed=9)
    trainer = make_trainer(teacher, student, "lm", tmp_path, TERMS[:1], per_device_eval_batch_size=3)
    metrics = trainer.evaluate(eval_dataset=data)
    sums, counts = reference(trainer, data)["distill/logits_forward_kl"]
    t_squared = trainer.args.temperature**2
    assert metrics["eval_loss"] == pytest.approx((sums.sum() / counts.sum()).item(), rel=1e-5)
    assert metrics["eval_distill/logits_forward_kl"] == pytest.approx(metrics["eval_loss"], rel=1e-6)
    assert t_squared == 4.0  # the logged value includes T², as the loss does
    assert mean_of_batch_means(sums, counts, 3) != pytest.approx(metrics["eval_loss"], rel=1e-3)  # control


@pytest.mark.parametrize("fused", [True, False])
def test_one_term_logged_equals_the_logged_loss_under_uneven_accumulation(llama_pair, tmp_path, fused):
    """One term of weight 1, no task loss, 4 accumulated micro-batches of uneven length (the issue's example)."""
    teacher, student = llama_pair
    data = lm_dataset(8, seed=5)
    trainer = make_trainer(
        teacher, student, "lm", tmp_path, TERMS[:1], train=data, per_device_train_batch_size=2,
        gradient_accumulation_steps=4, max_steps=1, fused_logits=fused, train_sampling_strategy="sequential",
    )  # fmt: skip
    assert trainer.fused is fused
    sums, counts = reference(trainer, data)["distill/logits_forward_kl"]
    trainer.train()
    (loss,) = term_logs(trainer, "loss")
    (logged,) = term_logs(trainer, "distill/logits_forward_kl")
    assert logged == pytest.approx(loss, rel=2e-4)  # Trainer rounds its loss to 4 digits
    assert logged == pytest.approx((sums.sum() / counts.sum()).item(), rel=1e-5)
    assert mean_of_batch_means(sums, counts, 2) != pytest.approx(loss, rel=1e-2)  # control: per-batch means


def test_training_metrics_equal_llmkd_eval_in_the_datasets_label_space(tmp_path):
    """MRPC (F1 of the 'equivalent' class) with a teacher whose class order is the reverse of the dataset's, and
    inputs cut to 8 tokens in training: `llmkd eval` reads that length off the saved checkpoint."""
    teacher_dir, data_dir = tmp_path / "teacher", tmp_path / "data"
    names = {0: "equivalent", 1: "not_equivalent"}  # the Hub dataset's order is the reverse
    config = bert_config(layers=4, id2label=names, label2id={v: k for k, v in names.items()})
    seeded(BertForSequenceClassification, config, 0).save_pretrained(teacher_dir)
    make_tokenizer("bert").save_pretrained(teacher_dir)
    data_dir.mkdir()
    for split, n in (("train", 48), ("validation", 23)):
        first, second = sentences(n, seed=n), sentences(n, seed=n + 1)
        rows = [{"sentence1": a, "sentence2": b, "label": int("w1" in a)} for a, b in zip(first, second)]
        (data_dir / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "teacher": str(teacher_dir), "student_layers": [0, 3], "glue_task": "mrpc", "data_dir": str(data_dir),
        "terms": TERMS[:1], "output_dir": str(tmp_path / "student"), "max_steps": 4, "learning_rate": 0.01,
        "per_device_train_batch_size": 8, "per_device_eval_batch_size": 5, "eval_strategy": "no",
        "save_strategy": "no", "report_to": "none", "use_cpu": True, "seed": 0, "max_length": 8,
    }))  # fmt: skip
    trained = distill(str(recipe))["eval"]
    report = evaluate_checkpoints(
        {"teacher": str(teacher_dir), "student": str(tmp_path / "student")}, "mrpc", data_dir=str(data_dir),
        speed_repeats=0, batch_size=7,
    )  # fmt: skip
    evaluated = report["models"]["student"]
    for metric in ("f1", "accuracy"):
        assert trained[f"eval_{metric}"] == pytest.approx(
            evaluated["metrics"]["mrpc"]["validation"][metric], abs=1e-9
        )
    assert trained["eval_agreement"] == pytest.approx(evaluated["agreement"]["mrpc"], abs=1e-9)
    assert 0 < trained["eval_f1"] < 1
    # Control: scored in the model's label space (the old rule), F1 is the other class's.
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")
    validation = load_validation("mrpc", data_dir=str(data_dir))["validation"]
    logits = predict_logits(model.eval(), make_tokenizer("bert"), validation, "mrpc", 7, 8)
    model_space = [1 - y for y in validation["label"]]  # the data remapped to the reversed class order
    assert compute_metrics("mrpc", logits, model_space)["f1"] != pytest.approx(trained["eval_f1"], abs=1e-3)


@pytest.mark.multiprocess
def test_two_processes_log_and_evaluate_the_one_process_numbers(tmp_path):
    """7 eval rows on 2 processes × batch 2: the sampler repeats a row to even out the last batch."""
    from metrics_worker import run

    one = run(str(tmp_path / "one"), per_device=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [os.path.join(ROOT, "tests", "metrics_worker.py"), str(tmp_path / "two")]
    done = run_launcher(cmd, clean=[tmp_path / "two"], env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    for key, value in one["eval"].items():
        if key.startswith("eval_") and not key.endswith(("runtime", "per_second")):
            assert two["eval"][key] == pytest.approx(value, rel=1e-4), key
    for key in ("distill/logits_forward_kl", "distill/hidden_mse", "loss_ce"):
        assert two["train"][key] == pytest.approx(one["train"][key], rel=1e-4), key
