"""The shape of the data `check_data` (llmkd.compress.checks) reports: text lengths, row order, precision.

- lengths in tokens (median, p95, max per split), the share of rows a `max_length` cuts, and a recommended
  max_length: the train p95 rounded up to a multiple of 8 (16 from 128 on), capped at the model's limit;
- order: a file sorted (or grouped) by label makes any slice from the top one-sided — the demo's train.jsonl holds
  9,511 rows, half positive, but its first 4,000 are 97% positive. The class mix of the first 10%, 25% and 50% of
  the rows (and of `max_train_samples`) is compared with the rest by a chi-square test; a prefix that differs
  beyond chance (p < 1e-6) and by more than 0.1 in total variation distance is a warning;
- precision: the half-width of the 95% Wilson interval of an accuracy on a validation set of this size, at 80%
  (or the majority baseline, when higher); above 3 points a warning, since students closer than that cannot be
  told apart on it.

Each function reports into a DataReport (`add(level, code, message, fix)`, `stats`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import chi2_contingency, norm

PRECISION_WARNING_POINTS = 3.0
TYPICAL_ACCURACY = 0.8
CONFIDENCE = 0.95
MAX_MEASURED = 20_000  # rows tokenised per split (a seeded sample beyond): the percentiles need no more
TRUNCATED_WARNING_SHARE = 0.05
ORDER_PREFIXES = (0.1, 0.25, 0.5)
ORDER_MIN_ROWS = 20
ORDER_P_VALUE = 1e-6
ORDER_TVD = 0.1


def token_lengths(tokenizer, data, text_columns, max_rows: int = MAX_MEASURED, seed: int = 0) -> np.ndarray:
    """Tokens per row (special tokens included, nothing cut), (n,) int64; a seeded sample of `max_rows` rows of a
    larger split."""
    rows = np.arange(len(data))
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), max_rows, replace=False))
        data = data.select(rows)
    out = []
    for start in range(0, len(data), 1000):
        chunk = data[start : start + 1000]
        encoded = tokenizer(*(chunk[c] for c in text_columns), truncation=False, verbose=False)
        out += [len(ids) for ids in encoded["input_ids"]]
    return np.asarray(out, dtype=np.int64)


def _limit(tokenizer, model_max_length: int | None) -> int | None:
    if model_max_length:
        return int(model_max_length)
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if isinstance(length, int) and 0 < length < 1_000_000 else None


def recommend_max_length(p95: float, limit: int | None = None) -> int:
    """p95 rounded up to a multiple of 8 (16 from 128 tokens on: kernels like aligned shapes), capped at `limit`."""
    step = 16 if p95 >= 128 else 8
    value = max(step, int(math.ceil(p95 / step)) * step)
    return min(value, limit) if limit else value


def lengths(report, measured: dict, tokenizer, max_length: int | None, model_max_length: int | None) -> None:
    """`measured` {split: token lengths}: stats, the recommendation, warnings for texts a length would cut."""
    limit = _limit(tokenizer, model_max_length)
    stats = {
        split: {
            "rows_measured": len(v),
            "median": float(np.median(v)),
            "p95": float(np.percentile(v, 95)),
            "max": int(v.max()),
        }
        for split, v in measured.items()
    }
    train = measured["train"]
    p95 = max(s["p95"] for s in stats.values())  # validation texts cut at training length would be misjudged
    recommended = recommend_max_length(p95, limit)
    report.stats["lengths"] = stats | {"model_limit": limit, "recommended_max_length": recommended}
    t = stats["train"]
    report.add(
        "info",
        "lengths",
        f"train texts are {t['median']:.0f} tokens long at the median, {t['p95']:.0f} at p95, {t['max']} at most; "
        f"recommended max_length={recommended} (the larger split p95, {p95:.0f}, rounded up"
        f"{f', capped at the model limit {limit}' if limit else ''})",
    )
    if limit and t["max"] > limit:
        share = float(np.mean(train > limit))
        if share > TRUNCATED_WARNING_SHARE:
            report.add(
                "warning",
                "longer_than_model",
                f"{100 * share:.1f}% of train rows are longer than the model's limit of {limit} tokens and are cut",
                "the model cannot read more: if the ends of long texts matter, split them into parts",
            )
    if max_length:
        share = float(np.mean(train > max_length))
        report.stats["lengths"]["cut_at_max_length"] = {"max_length": max_length, "share": share}
        if share > TRUNCATED_WARNING_SHARE and recommended > max_length:
            report.add(
                "warning",
                "truncated",
                f"{100 * share:.1f}% of train rows ({int(np.sum(train > max_length))} of {len(train)} measured) are "
                f"longer than max_length={max_length} tokens and are cut (p95 {p95:.0f}, max {t['max']})",
                f"set max_length={recommended} to keep 95% of the rows whole",
            )


def _prefix(codes: np.ndarray, whole: np.ndarray, size: int) -> dict:
    """The class mix of the first `size` rows against the rest: chi-square p-value, distance to the whole."""
    head = np.bincount(codes[:size], minlength=len(whole))
    p_value = float(chi2_contingency(np.stack([head, whole - head])[:, whole > 0]).pvalue)
    tvd = float(np.abs(head / size - whole / len(codes)).sum() / 2)
    return {
        "prefix_rows": size,
        "tvd": tvd,
        "p_value": p_value,
        "sorted": p_value < ORDER_P_VALUE and tvd > ORDER_TVD,
    }


def order(report, labels: list, max_train_samples: int | None = None) -> None:
    """Warns when a slice from the top of train has another class mix than the whole (a file sorted by label):
    about the `max_train_samples` slice when it is one-sided, else about the most one-sided prefix."""
    n = len(labels)
    classes = sorted(set(labels), key=str)
    sizes = {int(n * f) for f in ORDER_PREFIXES} | ({max_train_samples} if max_train_samples else set())
    sizes = sorted(s for s in sizes if ORDER_MIN_ROWS <= s < n - ORDER_MIN_ROWS)
    if len(classes) < 2 or not sizes:
        return
    index = {c: i for i, c in enumerate(classes)}
    codes = np.fromiter((index[label] for label in labels), dtype=np.int64, count=n)
    whole = np.bincount(codes, minlength=len(classes))
    found = {size: _prefix(codes, whole, size) for size in sizes}
    chosen = found.get(max_train_samples)
    if chosen is None or not chosen["sorted"]:
        chosen = max(found.values(), key=lambda f: f["tvd"])
    size = chosen["prefix_rows"]
    head = np.bincount(codes[:size], minlength=len(classes))
    chosen["prefix_shares"] = {str(c): float(k / size) for c, k in zip(classes, head)}
    chosen["whole_shares"] = {str(c): float(k / n) for c, k in zip(classes, whole)}
    report.stats["order"] = chosen
    if chosen["sorted"]:
        top = int(np.argmax(head))
        report.add(
            "warning",
            "sorted_train",
            f"train rows are ordered by label: the first {size} of {n} rows are {100 * head[top] / size:.1f}% "
            f"{classes[top]!r} (whole file: {100 * whole[top] / n:.1f}%; chi-square p {_p(chosen['p_value'])}); a "
            "max_train_samples slice or any head of the file would be one-sided",
            "shuffle before slicing (compress does; shuffle the file if you slice it yourself)",
        )


def _p(value: float) -> str:
    return "< 1e-300" if value == 0 else f"= {value:.1e}"  # scipy's p underflows to 0 for a sorted file


def wilson_half_width(accuracy: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, list[float]]:
    """(half-width, [low, high]) of the Wilson score interval (Wilson, 1927) of an accuracy p measured on n
    examples, in fractions: centre (p + z²/2n) / (1 + z²/n), half-width z / (1 + z²/n) · √(p(1−p)/n + z²/4n²).
    Written out because a hypothetical accuracy (80%) need not be a whole number of the n examples."""
    z = float(norm.ppf(0.5 + confidence / 2))
    scale = 1 + z * z / n
    centre = (accuracy + z * z / (2 * n)) / scale
    half = z / scale * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    return half, [centre - half, centre + half]


def precision(report, n: int, baseline: float | None, warn_points: float = PRECISION_WARNING_POINTS) -> None:
    """How precisely a validation set of n rows measures an accuracy near 80% (or the baseline when higher)."""
    at = max(TYPICAL_ACCURACY, baseline or 0.0)
    half, interval = wilson_half_width(at, n)
    points = 100 * half
    report.stats["precision"] = {
        "validation_rows": n,
        "at_accuracy": at,
        "half_width_points": points,
        "interval": interval,
    }
    message = (
        f"validation has {n} rows: an accuracy near {100 * at:.0f}% is known to ±{points:.1f} points "
        f"({100 * CONFIDENCE:.0f}% Wilson interval {100 * interval[0]:.1f}–{100 * interval[1]:.1f}%)"
    )
    if points <= warn_points:
        report.add("info", "precision", message)
        return
    z = 1.959964  # the 97.5% normal quantile
    needed = math.ceil(z * z * at * (1 - at) / (warn_points / 100) ** 2)
    report.add(
        "warning",
        "tiny_validation",
        f"{message}; scores closer than that cannot be told apart",
        f"use a larger validation split: about {needed} rows give ±{warn_points:g} points",
    )
