"""Speed figures that machine load cancels out of: models timed interleaved, a paired speed-up per round.

Timing each model alone (all of the teacher's passes, then all of the student's) lets a change of machine load
between the two blocks land on one model only: on a shared 2-core machine the same 2-layer student's speed-up over
its teacher read anywhere from ×1.9 to ×4.8. `time_interleaved` instead runs every model on the same inputs within
each round, input by input, in an order that changes from input to input and round to round (each cycle of rounds
is a seeded shuffle of the models, then its rotations: over each whole cycle every model runs first equally often, and no model
always follows the same one). A load change then hits all models of a round alike, and the speed-up of round r is the
paired ratio reference time_r / model time_r. Its median over rounds is reported with a distribution-free
confidence interval of that median (order statistics of the rounds, `scipy.stats.quantile_test`).

`measure_speeds` applies it to classifiers (PyTorch modules or `OrtClassifier`): batch-1 latency and batch-B
throughput on random token ids of a fixed length, every model fed the same ids.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from time import perf_counter  # a module-level name: tests replace it with a fake clock

import numpy as np
import torch
from scipy import stats


def time_interleaved(
    models: Mapping[str, Callable],
    inputs: Sequence,
    *,
    reference: str | None = None,
    rounds: int = 10,
    warmup: int = 1,
    seed: int = 0,
    confidence: float = 0.95,
    threads: int | None = None,
) -> dict:
    """Wall time of every model on the same inputs, interleaved, and its speed-up over `reference` per round.

    Args:
        models: {name: callable}; an input that is a mapping is passed as keywords (`model(**x)`), anything else
            positionally (`model(x)`). Run under `torch.inference_mode()`; CUDA is synchronised after each call.
        inputs: what one round feeds each model, e.g. several (1, T) batches for batch-1 latency or one (B, T)
            batch for throughput. Within a round every input is run by every model back to back.
        reference: the model the speed-ups are relative to (None: no speed-ups).
        rounds: timed rounds (>= 1; the interval needs >= 6 rounds at 95%). warmup: untimed rounds first.
        seed: the order of the models in each cycle of rounds. confidence: of the speed-up interval, in (0, 1).
        threads: torch intra-op threads during the timing (None: the current count); restored afterwards.
            An ONNX Runtime session keeps the thread count it was created with.

    Returns a JSON-able dict: "threads", "rounds", "warmup", "seed", "inputs" (count), "confidence",
    "reference", "orders" (the model order of each timed round's first input) and "models": {name: {
    "round_seconds": [R floats, the round's total over all inputs], "ms", "ms_q1", "ms_q3" (milliseconds per
    input: median and quartiles over rounds), and with a reference "speedups" [R ratios reference time /
    model time], "speedup" (their median), "speedup_low", "speedup_high" (the interval; None with too few
    rounds)}}.

    Raises ValueError for no models, no inputs, a model that is not callable, a reference that is not one of the
    models, rounds < 1, warmup < 0, threads < 1 or confidence outside (0, 1).
    """
    _check(models, inputs, reference, rounds, warmup, confidence, threads)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        used = torch.get_num_threads()
        seconds, orders = _run_rounds(models, inputs, rounds, warmup, seed)
    finally:
        torch.set_num_threads(previous)
    result = {"threads": used, "rounds": rounds, "warmup": warmup, "seed": seed, "inputs": len(inputs)}
    result |= {"confidence": confidence, "reference": reference, "orders": orders, "models": {}}
    for name, total in seconds.items():
        entry = {"round_seconds": total.tolist(), **_spread(1000.0 * total / len(inputs), "ms")}
        if reference is not None:
            ratios = seconds[reference] / total
            entry |= {"speedups": ratios.tolist(), **median_interval(ratios, confidence, "speedup")}
        result["models"][name] = entry
    return result


def _check(models, inputs, reference, rounds, warmup, confidence, threads) -> None:
    if not models:
        raise ValueError("time_interleaved needs at least one model: pass {name: model}")
    not_callable = [name for name, model in models.items() if not callable(model)]
    if not_callable:
        raise ValueError(f"models {not_callable} are not callable: pass models or functions of a batch")
    if not inputs:
        raise ValueError("time_interleaved needs at least one input per round")
    if reference is not None and reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models {list(models)}")
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (or None: keep torch's count), got {threads}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence}")


def round_orders(names: Sequence[str], rounds: int, seed: int = 0) -> list[list[str]]:
    """The model order of each round: every cycle of len(names) rounds is a seeded shuffle and its rotations."""
    rng, orders = random.Random(seed), []
    for r in range(rounds):
        if r % len(names) == 0:
            base = rng.sample(list(names), len(names))
        shift = r % len(names)
        orders.append(base[shift:] + base[:shift])
    return orders


@torch.inference_mode()
def _run_rounds(models, inputs, rounds: int, warmup: int, seed: int) -> tuple[dict, list]:
    """({name: (rounds,) seconds summed over the inputs}, the timed rounds' orders)."""
    names = list(models)
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    orders = round_orders(names, rounds, seed)
    seconds = {name: np.zeros(rounds) for name in names}
    # Warm-up rounds (allocator, kernel selection, lazy init) rotate the given order and are not timed.
    warm = [names[r % len(names) :] + names[: r % len(names)] for r in range(warmup)]
    for r, order in enumerate(warm + orders):
        for k, x in enumerate(inputs):
            # Rotating again per input: with two models, consecutive inputs alternate which runs first.
            for name in order[k % len(order) :] + order[: k % len(order)]:
                start = perf_counter()
                _ = models[name](**x) if isinstance(x, Mapping) else models[name](x)
                if sync is not None:  # kernels run asynchronously: wait for them before reading the clock
                    sync()
                if r >= warmup:
                    seconds[name][r - warmup] += perf_counter() - start
    return seconds, orders


def _spread(values: np.ndarray, key: str) -> dict:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {key: float(median), f"{key}_q1": float(q1), f"{key}_q3": float(q3)}


def median_interval(values, confidence: float = 0.95, key: str = "median") -> dict:
    """{key: median, key_low, key_high}: a distribution-free interval of the median from the order statistics
    (exact binomial coverage >= `confidence` for independent rounds; None when there are too few values, fewer
    than 6 at 95%)."""
    values = np.asarray(values, dtype=float)
    median = float(np.median(values))
    interval = stats.quantile_test(values, q=median, p=0.5).confidence_interval(confidence)
    low, high = (None if np.isnan(v) else float(v) for v in (interval.low, interval.high))
    return {key: median, f"{key}_low": low, f"{key}_high": high}


def measure_speeds(
    models: Mapping[str, Callable],
    *,
    reference: str | None = None,
    seq_len: int = 128,
    batch_size: int = 32,
    latency_inputs: int = 4,
    rounds: int = 10,
    warmup: int = 2,
    seed: int = 0,
    confidence: float = 0.95,
    threads: int | None = None,
) -> dict:
    """Batch-1 latency and batch-`batch_size` throughput of classifiers on the CPU, timed interleaved.

    `models` are on the CPU and take `input_ids` / `attention_mask` (PyTorch sequence classifiers,
    `OrtClassifier`s) and have `config.vocab_size`. Every model gets the same random token ids of exactly
    `seq_len` positions, all attended (no padding shortcut): `latency_inputs` (1, seq_len) inputs per round for the
    latency, one (batch_size, seq_len) batch per round for the throughput; the two are timed in separate sets of
    `rounds` interleaved rounds (see `time_interleaved`).

    Returns {"settings": {...}, "models": {name: {"latency_ms", "latency_ms_q1", "latency_ms_q3" (ms per
    example at batch 1: median and quartiles over rounds), "throughput", "throughput_q1", "throughput_q3"
    (sequences/s), and with a reference "speedup", "speedup_low", "speedup_high" (throughput: reference batch
    time / model batch time, median over rounds and its interval) and "latency_speedup", "latency_speedup_low",
    "latency_speedup_high"}}}. Raises ValueError for the arguments `time_interleaved` refuses, seq_len,
    batch_size or latency_inputs < 1, or a model without config.vocab_size.
    """
    if min(seq_len, batch_size, latency_inputs) < 1:
        raise ValueError(
            f"seq_len, batch_size and latency_inputs must be >= 1, got {seq_len}, {batch_size}, {latency_inputs}"
        )
    sizes = {name: getattr(getattr(m, "config", None), "vocab_size", None) for name, m in models.items()}
    if not sizes or None in sizes.values():
        raise ValueError(f"measure_speeds needs models with config.vocab_size; got vocab sizes {sizes}")
    generator = torch.Generator().manual_seed(seed)

    def batch(rows: int) -> dict:
        ids = torch.randint(0, min(sizes.values()), (rows, seq_len), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    common = dict(reference=reference, rounds=rounds, warmup=warmup, seed=seed, confidence=confidence)
    latency = time_interleaved(models, [batch(1) for _ in range(latency_inputs)], **common, threads=threads)
    throughput = time_interleaved(models, [batch(batch_size)], **common, threads=threads)
    out = {}
    for name in models:
        lat, thr = latency["models"][name], throughput["models"][name]
        entry = {f"latency_{k}": lat[k] for k in ("ms", "ms_q1", "ms_q3")}
        entry |= _spread(batch_size / np.asarray(thr["round_seconds"]), "throughput")
        if reference is not None:
            entry |= {k: thr[k] for k in ("speedup", "speedup_low", "speedup_high")}
            entry |= {f"latency_{k}": lat[k] for k in ("speedup", "speedup_low", "speedup_high")}
        out[name] = entry
    settings = {"method": "interleaved", "threads": latency["threads"], "seq_len": seq_len}
    settings |= {
        "latency_batch_size": 1,
        "latency_inputs": latency_inputs,
        "throughput_batch_size": batch_size,
    }
    settings |= {"rounds": rounds, "warmup": warmup, "seed": seed, "confidence": confidence}
    return {"settings": settings, "models": out}
