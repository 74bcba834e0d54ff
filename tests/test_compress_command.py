"""`llmkd compress` end to end on tiny models: every stage, resume after an interruption, bad data and settings.

The teacher is a 4-layer BERT trained on a toy task (one word tells the class); the reference values (accuracy,
labels of the prepared files) are computed here from the files and the saved models, not read from the report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import WORDS, bert_config, make_tokenizer
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification, BertModel

from llmkd.cli import main
from llmkd.compress import recipes
from llmkd.compress.config import compress_config
from llmkd.compress.report import pareto_front
from llmkd.compress.stages import Stages

NOISE = WORDS[10:]
NAMES = ["neg", "pos"]
RUNS = ("control", "final-features", "final")


def rows(n: int, seed: int, labels=None) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        y = int(i % 2) if labels is None else labels[i]
        words = list(rng.choice(NOISE, 6))
        words.insert(int(rng.integers(0, 7)), WORDS[1 + y])
        out.append({"text": " ".join(words), "label": NAMES[y]})
    return out


def write(path, records) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        for r in records:
            handle.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data files and a trained teacher (4 layers, width 64) in a folder, as a user would have them."""
    root = tmp_path_factory.mktemp("compress")
    write(root / "train.jsonl", rows(400, 0))
    write(root / "validation.jsonl", rows(120, 1))
    torch.manual_seed(0)
    config = bert_config(layers=4, hidden=64, heads=4, id2label=dict(enumerate(NAMES)))
    model, tokenizer = BertForSequenceClassification(config), make_tokenizer()
    data, optimiser = rows(256, 5), torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        batch = data[(step % 8) * 32 : (step % 8 + 1) * 32]
        encoded = tokenizer([r["text"] for r in batch], padding=True, return_tensors="pt")
        labels = torch.tensor([NAMES.index(r["label"]) for r in batch])
        model(**encoded, labels=labels).loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    model.eval().save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    return root


def flags(world, out, **changes) -> list[str]:
    values = {
        "teacher": str(world / "teacher"),
        "train_file": str(world / "train.jsonl"),
        "validation_file": str(world / "validation.jsonl"),
        "speedup": 1.2,
        "budget_minutes": 3,
        "max_epochs": 1,
        "output_dir": str(out),
    } | changes
    return ["compress"] + [t for k, v in values.items() if v is not None for t in (f"--{k}", str(v))]


def accuracy(folder: str, path: str) -> float:
    """The reference: the saved model's own forward pass over the prepared validation file."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = make_tokenizer()
    records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    with torch.no_grad():
        batch = tokenizer([r["text"] for r in records], padding=True, return_tensors="pt")
        predicted = model(**batch).logits.argmax(-1).numpy()
    return float((predicted == np.array([r["label"] for r in records])).mean())


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(flags(world, out)) == 0
    return out


def test_every_stage_runs_and_the_report_holds_the_models_own_scores(finished, world):
    report = json.loads((finished / "report.json").read_text())
    stages = {p.stem for p in (finished / "stages").glob("*.json")}
    assert stages == {"checks", "control", "final", "plan", "report", "search", "shapes"} | (
        {"search-plan"} if "search-plan" in stages else set()
    )
    models = report["evaluation"]["models"]
    validation = str(finished / "data" / "validation.jsonl")
    for name, folder in (("student (distilled)", finished / "student"), ("teacher", world / "teacher")):
        assert models[name]["score"] == pytest.approx(accuracy(str(folder), validation))
    control = finished / "control-labels-only"
    assert models["labels only (control)"]["score"] == pytest.approx(accuracy(str(control), validation))
    chosen = report[
        "choice_on_search_slice"
    ]  # the choice is made on rows held out from training, not validation
    search = str(finished / "data" / "search.jsonl")
    assert chosen["student (distilled)"] == pytest.approx(accuracy(str(finished / "student"), search))
    best = (
        "student"
        if chosen["student (distilled)"] >= chosen["labels only (control)"]
        else "control-labels-only"
    )
    assert report["result"]["folder"] == str(finished / best)
    assert (finished / "student" / "README.md").is_file() and (finished / "compress.png").stat().st_size > 0
    assert "## Candidates" in (finished / "report.md").read_text()
    plan = json.loads((finished / "stages" / "plan.json").read_text())
    steps = {n: yaml.safe_load((finished / "recipes" / f"{n}.yaml").read_text())["max_steps"] for n in RUNS}
    assert steps["control"] == plan["total"] == steps["final-features"] + steps["final"]  # the same steps


def test_the_prepared_files_split_the_rows_without_overlap_and_name_classes_by_the_teachers_ids(
    finished, world
):
    def read(path):
        return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]

    data = {s: read(finished / "data" / f"{s}.jsonl") for s in ("train", "search", "validation")}
    original = {r["text"]: NAMES.index(r["label"]) for r in read(world / "train.jsonl")}
    texts = [r["text"] for r in data["train"] + data["search"]]
    assert sorted(texts) == sorted(original) and not set(texts) & {r["text"] for r in data["validation"]}
    assert all(r["label"] == original[r["text"]] for r in data["train"] + data["search"])
    labels = [r["label"] for r in data["train"][:40]]
    assert labels != sorted(labels) and labels != [i % 2 for i in range(40)]  # shuffled, not the file's order


def test_the_search_ranks_every_kept_shape_and_the_winner_is_what_the_final_run_started_from(finished):
    shapes = json.loads((finished / "stages" / "shapes.json").read_text())
    search = json.loads((finished / "stages" / "search.json").read_text())
    kept = [c["name"] for c in shapes["candidates"]]
    assert kept == shapes["table"]["kept"] and all(c["speedup_low"] >= 1.2 for c in shapes["candidates"])
    if len(kept) > 1:
        assert sorted(search["candidates"]) == sorted(kept)
        assert {c["candidate"] for c in search["calls"] if c["round"] == 0} == set(range(len(kept)))
    recipe = (finished / "recipes" / "control.yaml").read_text()
    assert shapes["candidates"][search["winner_index"]]["folder"] in recipe


def test_a_rerun_reuses_every_finished_stage(finished, world, monkeypatch):
    monkeypatch.setattr(Stages, "train", lambda *a, **k: pytest.fail("a finished run trained again"))
    before = (finished / "report.json").read_text()
    assert main(flags(world, finished)) == 0
    assert (finished / "report.json").read_text() == before


@pytest.mark.parametrize("stop", ["final", "search-2"])
def test_an_interrupted_run_resumes_where_it_stopped(stop, world, tmp_path, monkeypatch):
    """Interrupted in the final run, or at the search's second call (a rerun measures another step rate: the
    search's plan must be the stored one), the rerun finishes without redoing what was done."""
    calls, real = [], Stages.train

    def interrupted(self, command, recipe, name, resume_from=None):
        calls.append(name)
        searched = [c for c in calls if c.startswith("search")]
        if name == stop or (stop == "search-2" and len(searched) == 2):
            raise KeyboardInterrupt
        return real(self, command, recipe, name, resume_from)

    monkeypatch.setattr(Stages, "train", interrupted)
    many = {"max_candidates": 20, "eta": 4} if stop == "search-2" else {}
    with pytest.raises(KeyboardInterrupt):
        main(flags(world, tmp_path / "out", **many))
    before = list(calls)
    assert not (tmp_path / "out" / "report.json").exists()
    calls.clear()
    monkeypatch.setattr(Stages, "train", lambda self, *a, **k: calls.append(a[2]) or real(self, *a, **k))
    assert main(flags(world, tmp_path / "out", **many)) == 0
    if stop == "final":
        assert before[-2:] == ["final-features", "final"]
        assert calls == ["final-features", "final", "control"]  # features' report is reused inside train
    else:
        assert calls[0] == before[-1] and before[0] not in calls  # the first call's run is not repeated
    assert (tmp_path / "out" / "report.json").is_file()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"label_column": "gold"}, "gold"),
        ("one_class", "one class"),
        ("overlap", "also occur"),
        ({"speedup": 1}, "speedup must be a number > 1"),
        ({"budget_minutes": 0}, "budget_minutes"),
        ({"search_share": 0.9}, "search_share"),
        ({"train_file": "absent.jsonl"}, "absent.jsonl"),
        ({"speedp": 2}, "speedup"),
    ],
)
def test_bad_data_and_settings_are_refused_before_any_training(
    change, message, world, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(Stages, "train", lambda *a, **k: pytest.fail("trained despite bad input"))
    if change == "one_class":
        change = {"train_file": write(tmp_path / "one.jsonl", rows(200, 3, labels=[1] * 200))}
    elif change == "overlap":
        change = {"validation_file": write(tmp_path / "v.jsonl", rows(400, 0)[:100])}
    assert main(flags(world, tmp_path / "out", **change)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "students").exists()


def test_other_settings_in_a_used_folder_are_refused(finished, world, capsys):
    assert main(flags(world, finished, learning_rate=1e-3)) == 2
    assert "learning_rate differs" in capsys.readouterr().err


def test_a_fix_after_a_data_error_may_change_the_settings_in_the_same_folder(world, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(flags(world, out, label_column="gold", budget_minutes=2)) == 2
    assert "gold" in capsys.readouterr().err
    assert main(flags(world, out, label_column="label", budget_minutes=2)) == 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seed": 1.5}, "seed must be a whole number"),
        ({"max_length": 100}, "more than the teacher's 64 positions"),
        ("file", "is a file"),
        ("text_columns", "text_columns must name one or two columns"),
    ],
)
def test_more_bad_settings(change, message, world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Stages, "train", lambda *a, **k: pytest.fail("trained despite bad input"))
    argv = flags(world, tmp_path / "out", **(change if isinstance(change, dict) else {}))
    if change == "file":
        (tmp_path / "out").write_text("x")
    elif change == "text_columns":
        argv.append("--text_columns")  # no value: YAML reads it as true
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["base encoder", "classifier of three other classes"])
def test_a_teacher_without_a_head_for_the_classes_is_fine_tuned_first(kind, world, tmp_path):
    """A base encoder, or a classifier whose head has other classes (another size): the teacher stage fine-tunes
    it on the training rows with a fresh head."""
    torch.manual_seed(0)
    if kind == "base encoder":
        model = BertModel(bert_config(layers=4, hidden=64, heads=4))
    else:
        names = {0: "a", 1: "b", 2: "c"}
        model = BertForSequenceClassification(
            bert_config(layers=4, hidden=64, heads=4, num_labels=3, id2label=names)
        )
    model.save_pretrained(tmp_path / "base")
    make_tokenizer().save_pretrained(tmp_path / "base")
    out = tmp_path / "out"
    assert (
        main(flags(world, out, teacher=str(tmp_path / "base"), budget_minutes=4, teacher_learning_rate=3e-3))
        == 0
    )
    tuned = json.loads((out / "stages" / "teacher.json").read_text())
    assert tuned["folder"] == str(out / "teacher")
    assert accuracy(str(out / "teacher"), str(out / "data" / "validation.jsonl")) > 0.9
    labels = json.loads((out / "teacher" / "config.json").read_text())["id2label"]
    assert labels == {"0": "neg", "1": "pos"}  # the data's classes, not the old head's
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation"]["models"]["teacher"]["source"].endswith("teacher")


def test_teacher_schedule_adapts_to_the_data_size():
    config = compress_config({"teacher": "t", "train_file": "f"})
    data = {
        "files": {"train": "a", "search": "b"},
        "text_columns": ["t"],
        "max_length": 32,
        "classes": [0, 1],
    }
    epochs = {
        n: recipes.teacher_recipe(config, data | {"rows": {"train": n}}, "m", "o", None)["num_train_epochs"]
        for n in (300, 2700, 8500, 100_000)
    }
    assert epochs == {300: 10, 2700: 10, 8500: 4, 100_000: 2}
    capped = recipes.teacher_recipe(config, data | {"rows": {"train": 8500}}, "m", "o", max_steps=300)
    assert capped["num_train_epochs"] == 1  # the budget's share: 300 steps hold one epoch of 266
    assert recipes.final_steps(100) == (25, 75) and recipes.final_steps(5) == (0, 5)


def test_pareto_front_matches_a_brute_force_reference():
    rng = np.random.default_rng(0)
    for _ in range(50):
        points = [tuple(p) for p in rng.integers(0, 5, (8, 2)).astype(float)]
        expected = {
            i for i, p in enumerate(points)
            if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)
        }  # fmt: skip
        assert set(pareto_front(points)) == expected
    assert pareto_front([(1.0, 1.0), (2.0, 0.5), (0.5, 0.5)]) == [
        1,
        0,
    ]  # negative control: (0.5, 0.5) is beaten


def test_compress_help_imports_no_torch():
    code = (
        "import sys; from llmkd.cli import main; main(['compress', '--help']); print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().endswith("False") and "--budget_minutes" in done.stdout


def test_an_embedded_alias_reaches_every_stage_as_its_folder(world, tmp_path, monkeypatch):
    """`--teacher embedded:NAME` (a model shipped in a PyPI package) is resolved once, before the teacher check:
    found by running the command on the real alias, which the check used to receive as a Hub id."""
    from llmkd.students import loading

    monkeypatch.setitem(loading.EMBEDDED, "embedded:tiny-test", lambda: str(world / "teacher"))
    out = tmp_path / "out"
    assert main(flags(world, out, teacher="embedded:tiny-test", budget_minutes=2)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation"]["models"]["teacher"]["source"] == str(world / "teacher")
