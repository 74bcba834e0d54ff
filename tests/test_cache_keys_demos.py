"""Demo steps are keyed by content, like the caches of test_cache_keys.py: a finished step is redone when its
recipe, data, teacher or base model changes, and an interrupted one resumes into its folder only for the same
inputs; with a negative control showing the old rule (a finished step's files exist) would have reused it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tokenizer, seeded
from test_cache_keys import big_teacher_folder, flip_unsampled_byte

ROOT = Path(__file__).resolve().parents[1]


# -------------------------------------------------------------------------------------------- demos


@pytest.fixture
def demo(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import demo

    return demo


def test_a_demo_step_is_redone_when_its_recipe_data_or_teacher_changes(demo, tmp_path, capsys):
    recipes, out = tmp_path / "recipes", tmp_path / "student"
    recipes.mkdir()
    (recipes / "r.yaml").write_text("seed: 1\n")
    (tmp_path / "train.jsonl").write_text('{"sentence": "a", "label": 1}\n')
    teacher = big_teacher_folder(tmp_path / "teacher")
    calls = []

    def job(recipe, overrides):
        calls.append(overrides)
        folder = Path(overrides[overrides.index("--output_dir") + 1])
        (folder / "config.json").write_text("{}")
        (folder / demo.REPORT).write_text(json.dumps({"run": len(calls)}))
        return {"run": len(calls)}

    flags = ["--train_file", str(tmp_path / "train.jsonl"), "--teacher", str(teacher)]

    def step():
        return demo.run_once(job, "r.yaml", out, flags, recipes=recipes)

    assert step() == {"run": 1} and step() == {"run": 1} and "is done, reusing it" in capsys.readouterr().out
    changes = {
        "--train_file": lambda: (tmp_path / "train.jsonl").write_text('{"sentence": "b", "label": 1}\n'),
        "recipe": lambda: (recipes / "r.yaml").write_text("seed: 2\n"),
        "--teacher": lambda: flip_unsampled_byte(teacher / "model.safetensors", "b.weight"),
    }
    for what, change in changes.items():
        change()
        assert (out / demo.REPORT).is_file()  # negative control: the version-1 rule reused any finished step
        assert step()["run"] == len(calls) and f"({what} changed); redoing it" in capsys.readouterr().out
    (out / demo.INPUTS).unlink()  # a step finished by the version-1 demo: nothing records its inputs
    step()
    assert "nothing records its inputs" in capsys.readouterr().out and len(calls) == 5


def test_an_interrupted_demo_step_resumes_into_its_folder_only_for_the_same_inputs(demo, tmp_path, capsys):
    work, result = tmp_path / "work", tmp_path / "result.json"

    def ready(inputs):
        return demo.ready(result, tmp_path / "result.inputs", inputs, [result, work])

    assert not ready({"model": "a"})
    work.mkdir()
    (work / "shard-00000.jsonl").write_text("{}\n")  # interrupted here: no result.json
    assert not ready({"model": "a"}) and (work / "shard-00000.jsonl").is_file()  # resumed, kept
    result.write_text("{}")
    assert ready({"model": "a"})
    assert not ready({"model": "b"}) and not work.exists() and not result.exists()
    assert "(model changed); redoing it" in capsys.readouterr().out


def test_make_demo_retrains_the_teacher_and_students_when_the_base_model_changes(demo, tmp_path, capsys):
    from conftest import BertForSequenceClassification, bert_config, sentences

    base = tmp_path / "base"
    seeded(BertForSequenceClassification, bert_config(), 0).save_pretrained(base)
    make_tokenizer("bert").save_pretrained(base)
    for split, n in (("train", 24), ("validation", 8)):
        rows = [{"sentence": s, "label": int("w1" in s)} for s in sentences(n, seed=n)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    argv = ["--smoke", "--out", str(tmp_path / "demo"), "--base-model", str(base)]
    argv += ["--data-dir", str(tmp_path)]
    assert demo.main(argv) == 0 and demo.main(argv) == 0
    assert capsys.readouterr().out.count("is done, reusing it") == 3
    seeded(BertForSequenceClassification, bert_config(), 1).save_pretrained(base)  # another base checkpoint
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    assert "teacher was made from other inputs (--model changed); redoing it" in out
    assert out.count("(--teacher changed); redoing it") == 2 and "reusing" not in out
