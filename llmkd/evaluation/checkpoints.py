"""Teacher-vs-student evaluation on GLUE-format tasks: scores, agreement, size and CPU speed, as a report.

Checkpoints are PyTorch folders, in-memory models or ONNX exports (`llmkd.evaluation.onnx_runtime.OrtClassifier`).
`evaluate_checkpoints` returns a JSON-able dict; `write_report` turns it into report.md, report.json and
score_vs_speedup.png. `main` is the `llmkd eval` / `python eval/glue.py` command line.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from llmkd.data.collate import DistillationCollator
from llmkd.data.glue import (
    DataSource,
    GlueTask,
    align_labels,
    get_task,
    load_validation,
    resolve_tasks,
    to_dataset_order,
)
from llmkd.evaluation.intervals import RESAMPLES, add_intervals
from llmkd.evaluation.metrics import compute_metrics, predicted_labels, task_score
from llmkd.evaluation.onnx_runtime import OrtClassifier, load_config, onnx_file
from llmkd.evaluation.speed import measure_speeds


def check_checkpoints(
    checkpoints: Mapping, tasks: Sequence[str | GlueTask], tokenizer, speed_seq_len=None
) -> None:
    """Labels, tokenizer and speed input length of every checkpoint, from configs: fail before evaluating any."""
    for name, source in checkpoints.items():
        in_memory = isinstance(source, nn.Module)
        config = source.config if in_memory else _config(source)
        if in_memory and tokenizer is None:
            raise ValueError(f"checkpoint {name!r} is an in-memory model: it needs a tokenizer=...")
        for task in tasks:
            try:
                align_labels(task, config)
            except ValueError as err:
                raise ValueError(f"checkpoint {name!r} on {get_task(task).name}: {err}") from None
        limit = getattr(config, "max_position_embeddings", None)
        if speed_seq_len and limit and speed_seq_len > limit:
            raise ValueError(
                f"checkpoint {name!r} takes at most {limit} positions but speed_seq_len={speed_seq_len}; "
                f"pass speed_seq_len <= {limit}"
            )


def _config(source):
    """A checkpoint's config: the folder's, or for an exported model the one saved beside its .onnx file."""
    onnx = onnx_file(source)
    if onnx is not None:
        return load_config(os.path.dirname(os.path.abspath(onnx)))
    return AutoConfig.from_pretrained(os.fspath(source))


def load_checkpoint(source, tokenizer=None):
    """(model in eval mode, tokenizer, description) from a directory / Hub id, an in-memory model, or an ONNX
    export (a .onnx file, or a folder with model.onnx and no PyTorch weights: run by ONNX Runtime on CPU)."""
    if isinstance(source, nn.Module):
        return source.eval(), tokenizer, f"<in-memory {type(source).__name__}>"
    path = os.fspath(source)
    onnx = onnx_file(path)
    if onnx is not None:
        model = OrtClassifier(onnx)
        return model, tokenizer or AutoTokenizer.from_pretrained(model.folder), onnx
    model = AutoModelForSequenceClassification.from_pretrained(path)
    return model.eval(), tokenizer or AutoTokenizer.from_pretrained(path), path


def _device(model) -> torch.device:
    # An ONNX Runtime model has no torch parameters; it says where it runs.
    return model.device if isinstance(model, OrtClassifier) else next(model.parameters()).device


def count_parameters(model) -> int:
    if isinstance(model, OrtClassifier):
        return model.num_parameters()
    return sum(p.numel() for p in model.parameters())


def predict_logits(model, tokenizer, dataset, task: str, batch_size: int, max_length: int) -> np.ndarray:
    """Logits (N, C) for the dataset's text columns, in dataset order, in float32."""
    columns = [dataset[c] for c in get_task(task).text_columns]
    return logits_for_texts(model, tokenizer, columns, batch_size, max_length)


@torch.inference_mode()
def logits_for_texts(model, tokenizer, columns: Sequence[Sequence[str]], batch_size: int, max_length: int):
    """Logits (N, C) float32 numpy for N texts (`columns`: one list per text column, two for pairs), cut to
    `max_length` tokens and right-padded as in training; `model` is a PyTorch classifier or an OrtClassifier."""
    device = _device(model)
    chunks = []
    collate = DistillationCollator(tokenizer, config=model.config)  # right-padded, as in training
    for start in range(0, len(columns[0]), batch_size):
        texts = [column[start : start + batch_size] for column in columns]
        encoded = tokenizer(*texts, truncation=True, max_length=max_length)
        batch = collate([dict(zip(encoded, row)) for row in zip(*encoded.values())])
        chunks.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu())
    return torch.cat(chunks).numpy()


@torch.inference_mode()
def measure_speed(model, batch_size: int = 1, seq_len: int = 128, repeats: int = 10, warmup: int = 2) -> dict:
    """Median wall time of a forward pass on random token ids of exactly `seq_len` (no padding shortcut).

    Runs on the model's device with the current `torch.get_num_threads()`; warm-up passes are not timed
    (allocator, kernel selection, lazy init).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    device = _device(model)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.eval()
    timings = []
    for step in range(warmup + repeats):
        start = time.perf_counter()
        model(**inputs)
        if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
            torch.cuda.synchronize(device)
        if step >= warmup:
            timings.append(time.perf_counter() - start)
    median = statistics.median(timings)
    out = {"batch_size": batch_size, "seq_len": seq_len, "repeats": repeats, "latency_ms": 1000.0 * median}
    return out | {"throughput": batch_size / median}


def _cpu_speeds(models: dict, reference: str | None, settings: dict) -> dict:
    """{name: latency at batch 1, throughput and speed-ups over `reference` with their spread}: all models (on
    the CPU) timed interleaved in one pass, so that a change of machine load hits them alike (`measure_speeds`)."""
    return measure_speeds(
        models,
        reference=reference,
        seq_len=settings["seq_len"],
        batch_size=settings["throughput_batch_size"],
        latency_inputs=settings["latency_inputs"],
        rounds=settings["repeats"],
        warmup=settings["warmup"],
        confidence=settings["confidence"],
    )["models"]


def trained_length(tokenizer, default: int = 128) -> int:
    """The input length a checkpoint was trained with: llmkd saves it as its tokenizer's model_max_length (a
    tokenizer without a real limit reports a huge sentinel: then `default`)."""
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if isinstance(length, int) and 0 < length < 1_000_000 else default


def evaluate_model(
    model, tokenizer, data: dict, batch_size: int, max_length: int | None, specs: Mapping | None = None
) -> tuple[dict, dict]:
    """(JSON-able entry, {task: predicted labels in the dataset's label space, splits concatenated}); `specs`
    {task name: GlueTask} for tasks outside the GLUE table (a user's data file, llmkd.evaluation.any_data)."""
    entry = {"params": count_parameters(model), "metrics": {}, "task_scores": {}}
    entry["label_mapping"], predictions = {}, {}
    for task, splits in data.items():
        spec = (specs or {}).get(task, task)
        # Align before predicting: a checkpoint with another class order (or other classes) must not be scored.
        mapping = align_labels(spec, model.config)
        entry["label_mapping"][task] = {str(k): v for k, v in mapping.items()} if mapping else None
        entry["metrics"][task], per_split = {}, []
        for split, dataset in splits.items():
            logits = to_dataset_order(
                predict_logits(
                    model, tokenizer, dataset, spec, batch_size, max_length or trained_length(tokenizer)
                ),
                mapping,
            )
            entry["metrics"][task][split] = compute_metrics(spec, logits, dataset["label"])
            per_split.append(predicted_labels(spec, logits))
        entry["task_scores"][task] = float(
            np.mean([task_score(spec, m) for m in entry["metrics"][task].values()])
        )
        predictions[task] = np.concatenate(per_split)
    entry["score"] = float(np.mean(list(entry["task_scores"].values())))
    return entry, predictions


def _ratio(value, reference, percent: bool = False):
    if value is None or reference is None or reference <= 0 or not math.isfinite(reference):
        return None
    return (100.0 if percent else 1.0) * value / reference


def compare_to_reference(
    models: dict, predictions: dict, reference: str, specs: Mapping | None = None
) -> None:
    """Adds % of the reference's score, argmax agreement with it and speed-ups to every model's entry."""
    ref, ref_predictions = models[reference], predictions[reference]
    for name, entry in models.items():
        pct = {t: _ratio(s, ref["task_scores"][t], percent=True) for t, s in entry["task_scores"].items()}
        entry["pct_of_reference"] = pct | {"macro": _ratio(entry["score"], ref["score"], percent=True)}
        entry["agreement"] = {
            task: float(np.mean(labels == ref_predictions[task]))
            for task, labels in predictions[name].items()
            if not get_task((specs or {}).get(task, task)).is_regression  # a regression score: no argmax
        }
        entry["mean_agreement"] = (
            float(np.mean(list(entry["agreement"].values()))) if entry["agreement"] else None
        )
        entry["speedup"] = _ratio(entry.get("throughput"), ref.get("throughput"))
        entry["latency_speedup"] = _ratio(ref.get("latency_ms"), entry.get("latency_ms"))


def evaluate_checkpoints(
    checkpoints: Mapping[str, str | os.PathLike | nn.Module],
    task: str | Sequence[str] | GlueTask = "sst2",
    data: DataSource = None,
    tokenizer=None,
    *,
    data_dir: str | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
    max_eval_samples: int | None = None,
    reference: str | None = "teacher",
    device: str | None = None,
    speed_repeats: int = 10,
    speed_warmup: int = 2,
    speed_seq_len: int = 128,
    speed_batch_size: int = 32,
    bootstrap: int = RESAMPLES,
    seed: int = 0,
) -> dict:
    """Scores, agreement, size and CPU speed of each checkpoint on each task's validation split(s).

    `checkpoints` maps a display name to a directory (AutoModelForSequenceClassification; its tokenizer is
    loaded from there unless `tokenizer` is given), an in-memory model, or an ONNX export (a .onnx path, or a
    folder with model.onnx beside its config and tokenizer, as `llmkd export` writes: run by ONNX Runtime on CPU
    with torch's thread count, tokenised and timed like the PyTorch ones). `data` is a DatasetDict (one task),
    {task: DatasetDict}, a callable task -> DatasetDict, or None to read `data_dir` (or the Hub) with load_glue.
    Inputs are cut to `max_length` tokens, or by default to each checkpoint's trained length (`trained_length`), so
    scores equal the evaluation during training. Speed is measured on CPU: latency at batch 1, throughput at
    `speed_batch_size`, both at `speed_seq_len`, all models timed interleaved in `speed_repeats` rounds after
    `speed_warmup` (`llmkd.evaluation.speed`): speed-ups are the median over rounds of the per-round ratio
    to `reference`, with a 95% interval (speedup_low/high; None under 6 rounds), latency/throughput quartiles
    beside the medians. Interleaving keeps every checkpoint in CPU memory until the timing (fine for classifiers of
    a few hundred million parameters); `speed_repeats=0` skips it and keeps one model in memory at a time.
    Every model is compared with `reference` (None: no comparison).
    `task` may also be a GlueTask describing a user's data (llmkd.evaluation.any_data.evaluate_file builds it).
    Every score gets a 95% interval and every difference to `reference` a paired one, from `bootstrap`
    resamples of the examples drawn with `seed` (llmkd.evaluation.intervals; `bootstrap=0`: none).
    """
    if bootstrap < 0:
        raise ValueError(f"bootstrap={bootstrap}: give the number of resamples (0 for no intervals)")
    specs = {task.name: task} if isinstance(task, GlueTask) else {t: get_task(t) for t in resolve_tasks(task)}
    tasks = list(specs)
    if reference is not None and reference not in checkpoints:
        raise ValueError(f"reference {reference!r} is not one of the checkpoints {list(checkpoints)}")
    check_checkpoints(
        checkpoints, list(specs.values()), tokenizer, speed_seq_len if speed_repeats > 0 else None
    )
    data = {t: load_validation(specs[t], data, data_dir, max_eval_samples) for t in tasks}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    models, predictions, timed = {}, {}, {}
    speed = _speed_settings(speed_seq_len, speed_batch_size, speed_repeats, speed_warmup)
    for name, source in checkpoints.items():
        model, model_tokenizer, description = load_checkpoint(source, tokenizer)
        entry, predictions[name] = evaluate_model(
            model.to(device), model_tokenizer, data, batch_size, max_length, specs
        )
        entry["source"] = description
        if speed_repeats > 0:  # kept, on the CPU, to be timed interleaved with the others
            timed[name] = model.to("cpu")
        models[name] = entry
        del model  # without speed timing: one model in memory at a time
    if reference is not None:
        compare_to_reference(models, predictions, reference, specs)
    task_metrics = {t: list(specs[t].metrics) for t in tasks}
    scored = {t: list(specs[t].score_metrics or specs[t].metrics) for t in tasks}
    gold = {t: {s: np.asarray(d["label"]) for s, d in splits.items()} for t, splits in data.items()}
    intervals = (
        add_intervals(
            models, predictions, gold, task_metrics, reference, bootstrap, seed, score_metrics=scored
        )
        if bootstrap
        else None
    )
    # After compare_to_reference: the paired per-round speed-ups replace its ratio of two medians.
    for name, figures in (_cpu_speeds(timed, reference, speed) if timed else {}).items():
        models[name] |= figures
    return {
        "tasks": tasks,
        "examples": {t: {s: len(d) for s, d in splits.items()} for t, splits in data.items()},
        "reference": reference,
        "task_metrics": task_metrics,  # the metric names of each task (also those outside GLUE)
        "intervals": intervals,  # how the 95% intervals were computed (None: not computed)
        "speed": speed,
        "models": models,
    }


def _speed_settings(seq_len: int, batch_size: int, repeats: int, warmup: int) -> dict:
    """How the report's speed figures were measured (CPU, this process's thread count); checked before any
    model is evaluated."""
    if repeats > 0 and (warmup < 0 or seq_len < 1 or batch_size < 1):
        raise ValueError(
            f"speed timing needs speed_warmup >= 0, speed_seq_len >= 1 and speed_batch_size >= 1; got "
            f"{warmup}, {seq_len}, {batch_size} (speed_repeats=0 skips the timing)"
        )
    return {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "seq_len": seq_len,
        "latency_batch_size": 1,
        "throughput_batch_size": batch_size,
        "repeats": repeats,
        "warmup": warmup,
        "method": "interleaved",  # every model in each round; speed-up = median of per-round ratios
        "latency_inputs": 4,  # batch-1 inputs per round
        "confidence": 0.95,  # of the speed-up intervals
    }
