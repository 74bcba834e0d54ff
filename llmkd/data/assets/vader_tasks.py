"""Classification tasks other than movie-review sentiment, from the same offline source (the vaderSentiment 3.3.2
sdist's `hutto_ICWSM_2014` ground truth: Hutto & Gilbert 2014, "VADER", ICWSM): 4,200 tweets, 3,708 Amazon review
snippets, 5,190 New York Times editorial snippets and 10,605 movie review snippets, each with the mean of its
raters' sentiment scores (-4 to 4).

- `genre`: which of the four sources a text comes from (4 classes; a text-genre task, not sentiment);
- `amazon-sentiment`: whether an Amazon review snippet is positive (score > 0) or negative (score < 0; 0 dropped).

`prepare_task(name, out_dir)` writes train.jsonl and validation.jsonl ({"text", "label"}: class names) atomically,
a seeded sample of `per_class` training and `validation_per_class` validation rows per class (fewer when a class
has fewer rows), and provenance.json (source checksums, sizes, seed). Nothing is extracted from the archives.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from llmkd.data.assets.vader import (
    INNER_ARCHIVE_MEMBER,
    _jsonl,
    _read_member,
    _sha256_bytes,
    _write_atomic,
    download_vader_sdist,
    tsv_fields,
)

SOURCES = {
    "tweet": "tweets",
    "amazon review": "amazonReviewSnippets",
    "nyt editorial": "nytEditorialSnippets",
    "movie review": "movieReviewSnippets",
}
TASKS = ("genre", "amazon-sentiment")


def read_sources(sdist_path=None, cache_dir=None) -> tuple[dict[str, list[tuple[str, float]]], dict]:
    """{source name: [(text, score)]} and the sha256 of each file read."""
    sdist = Path(sdist_path) if sdist_path else download_vader_sdist(cache_dir)
    with tarfile.open(sdist, mode="r:gz") as outer:
        inner = _read_member(outer, INNER_ARCHIVE_MEMBER, str(sdist))
    rows, checksums = {}, {}
    with tarfile.open(fileobj=io.BytesIO(inner), mode="r:gz") as archive:
        for name, stem in SOURCES.items():
            member = f"hutto_ICWSM_2014/{stem}_GroundTruth.txt"
            data = _read_member(archive, member, f"{sdist}!{INNER_ARCHIVE_MEMBER}")
            checksums[member] = _sha256_bytes(data)
            rows[name] = [
                (fields[2].strip(), float(fields[1]))
                for _, _, fields in tsv_fields(data)
                if len(fields) == 3 and fields[2].strip()
            ]
    return rows, checksums


def task_rows(name: str, sources: dict) -> dict[str, list[str]]:
    """{class name: texts} of task `name`. Raises ValueError for an unknown task."""
    if name == "genre":
        return {source: [text for text, _ in rows] for source, rows in sources.items()}
    if name == "amazon-sentiment":
        reviews = sources["amazon review"]
        return {
            "negative": [t for t, s in reviews if s < 0],
            "positive": [t for t, s in reviews if s > 0],
        }
    raise ValueError(f"unknown task {name!r}: choose one of {list(TASKS)}")


def prepare_task(
    name: str,
    out_dir,
    seed: int = 42,
    per_class: int = 1000,
    validation_per_class: int = 250,
    sdist_path=None,
    cache_dir=None,
) -> dict:
    """Writes OUT_DIR/train.jsonl, validation.jsonl and provenance.json; returns the provenance."""
    if per_class < 1 or validation_per_class < 1:
        raise ValueError(
            f"per_class={per_class}, validation_per_class={validation_per_class}: need >= 1 each"
        )
    sources, checksums = read_sources(sdist_path, cache_dir)
    classes = task_rows(name, sources)
    rng = np.random.default_rng(seed)
    splits = {"train": [], "validation": []}
    for label, texts in classes.items():
        unique = list(dict.fromkeys(texts))  # a repeated snippet must not land in both splits
        order = rng.permutation(len(unique))
        n_val = min(validation_per_class, len(unique) // 5)
        picked = [unique[i] for i in order[: n_val + per_class]]
        splits["validation"] += [{"text": t, "label": label} for t in picked[:n_val]]
        splits["train"] += [{"text": t, "label": label} for t in picked[n_val:]]
    for rows in splits.values():
        rng.shuffle(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {split: _write_atomic(out / f"{split}.jsonl", _jsonl(rows)) for split, rows in splits.items()}
    provenance = {
        "task": name,
        "seed": seed,
        "sizes": {split: len(rows) for split, rows in splits.items()},
        "classes": {
            split: {c: sum(r["label"] == c for r in rows) for c in classes} for split, rows in splits.items()
        },
        "sources": checksums,
        "files_sha256": files,
    }
    _write_atomic(out / "provenance.json", json.dumps(provenance, indent=2).encode("utf-8"))
    return provenance
