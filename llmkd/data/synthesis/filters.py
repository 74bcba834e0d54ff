"""ZeroGen's quality filters over teacher-labelled candidates, each counted in the statistics.

Order: length bounds, teacher confidence, agreement with the intended label, duplicates (exact after
normalisation, then near by character-shingle Jaccard), and last class balance, optionally spending part of
every class's quota on the candidates the student gets most wrong (hard-sample mining, after DFAD, Fang et al.
2019, arXiv 1912.11006). A candidate is counted under the first filter that rejects it."""

from __future__ import annotations

import logging
import math
import re
from collections import Counter, defaultdict

logger = logging.getLogger(__name__)
REASONS = (
    "empty",
    "too_short",
    "too_long",
    "low_confidence",
    "disagreement",
    "duplicate_exact",
    "duplicate_near",
    "class_cap",
)


def new_stats(candidates: int) -> dict:
    return {"candidates": candidates} | dict.fromkeys(REASONS, 0)


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed: 'Great  movie!' == 'great movie'."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def shingles(text: str, size: int) -> frozenset:
    """Character n-grams of the normalised text (the whole text when it is shorter than n)."""
    text = normalise(text)
    if len(text) <= size:
        return frozenset({text})
    return frozenset(text[i : i + size] for i in range(len(text) - size + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def dedup_text(candidate: dict) -> str:
    """The text duplicates are judged on: both sentences of a pair."""
    return candidate["text"] + ("\n" + candidate["text_pair"] if "text_pair" in candidate else "")


def rejection(candidate: dict, config) -> str | None:
    """The first per-candidate filter the candidate fails, or None."""
    texts = [candidate["text"]] + ([candidate["text_pair"]] if "text_pair" in candidate else [])
    if any(not t.strip() for t in texts):
        return "empty"
    words, tokens = candidate["num_words"], candidate["num_tokens"]
    if min(words) < config.min_words or min(tokens) < config.min_tokens:
        return "too_short"
    too_many_words = config.max_words is not None and max(words) > config.max_words
    if too_many_words or (config.max_tokens is not None and max(tokens) > config.max_tokens):
        return "too_long"
    if max(candidate["teacher_probs"]) < config.min_confidence:
        return "low_confidence"
    if config.require_agreement and candidate["label"] != candidate["intended_label"]:
        return "disagreement"
    return None


def screen(candidates: list[dict], config, stats: dict) -> list[dict]:
    """Length, confidence, agreement and duplicate filters; the survivors in sample-index order."""
    survivors = []
    for candidate in candidates:
        reason = rejection(candidate, config)
        if reason is None:
            survivors.append(candidate)
        else:
            stats[reason] += 1
    return deduplicate(survivors, config, stats) if config.deduplicate else survivors


def deduplicate(candidates: list[dict], config, stats: dict) -> list[dict]:
    """Keeps the first of every group of exact (normalised) or near (Jaccard >= threshold) duplicates.

    An inverted index from shingle to kept candidates means only texts sharing a shingle are compared."""
    seen, kept, kept_shingles = set(), [], []
    index = defaultdict(list)
    threshold = config.near_duplicate_threshold
    for candidate in candidates:
        key = normalise(dedup_text(candidate))
        if key in seen:
            stats["duplicate_exact"] += 1
            continue
        grams = shingles(dedup_text(candidate), config.shingle_size)
        if threshold is not None and _near(grams, index, kept_shingles, threshold):
            stats["duplicate_near"] += 1
            continue
        seen.add(key)
        for gram in grams:
            index[gram].append(len(kept))
        kept.append(candidate)
        kept_shingles.append(grams)
    return kept


def _near(grams: frozenset, index, kept_shingles, threshold: float) -> bool:
    shared = Counter(j for gram in grams for j in index.get(gram, ()))
    return any(n / (len(grams) + len(kept_shingles[j]) - n) >= threshold for j, n in shared.items())


def class_cap(counts: dict[int, int], config) -> int | None:
    """per_class when set; else with balance the smallest non-empty class count; else no cap."""
    if config.per_class is not None:
        return config.per_class
    present = [n for n in counts.values() if n]
    return min(present) if config.balance and present else None


def select(candidates: list[dict], config, num_labels: int, stats: dict) -> list[dict]:
    """Class balance (teacher labels), with hard_fraction of each class's quota taken by highest
    `teacher_student_kl` when the candidates carry it; the kept rows in sample-index order, marked `hard`."""
    groups = {label: [] for label in range(num_labels)}
    for candidate in candidates:
        groups[candidate["label"]].append(candidate)
    missing = [label for label, group in groups.items() if not group]
    if missing:
        logger.warning("no candidate survived the filters for classes %s; generate more candidates", missing)
    cap = class_cap({label: len(g) for label, g in groups.items()}, config)
    kept = []
    for group in groups.values():
        chosen = _choose(group, cap, config.hard_fraction)
        stats["class_cap"] += len(group) - len(chosen)
        kept.extend(chosen)
    kept.sort(key=lambda c: c["sample_index"])
    stats["missing_classes"] = missing
    stats["kept"] = len(kept)
    stats["kept_per_class"] = {label: sum(c["label"] == label for c in kept) for label in groups}
    stats["hard_selected"] = sum(c.get("hard", False) for c in kept)
    return kept


def _choose(group: list[dict], cap: int | None, hard_fraction: float) -> list[dict]:
    limit = len(group) if cap is None else min(cap, len(group))
    mined = bool(group) and "teacher_student_kl" in group[0]
    hard_count = math.floor(hard_fraction * limit + 0.5) if mined else 0
    # KL below 1e-9 nats is float noise of padded batches (an identical student): ties go to earlier samples.
    by_kl = (
        sorted(group, key=lambda c: (-round(c["teacher_student_kl"], 9), c["sample_index"])) if mined else []
    )
    hard = {c["sample_index"] for c in by_kl[:hard_count]}
    rest = [c for c in group if c["sample_index"] not in hard][: limit - hard_count]
    chosen = {c["sample_index"] for c in rest} | hard
    return [
        c | ({"hard": c["sample_index"] in hard} if mined else {})
        for c in group
        if c["sample_index"] in chosen
    ]
