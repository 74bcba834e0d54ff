"""Task metrics from scikit-learn / scipy (the `evaluate` library fetches its metric scripts from the Hub)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from llmkd.data.glue import GlueTask, get_task, to_dataset_order


def _pearson(y_pred, y_true) -> float:
    return float(pearsonr(y_pred, y_true)[0])


def _spearman(y_pred, y_true) -> float:
    return float(spearmanr(y_pred, y_true)[0])


# Each takes (predicted classes or scores, gold labels). F1 is for the positive class (id 1), as GLUE reports it.
METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda p, y: float(accuracy_score(y, p)),
    "f1": lambda p, y: float(f1_score(y, p, pos_label=1, average="binary")),
    # Any number of classes (a user's data, llmkd.evaluation.any_data): every class present counts alike.
    "macro_f1": lambda p, y: float(f1_score(y, p, average="macro")),
    "matthews_correlation": lambda p, y: float(matthews_corrcoef(y, p)),
    "pearson": _pearson,
    "spearmanr": _spearman,
}


def predicted_labels(task: str | GlueTask, predictions) -> np.ndarray:
    """Class ids from logits (N, C) (argmax), or scores (N,) from (N, 1) / (N,) for the regression task."""
    predictions = np.asarray(predictions)
    if get_task(task).is_regression:
        return predictions.reshape(len(predictions), -1)[:, 0].astype(np.float64)
    return predictions.argmax(axis=-1) if predictions.ndim == 2 else predictions.astype(np.int64)


def compute_metrics(task: str | GlueTask, predictions, labels) -> dict[str, float]:
    """The task's GLUE metrics; `predictions` are logits (N, C), class ids (N,), or stsb scores (N,) / (N, 1)."""
    task = get_task(task)
    predicted, labels = predicted_labels(task, predictions), np.asarray(labels)
    if len(predicted) != len(labels):
        raise ValueError(f"{len(predicted)} predictions but {len(labels)} labels")
    return {name: METRICS[name](predicted, labels) for name in task.metrics}


def task_score(task: str | GlueTask, metrics: Mapping[str, float]) -> float:
    """One number per task: the mean of its metrics (F1/accuracy, Pearson/Spearman), as the GLUE leaderboard, or
    of the task's `score_metrics` when it names them."""
    spec = get_task(task)
    return float(np.mean([metrics[name] for name in spec.score_metrics or spec.metrics]))


def make_compute_metrics(task: str | GlueTask, mapping: Mapping[int, int] | None = None) -> Callable:
    """A `transformers.Trainer(compute_metrics=...)` function for the task, scored in the DATASET's label space.

    `mapping` (dataset label id -> model logit index, from `llmkd.data.glue.align_labels`) is how the training
    data was remapped for a checkpoint with another class order; metrics undo it, so F1 is the positive class's
    and every number equals what `llmkd eval` reports for the same checkpoint and data.
    """
    task = get_task(task)
    inverse = {model: data for data, model in (mapping or {}).items()}

    def _compute(eval_prediction) -> dict[str, float]:
        predictions, labels = _arrays(eval_prediction)
        if mapping:
            predictions = to_dataset_order(predictions, mapping)
            labels = np.array([inverse.get(int(y), int(y)) if y >= 0 else int(y) for y in labels])
        return compute_metrics(task, predictions, labels)

    return _compute


def accuracy(eval_prediction) -> dict[str, float]:
    """Accuracy of argmax predictions, for classifiers outside the GLUE table (their labels are the model's)."""
    predictions, labels = _arrays(eval_prediction)
    return {"accuracy": METRICS["accuracy"](np.argmax(predictions, axis=-1), labels)}


def _arrays(eval_prediction) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) as arrays: models that return hidden states too give a tuple with the logits first, and
    eval_do_concat_batches=False gives lists of per-batch arrays."""
    predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
    if isinstance(predictions, tuple):
        predictions = predictions[0]
    if isinstance(predictions, list):
        predictions = np.concatenate([p[0] if isinstance(p, tuple) else p for p in predictions])
    if isinstance(labels, list):
        labels = np.concatenate(labels)
    return np.asarray(predictions), np.asarray(labels)
