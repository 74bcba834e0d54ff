"""The numbers of a model card's evaluation table: teacher vs student on the run's eval set, and CPU latency.

`compare_on_eval` runs teacher and student once over each eval split (eval mode, no grad, on their devices) and
scores both with the trainer's own `compute_metrics` (the numbers `llmkd eval` and training report), plus the
teacher-student top-1 agreement; for causal LMs, perplexity and next-token accuracy on the supervised tokens.
`time_batch_one` times both models at batch 1 on CPU, interleaved row by row so that both see the same machine
load, on real rows of the eval set.
"""

from __future__ import annotations

import copy
import math
import statistics
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import EvalPrediction

from llmkd.modeling import CAUSAL_LM, base_model, forward_keys, select_inputs, task_of

LABELS = ("label", "labels")
LOWER_IS_BETTER = {"perplexity"}
CPU_COPY_LIMIT = (
    1_000_000_000  # parameters: a model on an accelerator is copied to the CPU for timing up to this
)


def splits(eval_dataset) -> dict:
    """{split name: dataset} of a trainer's eval set (a Dataset, or a dict for MNLI's two splits)."""
    if eval_dataset is None:
        return {}
    return dict(eval_dataset) if isinstance(eval_dataset, dict) else {"eval": eval_dataset}


def _loader(trainer, dataset, models, batch_size: int) -> DataLoader:
    keep = set(LABELS).union(*(forward_keys(m) for m in models))
    columns = [c for c in dataset.column_names if c in keep]
    return DataLoader(
        dataset.select_columns(columns), batch_size=batch_size, collate_fn=trainer.data_collator
    )


def _forward(model, batch: dict) -> torch.Tensor:
    device = next(model.parameters()).device
    inputs = select_inputs(batch, forward_keys(model))
    return model(**{k: v.to(device) for k, v in inputs.items()}).logits.float().cpu()


@torch.inference_mode()
def compare_on_eval(
    trainer, teacher, student, evaluated: dict | None = None, vocab_rows: int | None = None
) -> dict:
    """{split: {"examples", "teacher": {metric: value}, "student": {...}, "agreement"}} on the trainer's eval set.

    Classifiers: the teacher's metrics from `trainer.compute_metrics` on its logits (none for a run without one);
    the student's metrics and the top-1 agreement are taken from `evaluated` (`trainer.evaluate()`'s metrics: the
    same numbers as llmkd_report.json, without a second student pass) when it has them all, else measured here.
    Causal LMs: perplexity and next-token accuracy over the tokens with labels for both models, agreement over
    the same tokens (the first `vocab_rows` logit rows, for padded vocabularies). Models keep their train/eval
    mode."""
    modes = [(m, m.training) for m in (teacher, student)]
    for model, _ in modes:
        model.eval()
    try:
        named = splits(trainer.eval_dataset)
        return {
            name: _compare_split(
                trainer,
                data,
                (teacher, student),
                vocab_rows,
                _prefixed(evaluated, "eval" if len(named) == 1 else f"eval_{name}"),
            )
            for name, data in named.items()
        }
    finally:
        for model, mode in modes:
            model.train(mode)


def _prefixed(evaluated: dict | None, prefix: str) -> dict:
    return {
        k.removeprefix(f"{prefix}_"): v for k, v in (evaluated or {}).items() if k.startswith(f"{prefix}_")
    }


def _compare_split(trainer, dataset, models, vocab_rows, evaluated: dict) -> dict:
    if task_of(models[1]) == CAUSAL_LM:
        return _compare_lm(trainer, dataset, models, vocab_rows)
    teacher_logits, gold = _logits(trainer, dataset, models[0])
    result = {"examples": len(dataset), "teacher": _score(trainer, teacher_logits, gold)}
    one_score = teacher_logits.shape[-1] == 1  # a regression score: no top-1 to agree on
    wanted = [*result["teacher"], *([] if one_score else ["agreement"])]
    if all(k in evaluated for k in wanted):
        result["student"] = {k: float(evaluated[k]) for k in result["teacher"]}
        agreement = None if one_score else float(evaluated["agreement"])
    else:
        student_logits, _ = _logits(trainer, dataset, models[1])
        result["student"] = _score(trainer, student_logits, gold)
        agree = student_logits.argmax(-1) == teacher_logits.argmax(-1)
        agreement = None if one_score else float(agree.mean())
    return result | ({} if agreement is None else {"agreement": agreement, "agreement_unit": "examples"})


def _logits(trainer, dataset, model) -> tuple[np.ndarray, np.ndarray]:
    chunks, labels = [], []
    for batch in _loader(trainer, dataset, (model,), trainer.args.per_device_eval_batch_size):
        chunks.append(_forward(model, batch).numpy())
        labels.append(batch["labels"].numpy())
    return np.concatenate(chunks), np.concatenate(labels)


def _score(trainer, logits: np.ndarray, gold: np.ndarray) -> dict:
    scored = trainer.compute_metrics(EvalPrediction(logits, gold)) if trainer.compute_metrics else {}
    return {k: float(v) for k, v in scored.items()}


def _compare_lm(trainer, dataset, models, vocab_rows) -> dict:
    sums, targets = np.zeros(5), 0  # nll (teacher, student), correct (teacher, student), agree
    for batch in _loader(trainer, dataset, models, trainer.args.per_device_eval_batch_size):
        out = {"teacher": _forward(models[0], batch), "student": _forward(models[1], batch)}
        sums, targets = sums + _lm_sums(out, batch["labels"], vocab_rows), targets + _targets(batch["labels"])
    count, result = max(targets, 1), {"examples": len(dataset)}
    for k, name in enumerate(("teacher", "student")):
        result[name] = {"perplexity": math.exp(sums[k] / count), "next-token accuracy": sums[2 + k] / count}
    return result | {"agreement": sums[4] / count, "agreement_unit": "tokens"}


def _targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != -100).sum())


def _lm_sums(out: dict, labels: torch.Tensor, vocab_rows: int | None) -> np.ndarray:
    """[nll teacher, nll student, correct teacher, correct student, agree] over the shifted supervised tokens."""
    gold = labels[:, 1:]
    mask = gold != -100
    safe = gold.clamp(min=0)
    sums, tops = [], []
    for name in ("teacher", "student"):
        logits = out[name][:, :-1]
        nll = -torch.log_softmax(logits, -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        sums.append(float(nll[mask].sum()))
        tops.append(logits[..., slice(vocab_rows)].argmax(-1))
    correct = [float(((top == gold) & mask).sum()) for top in tops]
    return np.array([*sums, *correct, float(((tops[0] == tops[1]) & mask).sum())])


def _on_cpu(model):
    """The model itself if it is on the CPU, a CPU copy of a small one, else None (too large to copy)."""
    if next(model.parameters()).device.type == "cpu":
        return model
    if sum(p.numel() for p in model.parameters()) > CPU_COPY_LIMIT:
        return None
    return copy.deepcopy(model).to("cpu")


@torch.inference_mode()
def time_batch_one(
    trainer, teacher, student, rows: int = 16, repeats: int = 3, warmup: int = 1
) -> dict | None:
    """Median CPU latency (ms) of teacher and student on `rows` eval rows at batch 1, and the speed-up.

    Each row is run by both models back to back (alternating which goes first), `repeats` times after `warmup`
    untimed rounds; the median over rows x repeats is reported. None without an eval set, or when a model on an
    accelerator is too large to copy to the CPU (> CPU_COPY_LIMIT parameters)."""
    data = next(iter(splits(trainer.eval_dataset).values()), None)
    models = {"teacher": _on_cpu(teacher), "student": _on_cpu(student)}
    if data is None or None in models.values():
        return None
    modes = [(m, m.training) for m in models.values()]
    for model, _ in modes:
        model.eval()
    try:
        loader = _loader(trainer, data.select(range(min(rows, len(data)))), list(models.values()), 1)
        batches = list(loader)
        timings = {name: [] for name in models}
        for round_ in range(warmup + repeats):
            for k, batch in enumerate(batches):
                order = list(models) if (k + round_) % 2 == 0 else list(reversed(models))
                for name in order:
                    start = time.perf_counter()
                    _forward(models[name], batch)
                    if round_ >= warmup:
                        timings[name].append(time.perf_counter() - start)
    finally:
        for model, mode in modes:
            model.train(mode)
    latency = {name: 1000.0 * statistics.median(values) for name, values in timings.items()}
    return latency | {
        "speedup": latency["teacher"] / latency["student"],
        "rows": len(batches),
        "repeats": repeats,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
    }


def parameters(model) -> int:
    return sum(p.numel() for p in base_model(model).parameters())
