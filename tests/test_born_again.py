"""Born-again networks (Furlanello et al. 2018) through recipes: generations, reruns, the BAN ensemble, refusals.

Tiny stand-ins for the demo: a 4-layer BERT classifier (the model layers come from, like runs/demo/teacher) and a
trained-looking 2-layer student made from its layers [0, 3] (generation 0, like the labels-only student). The
ensemble is checked against a reference computed here, example by example in float64, from the saved models.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    BertForSequenceClassification,
    bert_config,
    make_tokenizer,
    run_launcher,
    seeded,
    sentences,
)
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from llmkd.cli.pipeline import REPORT, distill
from llmkd.cli.self_distill import INIT_DIR, ensemble_prediction
from llmkd.students.from_teacher import student_from_teacher

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes" / "methods"


def make_tiny_demo(root: Path) -> Path:
    """big/ (4 layers), gen0/ (its layers [0, 3], perturbed as if trained) and train/validation.jsonl."""
    tok = make_tokenizer("bert")
    big = seeded(BertForSequenceClassification, bert_config(layers=4, initializer_range=0.5), 0)
    big.save_pretrained(root / "big")
    tok.save_pretrained(root / "big")
    gen0 = student_from_teacher(big, [0, 3])
    with torch.no_grad():
        torch.manual_seed(5)
        for p in gen0.parameters():
            p.add_(0.3 * torch.randn_like(p))
    gen0.save_pretrained(root / "gen0")
    tok.save_pretrained(root / "gen0")
    for split, n in (("train", 40), ("validation", 16)):
        rows = [{"sentence": s, "label": int("w1" in s)} for s in sentences(n, seed=n)]
        (root / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_demo(tmp_path_factory.mktemp("born_again"))


def flags(tiny: Path, out: Path, generations=2, ensemble=True, **extra) -> list[str]:
    options = (
        f"{{generations: {generations}, ensemble: {str(ensemble).lower()}, student_init: {tiny / 'big'}}}"
    )
    values = {
        "smoke": "true", "use_cpu": "true", "teacher": str(tiny / "gen0"), "born_again": options,
        "train_file": str(tiny / "train.jsonl"), "validation_file": str(tiny / "validation.jsonl"),
        "output_dir": str(out), "learning_rate": "0.05",
    } | extra  # fmt: skip
    return [item for key, value in values.items() for item in (f"--{key}", value)]


def reference_ensemble(folders: list[Path], validation: Path) -> tuple[float, list[float]]:
    """Accuracy of the mean of softmax probabilities, and of each member, one example at a time in float64."""
    rows = [json.loads(line) for line in validation.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(folders[0])
    probabilities = []
    for folder in folders:
        model = AutoModelForSequenceClassification.from_pretrained(folder).double().eval()
        per_row = []
        for row in rows:
            with torch.no_grad():
                logits = model(**tok(row["sentence"], return_tensors="pt")).logits[0]
            per_row.append(torch.softmax(logits, -1))
        probabilities.append(torch.stack(per_row))
    labels = torch.tensor([r["label"] for r in rows])
    accuracy = lambda p: (p.argmax(-1) == labels).double().mean().item()  # noqa: E731
    return accuracy(sum(probabilities) / len(probabilities)), [accuracy(p) for p in probabilities]


def test_two_generations_each_taught_by_the_last(tiny, tmp_path):
    out = tmp_path / "ban"
    report = distill(str(RECIPES / "born_again.yaml"), flags(tiny, out))
    generations = [out / "generation-1", out / "generation-2"]
    reports = [json.loads((g / REPORT).read_text()) for g in generations]
    assert [r["teacher"] for r in reports] == [str(tiny / "gen0"), str(generations[0])]
    assert [g["teacher"] for g in report["born_again"]["generations"]] == [r["teacher"] for r in reports]
    init = load_file(out / INIT_DIR / "model.safetensors")
    from_layers = student_from_teacher(
        AutoModelForSequenceClassification.from_pretrained(tiny / "big"), [0, 3]
    )
    for (
        name,
        tensor,
    ) in from_layers.state_dict().items():  # every generation starts from the big model's layers
        if name in init:
            torch.testing.assert_close(init[name], tensor)
    weights = [load_file(g / "model.safetensors") for g in generations]
    moved = [max((w[k] - init[k]).abs().max().item() for k in init) for w in weights]
    assert min(moved) > 1e-4 and max((weights[0][k] - weights[1][k]).abs().max().item() for k in init) > 1e-5
    assert (
        load_file(out / "model.safetensors").keys() == weights[1].keys()
    )  # output_dir = the last generation
    for k, tensor in weights[1].items():
        assert torch.equal(load_file(out / "model.safetensors")[k], tensor)
    assert (
        json.loads((out / REPORT).read_text())["born_again"]["ensemble"] == report["born_again"]["ensemble"]
    )
    ensemble, members = reference_ensemble(generations, tiny / "validation.jsonl")
    section = report["born_again"]["ensemble"]
    assert section["eval"]["eval_accuracy"] == pytest.approx(ensemble, abs=1e-9)
    assert [m["eval_accuracy"] for m in section["members"]] == pytest.approx(members, abs=1e-9)
    assert [m["folder"] for m in section["members"]] == [str(g) for g in generations]
    # the ensemble path scores each member exactly as its own training run's evaluation did
    assert [r["eval"]["eval_accuracy"] for r in reports] == pytest.approx(members, abs=1e-9)


def test_rerun_skips_finished_generations(tiny, tmp_path, caplog):
    out = tmp_path / "ban"
    distill(str(RECIPES / "born_again.yaml"), flags(tiny, out, ensemble=False))
    stamps = {g: (out / g / "model.safetensors").stat().st_mtime_ns for g in ("generation-1", "generation-2")}
    with caplog.at_level(
        logging.INFO, logger="llmkd.cli.self_distill"
    ):  # the evaluation batch size is not an input
        again = distill(
            str(RECIPES / "born_again.yaml"), flags(tiny, out, ensemble=False, per_device_eval_batch_size="3")
        )
    assert caplog.text.count("is done, reusing it") == 2
    assert {g: (out / g / "model.safetensors").stat().st_mtime_ns for g in stamps} == stamps
    assert again["born_again"]["generations"][1]["teacher"] == str(out / "generation-1")
    (out / "generation-2" / REPORT).unlink()  # an interrupted generation 2: only it trains again
    distill(str(RECIPES / "born_again.yaml"), flags(tiny, out, ensemble=False))
    assert (out / "generation-1" / "model.safetensors").stat().st_mtime_ns == stamps["generation-1"]
    assert (out / "generation-2" / "model.safetensors").stat().st_mtime_ns != stamps["generation-2"]
    # control: another setting is another run, so both generations train again
    distill(str(RECIPES / "born_again.yaml"), flags(tiny, out, ensemble=False, learning_rate="0.04"))
    assert (out / "generation-1" / "model.safetensors").stat().st_mtime_ns != stamps["generation-1"]


def test_ensemble_is_the_mean_of_probabilities():
    rng = np.random.default_rng(0)
    logits = [rng.normal(0, 3, size=(5, 3)).astype(np.float32) for _ in range(3)]
    reference = np.zeros((5, 3))
    for member in logits:
        for i, row in enumerate(member.astype(np.float64)):
            reference[i] += np.exp(row - row.max()) / np.exp(row - row.max()).sum() / len(logits)
    np.testing.assert_allclose(np.exp(ensemble_prediction(logits)), reference, rtol=1e-6)
    mean_of_logits = sum(m.astype(np.float64) for m in logits) / 3
    assert not np.allclose(ensemble_prediction(logits), mean_of_logits, atol=1e-2)  # control
    scores = [rng.normal(size=(5, 1)) for _ in range(2)]
    np.testing.assert_allclose(ensemble_prediction(scores), (scores[0] + scores[1]) / 2)


def test_another_architecture_is_refused_before_training(tiny, tmp_path):
    out = tmp_path / "ban"
    wrong = flags(tiny, out, teacher=str(tiny / "big"))  # a 4-layer teacher, 2-layer students
    with pytest.raises(ValueError, match="born-again networks have the teacher's architecture"):
        distill(str(RECIPES / "born_again.yaml"), wrong)
    assert not (out / "generation-1").exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{generations: 0}", "positive integer"),
        ("{generations: 1, ensemble: true}", "generations >= 2"),
        ("{generations: 2, seeds: 3}", "keys from"),
        ("{generations: 2, ensemble: 1}", "true or false"),
    ],
)
def test_bad_born_again_settings_are_refused(tiny, tmp_path, value, message):
    with pytest.raises(ValueError, match=message):
        distill(str(RECIPES / "born_again.yaml"), flags(tiny, tmp_path, born_again=value))


def test_combinations_are_refused(tiny, tmp_path):
    both = flags(tiny, tmp_path, mean_teacher="{decay: 0.9}")
    with pytest.raises(ValueError, match="cannot be combined"):
        distill(str(RECIPES / "born_again.yaml"), both)
    with pytest.raises(ValueError, match="drop student_init"):
        distill(
            str(RECIPES / "born_again.yaml"),
            [*flags(tiny, tmp_path), "--student", str(tiny / "gen0"), "--student_layers", "null"],
        )


@pytest.mark.multiprocess
def test_two_processes_train_the_generations_of_one(tiny, tmp_path):
    """2 CPU processes (torchrun, gloo; 4 rows each) = 1 process (8 rows): the same generations."""
    settings = {"smoke": "false", "max_train_samples": "8", "max_eval_samples": "16", "max_steps": "2"}
    settings |= {"optim": "sgd", "save_strategy": '"no"', "eval_strategy": '"no"', "report_to": "none"}
    distill(
        str(RECIPES / "born_again.yaml"),
        flags(tiny, tmp_path / "one", per_device_train_batch_size="8", **settings),
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    launch += [str(ROOT / "recipes" / "distill.py")]
    two = flags(tiny, tmp_path / "two", per_device_train_batch_size="4", **settings)
    done = run_launcher(
        [*launch, str(RECIPES / "born_again.yaml"), *two], clean=[tmp_path / "two"], env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one, other = (json.loads((tmp_path / d / REPORT).read_text()) for d in ("one", "two"))
    assert [g["eval"]["eval_loss"] for g in other["born_again"]["generations"]] == pytest.approx(
        [g["eval"]["eval_loss"] for g in one["born_again"]["generations"]], rel=1e-5
    )
    assert other["train"]["world_size"] == 2 and one["train"]["world_size"] == 1
    assert other["born_again"]["ensemble"]["eval"] == one["born_again"]["ensemble"]["eval"]
    for generation in ("generation-1", "generation-2"):
        a, b = (load_file(tmp_path / d / generation / "model.safetensors") for d in ("one", "two"))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"{generation}: {key}")
