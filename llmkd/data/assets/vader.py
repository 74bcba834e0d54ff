"""Real text for the offline demo, from the vaderSentiment sdist on PyPI (the only index the demo may reach).

Data: the 10,605 Rotten Tomatoes sentences (Pang & Lee; the sentences SST-2 was built from) with mean human
sentiment scores in [-4, 4] from Hutto & Gilbert (ICWSM 2014), MIT licence. They ship only in the *source*
distribution of ``vaderSentiment==3.3.2``, as ``movieReviewSnippets_GroundTruth.txt`` inside a tar.gz inside
the sdist. ``prepare_rotten_tomatoes`` turns them into an SST-2-style binary task.

What the file looks like (checked on the pinned copy): UTF-8 without BOM, CRLF line ends, no newline after the
last row, tab-separated ``ID, MEAN-SCORE, TEXT``, IDs 1..10605, scores in [-3.875, 3.941], 37 rows scored
exactly 0. Its quirks come from the original corpus and are kept: double quotes written as two apostrophes
(``''Conan''``), hyphens and dashes replaced by spaces (``co writer``, runs of spaces where a dash was) and a
few accented names (``Almodóvar``). Sentences are only stripped: tokenizers treat runs of spaces as one, and
rewriting text would make it differ from the scores the raters gave. Two sentences occur twice with different
IDs (same sign); they are kept, as in the source.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from llmkd.atomic import atomic_write
from llmkd.content import code_key

logger = logging.getLogger(__name__)

VADER_PACKAGE = "vaderSentiment"
VADER_VERSION = "3.3.2"
SDIST_NAME = f"{VADER_PACKAGE}-{VADER_VERSION}.tar.gz"
INNER_ARCHIVE_MEMBER = f"{VADER_PACKAGE}-{VADER_VERSION}/additional_resources/hutto_ICWSM_2014.tar.gz"
GROUND_TRUTH_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
# Pinned from the PyPI file; only GROUND_TRUTH_SHA256 is enforced (it is what the rows are made of), the
# archive checksums are recorded in provenance.json so a different packaging of the same file is visible.
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_ARCHIVE_SHA256 = "d5bb07d87474b3eb8d30b4deccbc23f19d742a6c5718fbacc65485b70b95c5fa"
GROUND_TRUTH_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
GROUND_TRUTH_ROWS = 10605

FORMAT_VERSION = 1  # bump when the jsonl layout or the split rule changes, so old outputs are rebuilt
SPLIT_FILES = ("train.jsonl", "validation.jsonl")
PROVENANCE_FILE = "provenance.json"


# ------------------------------------------------------------------------------------------ raw data


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmkd"


def download_vader_sdist(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of ``vaderSentiment-3.3.2.tar.gz`` in ``cache_dir``, downloaded with pip unless already there."""
    cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    target = cache_dir / SDIST_NAME
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # pip writes into a private folder first, so an interrupted download never looks like a cached file.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        command += ["--quiet", f"{VADER_PACKAGE}=={VADER_VERSION}", "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        downloaded = Path(tmp) / SDIST_NAME
        if result.returncode != 0 or not downloaded.is_file():
            raise RuntimeError(
                f"could not download the {VADER_PACKAGE} sdist with `{shlex.join(command)}` "
                f"(exit {result.returncode}): {result.stderr.strip()[-2000:]}\n"
                f"Download {SDIST_NAME} yourself and pass its path (--sdist PATH)."
            )
        os.replace(downloaded, target)
    return target


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_member(archive: tarfile.TarFile, name: str, where: str) -> bytes:
    # Members are read into memory by their exact, known name: nothing is extracted, so absolute paths,
    # `..` and links in the archive can never write outside a folder.
    try:
        member = archive.getmember(name)
    except KeyError:
        raise ValueError(
            f"{where} has no member {name!r}; is it the {VADER_PACKAGE} {VADER_VERSION} sdist?"
        ) from None
    if not member.isfile():
        raise ValueError(f"{where}: member {name!r} is not a regular file")
    return archive.extractfile(member).read()


def _ground_truth_bytes(sdist_path: Path) -> tuple[bytes, bytes]:
    """(inner archive, ground-truth file) bytes, read straight from the sdist."""
    with tarfile.open(sdist_path, mode="r:gz") as outer:
        inner_bytes = _read_member(outer, INNER_ARCHIVE_MEMBER, str(sdist_path))
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        truth = _read_member(inner, GROUND_TRUTH_MEMBER, f"{sdist_path}!{INNER_ARCHIVE_MEMBER}")
    return inner_bytes, truth


def _verify_sha256(data: bytes, expected: str, what: str) -> str:
    found = _sha256_bytes(data)
    if found != expected:
        raise ValueError(f"sha256 mismatch for {what}: expected {expected}, found {found}")
    return found


def tsv_fields(data: bytes):
    """(line number, line, its first 3 tab-separated fields) of a UTF-8 file; CRLF or LF, blank lines skipped."""
    for number, line in enumerate(data.decode("utf-8-sig").split("\n"), start=1):
        line = line.rstrip("\r")
        if line.strip():
            yield number, line, line.split("\t", 2)


def _parse_ground_truth(data: bytes) -> list[tuple[int, str, float]]:
    """(ID, sentence, score) rows of the tab-separated file; CRLF or LF line ends, optional final newline."""
    rows = []
    for number, line, fields in tsv_fields(data):
        try:
            row_id, score, sentence = int(fields[0]), float(fields[1]), fields[2].strip()
        except (IndexError, ValueError):
            raise ValueError(
                f"{GROUND_TRUTH_MEMBER} line {number}: expected 'ID<TAB>SCORE<TAB>TEXT', got {line!r}"
            ) from None
        if not sentence or not math.isfinite(score):
            raise ValueError(f"{GROUND_TRUTH_MEMBER} line {number}: empty text or non-finite score: {line!r}")
        rows.append((row_id, sentence, score))
    return rows


def _load(sdist_path: str | os.PathLike, expected_sha256: str | None) -> tuple[list, dict]:
    sdist_path = Path(sdist_path)
    expected = expected_sha256 or GROUND_TRUTH_SHA256
    inner_bytes, truth = _ground_truth_bytes(sdist_path)
    checksums = {
        "sdist": _sha256_file(sdist_path),
        "inner_archive": _sha256_bytes(inner_bytes),
        "ground_truth": _verify_sha256(truth, expected, f"{sdist_path}!{GROUND_TRUTH_MEMBER}"),
    }
    return _parse_ground_truth(truth), checksums


def read_rotten_tomatoes(
    sdist_path: str | os.PathLike, expected_sha256: str | None = None
) -> list[tuple[str, float]]:
    """(sentence, mean sentiment score) for every row of the ground-truth file, in file order.

    ``expected_sha256`` (default: the pinned GROUND_TRUTH_SHA256) is checked against the file's bytes; a
    mismatch raises ValueError naming both checksums.
    """
    rows, _ = _load(sdist_path, expected_sha256)
    return [(sentence, score) for _, sentence, score in rows]


# ------------------------------------------------------------------------------------------- the task


def _binary_rows(rows: list[tuple[int, str, float]]) -> list[dict]:
    # A mean of exactly 0 means the raters did not lean either way: no binary label is right, so drop it.
    return [
        {"idx": row_id, "sentence": sentence, "label": int(score > 0), "score": score}
        for row_id, sentence, score in rows
        if score != 0
    ]


def _split(rows: list[dict], seed: int, validation_fraction: float) -> dict[str, list[dict]]:
    """Train and validation rows, stratified by label so both keep the full data's label balance.

    Each label's rows are permuted with numpy's PCG64 generator seeded with ``seed`` and the first
    round(fraction * count) go to validation; each split stays in source order. NumPy does not promise
    identical Generator streams across versions, so provenance.json records the numpy version and the
    checksums of the files.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray([row["label"] for row in rows])
    is_validation = np.zeros(len(rows), dtype=bool)
    for label in (0, 1):
        members = np.flatnonzero(labels == label)
        is_validation[rng.permutation(members)[: round(validation_fraction * len(members))]] = True
    splits = {
        "train": [row for row, val in zip(rows, is_validation) if not val],
        "validation": [row for row, val in zip(rows, is_validation) if val],
    }
    if not all(splits.values()):
        sizes = {name: len(split) for name, split in splits.items()}
        raise ValueError(f"validation_fraction={validation_fraction} leaves a split empty: {sizes}")
    return splits


def _write_atomic(path: Path, data: bytes) -> str:
    """Write atomically (readers never see half a file); returns the data's sha256 for the provenance."""
    atomic_write(path, lambda handle: handle.write(data), "wb")
    return _sha256_bytes(data)


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def _label_counts(rows: list[dict]) -> dict[str, int]:
    return {str(label): sum(row["label"] == label for row in rows) for label in (0, 1)}


def build_inputs() -> dict:
    """The code and library that turn the ground-truth rows into the split files, as recorded and compared on
    reuse (the ground truth, seed and fraction are compared beside them): an edit to the label or split rule,
    or a numpy whose Generator stream differs, rebuilds the files instead of serving ones it would not make."""
    return {
        "code_sha256": code_key(_parse_ground_truth, _binary_rows, _split, _jsonl),
        "numpy_version": np.__version__,
    }


def _existing_provenance(out_dir: Path, seed: int, fraction: float, expected: str) -> dict | None:
    """The saved provenance when it was made from these inputs and the files it describes are intact."""
    try:
        provenance = json.loads((out_dir / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    try:
        wanted = {"format_version": FORMAT_VERSION, "seed": seed, "validation_fraction": fraction}
        wanted |= {"ground_truth": expected, **build_inputs()}
        found = {key: provenance.get(key) for key in wanted} | {
            "ground_truth": provenance["sha256"]["ground_truth"]
        }
        changed = sorted(key for key in wanted if found[key] != wanted[key])
        if not changed and any(_sha256_file(out_dir / n) != provenance["files"][n] for n in SPLIT_FILES):
            changed = ["the split files (modified since written)"]
    except (OSError, KeyError, TypeError, AttributeError):
        changed = ["an unreadable provenance.json"]
    if changed:
        logger.warning("rebuilding %s: %s differ from what it was made with", out_dir, ", ".join(changed))
        return None
    return provenance


def _check_arguments(seed: int, validation_fraction: float) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")


def _provenance(
    total: int, splits: dict, checksums: dict, seed: int, validation_fraction: float, files: dict
) -> dict:
    """What provenance.json holds: enough to re-create the files and to notice any input that differs."""
    kept = sum(len(split) for split in splits.values())
    return {
        "format_version": FORMAT_VERSION,
        "dataset": "Rotten Tomatoes sentences with VADER human sentiment scores (Hutto & Gilbert, ICWSM 2014)",
        "source": {
            "package": VADER_PACKAGE,
            "version": VADER_VERSION,
            "distribution": "sdist",
            "licence": "MIT",
            "members": [INNER_ARCHIVE_MEMBER, GROUND_TRUTH_MEMBER],
        },
        "sha256": checksums,
        "rows": {"total": total, "zero_score_dropped": total - kept, "kept": kept},
        "label_rule": "label = 1 if score > 0, 0 if score < 0; score == 0 dropped",
        "seed": seed,
        "validation_fraction": validation_fraction,
        "split_method": "stratified by label; per-label numpy.random.default_rng(seed).permutation",
        **build_inputs(),
        "sizes": {name: len(split) for name, split in splits.items()},
        "labels": {name: _label_counts(split) for name, split in splits.items()},
        "files": files,
    }


def prepare_rotten_tomatoes(
    out_dir: str | os.PathLike,
    seed: int = 42,
    validation_fraction: float = 0.1,
    sdist_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    expected_sha256: str | None = None,
) -> dict:
    """Write an SST-2-style binary task to ``out_dir`` and return its provenance.

    Files: ``train.jsonl`` and ``validation.jsonl`` (columns ``idx`` = source ID, ``sentence``, ``label`` =
    1 if score > 0 else 0, ``score``; zero-score rows dropped; rows in source order) and ``provenance.json``,
    written last. A re-run with the same seed, fraction, checksum and `build_inputs` whose files are intact
    returns the saved provenance without reading the archive; anything else rebuilds, with a log line. ``sdist_path`` defaults to ``download_vader_sdist(cache_dir)``.
    """
    _check_arguments(seed, validation_fraction)
    out_dir = Path(out_dir)
    expected = expected_sha256 or GROUND_TRUTH_SHA256
    existing = _existing_provenance(out_dir, seed, validation_fraction, expected)
    if existing is not None:
        return existing
    rows, checksums = _load(sdist_path or download_vader_sdist(cache_dir), expected)
    splits = _split(_binary_rows(rows), seed, validation_fraction)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        f"{name}.jsonl": _write_atomic(out_dir / f"{name}.jsonl", _jsonl(split))
        for name, split in splits.items()
    }
    provenance = _provenance(len(rows), splits, checksums, seed, validation_fraction, files)
    _write_atomic(out_dir / PROVENANCE_FILE, (json.dumps(provenance, indent=2) + "\n").encode("utf-8"))
    return provenance
