"""llmkd.data.assets.vader_tasks on a fake sdist with the real nested layout: the genre and amazon-sentiment tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_assets import _ground_truth, _tar_gz

from llmkd.cli.data import main as data_main
from llmkd.data.assets import vader as assets
from llmkd.data.assets.vader_tasks import SOURCES, prepare_task


def fake_sdist(folder: Path) -> Path:
    """Each source with 30 texts named after it (scores alternate in sign; one exact repeat in the tweets)."""
    members = {}
    for name, stem in SOURCES.items():
        rows = [(f"{name} text {i}", (-1) ** i * (1 + i / 10)) for i in range(30)]
        if name == "tweet":
            rows.append(("tweet text 0", 1.0))  # a repeated snippet: must not land in both splits
        members[f"hutto_ICWSM_2014/{stem}_GroundTruth.txt"] = _ground_truth(rows)
    outer = _tar_gz({assets.INNER_ARCHIVE_MEMBER: _tar_gz(members)})
    path = folder / assets.SDIST_NAME
    path.write_bytes(outer)
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_genre_labels_each_text_with_its_source_and_splits_without_overlap(tmp_path):
    sdist = fake_sdist(tmp_path)
    provenance = prepare_task(
        "genre", tmp_path / "out", seed=1, per_class=10, validation_per_class=5, sdist_path=sdist
    )
    train, validation = read(tmp_path / "out" / "train.jsonl"), read(tmp_path / "out" / "validation.jsonl")
    assert all(r["text"].startswith(r["label"]) for r in train + validation)  # the label is the text's source
    assert {r["label"] for r in train} == set(SOURCES) and len(train) == 40 and len(validation) == 20
    assert not {r["text"] for r in train} & {r["text"] for r in validation}
    assert provenance["classes"]["train"] == dict.fromkeys(SOURCES, 10)
    again = prepare_task(
        "genre", tmp_path / "b", seed=1, per_class=10, validation_per_class=5, sdist_path=sdist
    )
    assert again["files_sha256"] == provenance["files_sha256"]  # seeded
    other = prepare_task(
        "genre", tmp_path / "c", seed=2, per_class=10, validation_per_class=5, sdist_path=sdist
    )
    assert other["files_sha256"] != provenance["files_sha256"]  # control: another seed, other rows


def test_amazon_sentiment_follows_the_sign_of_the_score(tmp_path):
    sdist = fake_sdist(tmp_path)
    prepare_task(
        "amazon-sentiment", tmp_path / "out", per_class=100, validation_per_class=3, sdist_path=sdist
    )
    rows = read(tmp_path / "out" / "train.jsonl") + read(tmp_path / "out" / "validation.jsonl")
    assert len(rows) == 30 and all(r["text"].startswith("amazon review") for r in rows)
    for r in rows:  # text i has score (-1)**i * (1 + i/10): even i positive
        assert r["label"] == ("positive" if int(r["text"].rsplit(" ", 1)[1]) % 2 == 0 else "negative")


def test_the_command_and_a_bad_task(tmp_path, capsys):
    sdist = fake_sdist(tmp_path)
    assert data_main(["genre", str(tmp_path / "out"), "--per-class", "5", "--sdist", str(sdist)]) == 0
    assert "genre:" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown task"):
        prepare_task("topics", tmp_path / "x", sdist_path=sdist)
