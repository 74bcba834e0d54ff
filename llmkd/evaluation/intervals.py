"""95% confidence intervals for evaluation scores and for differences between models (percentile bootstrap).

A validation set of a few hundred examples measures accuracy to about ±2–3 points, so a score without its
interval invites reading noise as progress. Method: the percentile bootstrap over examples (Efron & Tibshirani,
"An Introduction to the Bootstrap", 1993, ch. 13). Replicate r of split number s draws n example indices with
replacement from `numpy.random.default_rng((seed, s, r))`, so every model is scored on the SAME resamples:

- a score's interval is the (2.5, 97.5) percentile of its replicate scores;
- a difference to the reference is PAIRED: the percentiles of (model − reference) replicate by replicate. Two
  models that err on the same examples have a much narrower interval for their difference than either score
  alone (an unpaired interval would add both variances and hide a real gap);
- a task's score (mean of its metrics and splits) and the macro score (mean of tasks) are averaged replicate
  by replicate, each split resampled on its own.

Metrics are vectorised over replicates (confusion counts, centred sums); they equal scikit-learn / scipy on
each resample (tests/test_eval_any_data.py holds them to a loop over sklearn with the same indices).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from scipy.stats import rankdata

CONFIDENCE = 0.95
RESAMPLES = 1000
CHUNK = 2_000_000  # indices held at once (16 MB)
METHOD = (
    "percentile bootstrap over examples (each split resampled on its own); differences to the reference paired "
    "(both models scored on the same resamples)"
)


def resample_indices(n: int, resamples: int, seed: int = 0, stream: int = 0, start: int = 0) -> np.ndarray:
    """(resamples, n) example indices drawn with replacement: rows start .. start+resamples-1, row r drawn by
    default_rng((seed, stream, r)), so a row does not depend on how many rows are drawn or in which chunks."""
    if n < 1 or resamples < 1:
        raise ValueError(f"need n >= 1 examples and resamples >= 1, got n={n}, resamples={resamples}")
    rows = range(start, start + resamples)
    return np.stack([np.random.default_rng((seed, stream, r)).integers(0, n, n) for r in rows])


def _confusion(predicted, labels, indices) -> tuple[np.ndarray, np.ndarray]:
    """(counts (B, K, K) gold × predicted per replicate, the K class values) over the classes seen in either."""
    classes, codes = np.unique(np.concatenate([labels, predicted]), return_inverse=True)
    k, n = len(classes), len(labels)
    pair = codes[:n] * k + codes[n:]  # gold class × predicted class
    offsets = np.arange(len(indices))[:, None] * (k * k)
    counts = np.bincount((pair[indices] + offsets).ravel(), minlength=len(indices) * k * k)
    return counts.reshape(len(indices), k, k).astype(np.float64), classes


def _f1_per_class(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(F1 (B, K) = 2TP / (2TP + FP + FN), 0 where undefined as in sklearn; whether the class occurs (B, K))."""
    tp = np.diagonal(counts, axis1=1, axis2=2)
    denominator = counts.sum(axis=1) + counts.sum(axis=2)  # predicted + gold = 2TP + FP + FN
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denominator > 0, 2 * tp / denominator, 0.0)
    return f1, denominator > 0


def _accuracy(predicted, labels, indices) -> np.ndarray:
    return (predicted == labels)[indices].mean(axis=1)


def _binary_f1(predicted, labels, indices) -> np.ndarray:
    """F1 of the positive class (id 1), as GLUE reports it; 0 when class 1 never occurs (sklearn's value)."""
    counts, classes = _confusion(predicted, labels, indices)
    if 1 not in classes:
        return np.zeros(len(indices))
    return _f1_per_class(counts)[0][:, int(np.searchsorted(classes, 1))]


def _macro_f1(predicted, labels, indices) -> np.ndarray:
    """Mean F1 over the classes present in the resample's gold or predicted labels (sklearn average="macro")."""
    f1, present = _f1_per_class(_confusion(predicted, labels, indices)[0])
    return (f1 * present).sum(axis=1) / present.sum(axis=1)


def _matthews(predicted, labels, indices) -> np.ndarray:
    """Multiclass MCC from the confusion counts (Gorodkin 2004; sklearn's formula, 0 where undefined)."""
    counts, _ = _confusion(predicted, labels, indices)
    gold, pred = counts.sum(axis=2), counts.sum(axis=1)
    correct, total = np.trace(counts, axis1=1, axis2=2), counts.sum(axis=(1, 2))
    cov_gp = correct * total - (gold * pred).sum(axis=1)
    cov_pp = total**2 - (pred * pred).sum(axis=1)
    cov_gg = total**2 - (gold * gold).sum(axis=1)
    denominator = cov_pp * cov_gg
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, cov_gp / np.sqrt(denominator), 0.0)


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    denominator = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (x * y).sum(axis=1) / denominator, np.nan)  # scipy: NaN if constant


def _pearson(predicted, labels, indices) -> np.ndarray:
    return _pearson_rows(predicted[indices].astype(np.float64), labels[indices].astype(np.float64))


def _spearman(predicted, labels, indices) -> np.ndarray:
    # Ranks with ties averaged (a resample repeats examples, so ties are the rule): Pearson of the ranks.
    return _pearson_rows(rankdata(predicted[indices], axis=1), rankdata(labels[indices], axis=1))


# Same names as llmkd.evaluation.metrics.METRICS; each maps (predicted (n,), gold (n,), indices (B, n)) -> (B,).
REPLICATES: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    "accuracy": _accuracy,
    "f1": _binary_f1,
    "macro_f1": _macro_f1,
    "matthews_correlation": _matthews,
    "pearson": _pearson,
    "spearmanr": _spearman,
}


def replicate_scores(metric: str, predicted, labels, indices: np.ndarray) -> np.ndarray:
    """The metric on each resample: (B,) float64 for indices (B, n) into `predicted` and `labels` (n,)."""
    if metric not in REPLICATES:
        raise ValueError(f"no bootstrap for metric {metric!r}; known: {sorted(REPLICATES)}")
    return REPLICATES[metric](np.asarray(predicted), np.asarray(labels), indices).astype(np.float64)


def percentile_interval(replicates: np.ndarray, confidence: float = CONFIDENCE) -> list[float] | None:
    """[low, high]: the (1−c)/2 and (1+c)/2 percentiles (numpy's linear interpolation) of the finite replicates;
    None when fewer than half are finite (e.g. a correlation of constant predictions)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    finite = np.asarray(replicates, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if 2 * len(finite) < len(replicates) or len(finite) == 0:
        return None
    tail = 100 * (1 - confidence) / 2
    return [float(v) for v in np.percentile(finite, [tail, 100 - tail])]


def split_replicates(
    predictions: Mapping[str, np.ndarray], labels: np.ndarray, metrics, resamples: int, seed: int, stream: int
) -> dict[str, dict[str, np.ndarray]]:
    """{model: {metric: (B,)}} on one split: every model on the same resamples, drawn CHUNK indices at a time
    (a 40k-example split with 1000 resamples would otherwise hold 40M indices)."""
    n = len(labels)
    rows = max(1, CHUNK // n)
    parts = {name: {m: [] for m in metrics} for name in predictions}
    for start in range(0, resamples, rows):
        indices = resample_indices(n, min(rows, resamples - start), seed, stream, start)
        for name, predicted in predictions.items():
            for metric in metrics:
                parts[name][metric].append(replicate_scores(metric, predicted, labels, indices))
    return {name: {m: np.concatenate(v) for m, v in by_metric.items()} for name, by_metric in parts.items()}


def all_replicates(predictions, labels, metrics, resamples: int, seed: int, score_metrics=None) -> dict:
    """{model: {"metrics": {task: {split: {metric: (B,)}}}, "task_scores": {task: (B,)}, "score": (B,)}}.

    `predictions` {model: {task: predicted labels, splits concatenated in `labels` order}}; `labels` {task:
    {split: gold (n,)}}; `metrics` {task: names}; a task's score averages its `score_metrics` {task: names}
    (default: all its metrics) over its splits, as metrics.task_score; the score averages the tasks.
    """
    out = {name: {"metrics": {t: {} for t in labels}, "task_scores": {}} for name in predictions}
    stream = 0
    for task, splits in labels.items():
        bounds = np.cumsum([0, *(len(y) for y in splits.values())])
        for i, (split, gold) in enumerate(splits.items()):
            part = {name: np.asarray(p[task])[bounds[i] : bounds[i + 1]] for name, p in predictions.items()}
            per_model = split_replicates(part, np.asarray(gold), metrics[task], resamples, seed, stream)
            for name, values in per_model.items():
                out[name]["metrics"][task][split] = values
            stream += 1
    for reps in out.values():
        for task, splits in reps["metrics"].items():
            names = (score_metrics or {}).get(task) or metrics[task]
            per_split = [np.mean([values[m] for m in names], axis=0) for values in splits.values()]
            reps["task_scores"][task] = np.mean(per_split, axis=0)
        reps["score"] = np.mean(list(reps["task_scores"].values()), axis=0)
    return out


def add_intervals(
    models: dict,
    predictions: Mapping[str, Mapping[str, np.ndarray]],
    labels: Mapping[str, Mapping[str, np.ndarray]],
    metrics: Mapping[str, list[str]],
    reference: str | None,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    score_metrics: Mapping[str, list[str]] | None = None,
) -> dict:
    """Adds "intervals" (same layout as "metrics"/"task_scores"/"score", each a [low, high]) to every entry of
    `models` and, with a `reference`, "vs_reference": {"task_scores": {task: d}, "score": d,
    "intervals": {"task_scores": {task: [low, high]}, "score": [low, high]}} where d = entry − reference (metric
    units, 0–1). `score_metrics` {task: names} as in all_replicates. Returns the settings, for the results'
    "intervals" field."""
    predictions = {name: predictions[name] for name in models}
    replicates = all_replicates(predictions, labels, metrics, resamples, seed, score_metrics)

    def interval(values):
        return percentile_interval(values, confidence)

    for name, entry in models.items():
        reps = replicates[name]
        entry["intervals"] = {
            "metrics": {
                t: {s: {m: interval(v) for m, v in by_metric.items()} for s, by_metric in splits.items()}
                for t, splits in reps["metrics"].items()
            },
            "task_scores": {t: interval(v) for t, v in reps["task_scores"].items()},
            "score": interval(reps["score"]),
        }
        if reference is None:
            continue
        ref, ref_entry = replicates[reference], models[reference]
        entry["vs_reference"] = {
            "task_scores": {t: s - ref_entry["task_scores"][t] for t, s in entry["task_scores"].items()},
            "score": entry["score"] - ref_entry["score"],
            "intervals": {
                "task_scores": {
                    t: interval(v - ref["task_scores"][t]) for t, v in reps["task_scores"].items()
                },
                "score": interval(reps["score"] - ref["score"]),
            },
        }
    return {"method": METHOD, "confidence": confidence, "resamples": resamples, "seed": seed}
