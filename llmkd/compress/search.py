"""Student shapes that meet a speed-up over the teacher, measured on this machine rather than assumed.

A shape is a depth × heads (with the hidden size where the head size is hidden / heads) × FFN width, as
`llmkd.students.pruning.candidate_shapes` lists them and `prune_encoder` builds them from the teacher. Speed
does not depend on the weights, so each shape is timed as a randomly initialised model of the teacher's class.

1. Screening (only when there are more shapes than `max_candidates`): a few probe shapes spanning the depths and
   widths and the teacher are timed interleaved, briefly, and a cost model of one batch is fitted to them by
   non-negative least squares:  seconds = c0 + L · (a·d² + b·d·f + c·d)  (L layers, d hidden size, f FFN width;
   at a fixed sequence length T the attention term T²·d and the elementwise ones fold into c·d and b·d·f). The
   shapes predicted to meet the speed-up (less `margin`) go on, `max_candidates` of them, largest first (most
   predicted seconds: the most computation the speed budget allows): half from those predicted near the target
   (within ± margin), half from those predicted clearly faster, so that a prediction a little optimistic near
   the target does not leave nothing that passes the measurement.
2. Confirmation: those shapes and the teacher are timed interleaved with `measure_speeds` (batch-B throughput and
   batch-1 latency, paired speed-ups with their interval). A shape is kept when its throughput speed-up meets
   the target: by default its LOWER 95% bound (criterion="low": kept only when the machine showed it is at
   least that fast), or its median (criterion="median": half of the rounds could be slower).

The result is a JSON-able table with a row per shape: measured or not, kept or why not.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from scipy.optimize import nnls
from torch import nn

from llmkd.atomic import write_json
from llmkd.evaluation.speed import measure_speeds, median_interval, time_interleaved
from llmkd.modeling import base_model
from llmkd.students.pruning import candidate_shapes, encoder_layout, encoder_shape, pruned_config

logger = logging.getLogger(__name__)
SHAPE_KEYS = ("layers", "heads_per_layer", "intermediate_size")
CRITERIA = ("low", "median")


def shape_name(shape: dict) -> str:
    """'L2-H12-D384-I1536': layers, heads per layer, hidden size, FFN width."""
    return f"L{shape['layers']}-H{shape['heads_per_layer']}-D{shape['hidden_size']}-I{shape['intermediate_size']}"


def student_config(teacher: nn.Module, shape: dict):
    """The teacher's config at `shape` ({layers, heads_per_layer, intermediate_size[, hidden_size]}).

    Raises ValueError for a missing key, a size outside 1..the teacher's, or a hidden_size that does not match
    heads × head size in families where the head size is hidden / heads."""
    teacher = base_model(teacher)
    layout, _, _ = encoder_layout(teacher)
    return pruned_config(teacher.config, layout, encoder_shape(teacher), **_sizes(teacher, shape))


def random_student(teacher: nn.Module, shape: dict) -> nn.Module:
    """A randomly initialised model of the teacher's class and dtype at `shape`, in eval mode (for timing)."""
    teacher = base_model(teacher)
    model = type(teacher)(student_config(teacher, shape))
    return model.to(next(teacher.parameters()).dtype).eval()


def _sizes(teacher: nn.Module, shape: dict) -> dict:
    layout, _, _ = encoder_layout(teacher)
    full = encoder_shape(teacher)
    missing = [k for k in SHAPE_KEYS if k not in shape] if isinstance(shape, dict) else list(SHAPE_KEYS)
    if missing:
        raise ValueError(
            f"shape {shape!r} lacks {missing}: give {', '.join(SHAPE_KEYS)} (candidate_shapes does)"
        )
    limits = {
        "layers": full["layers"],
        "heads_per_layer": full["heads"],
        "intermediate_size": full["intermediate"],
    }
    for key, top in limits.items():
        value = shape[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise ValueError(f"shape {_label(shape)}: {key}={value!r}, need an integer in 1..{top}")
    heads = shape["heads_per_layer"]
    hidden = heads * full["head_dim"] if layout.heads_tied_to_hidden else full["hidden"]
    if shape.get("hidden_size", hidden) != hidden:
        raise ValueError(
            f"shape {_label(shape)}: hidden_size={shape['hidden_size']} but {heads} heads of size "
            f"{full['head_dim']} need hidden_size={hidden} in this family; drop hidden_size or set it to {hidden}"
        )
    return {"layers": shape["layers"], "heads": heads, "ffn": shape["intermediate_size"], "hidden": hidden}


def _label(shape) -> str:
    try:
        return shape_name(shape)
    except (KeyError, TypeError):
        return repr(shape)


def normalised_shapes(teacher: nn.Module, shapes) -> list[dict]:
    """Each shape as {layers, heads_per_layer, hidden_size, intermediate_size, parameters, fraction}, duplicates
    dropped (parameter counts from a model built on the meta device: no memory)."""
    teacher = base_model(teacher)
    total = sum(p.numel() for p in teacher.parameters())
    out, seen = [], set()
    for shape in shapes:
        sizes = _sizes(teacher, shape)
        row = {"layers": sizes["layers"], "heads_per_layer": sizes["heads"], "hidden_size": sizes["hidden"]}
        row["intermediate_size"] = sizes["ffn"]
        if shape_name(row) in seen:
            continue
        seen.add(shape_name(row))
        with torch.device("meta"):
            params = sum(p.numel() for p in type(teacher)(student_config(teacher, row)).parameters())
        out.append(row | {"parameters": params, "fraction": params / total})
    return out


def cost_features(shapes: list[dict]) -> np.ndarray:
    """[N, 4]: 1, L·d², L·d·f, L·d of each shape (the terms of the cost model in the module docstring)."""
    rows = []
    for s in shapes:
        n, d, f = s["layers"], s["hidden_size"], s["intermediate_size"]
        rows.append([1.0, n * d * d, n * d * f, n * d])
    return np.asarray(rows, dtype=float)


def fit_cost(shapes: list[dict], seconds) -> np.ndarray:
    """The 4 non-negative coefficients of the cost model fitted to measured seconds per batch (columns scaled to
    1 first so that the least squares are well conditioned)."""
    x = cost_features(shapes)
    scale = np.where(x.max(0) > 0, x.max(0), 1.0)
    coefficients, _ = nnls(x / scale, np.asarray(seconds, dtype=float))
    return coefficients / scale


def probe_shapes(teacher: nn.Module, shapes: list[dict]) -> list[dict]:
    """Up to 5 shapes spanning the candidates' depths and widths for the fit: the shallowest depth at the four
    corners of (heads, FFN) and the deepest at the narrowest widths (the teacher adds the widest, deepest)."""
    lo_l, hi_l = min(s["layers"] for s in shapes), max(s["layers"] for s in shapes)
    heads = [min(s["heads_per_layer"] for s in shapes), max(s["heads_per_layer"] for s in shapes)]
    ffns = [min(s["intermediate_size"] for s in shapes), max(s["intermediate_size"] for s in shapes)]
    corners = [(lo_l, h, f) for h in heads for f in ffns] + [(hi_l, heads[0], ffns[0])]
    picked = [{"layers": n, "heads_per_layer": h, "intermediate_size": f} for n, h, f in corners]
    return normalised_shapes(teacher, picked)


def _batch(teacher: nn.Module, batch_size: int, seq_len: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, teacher.config.vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def shapes_meeting_speedup(
    teacher: nn.Module,
    shapes=None,
    speedup: float = 2.5,
    *,
    seq_len: int = 128,
    batch_size: int = 32,
    rounds: int = 20,
    warmup: int = 2,
    latency_inputs: int = 4,
    criterion: str = "low",
    confidence: float = 0.95,
    max_candidates: int = 8,
    probe_rounds: int = 3,
    margin: float = 0.1,
    seed: int = 0,
    threads: int | None = None,
    build=random_student,
    state_path: str | os.PathLike | None = None,
) -> dict:
    """Times candidate shapes against the teacher, interleaved, and keeps those that meet `speedup`.

    Args:
        teacher: a supported encoder classifier on the CPU (see `llmkd.students.pruning.FAMILIES`).
        shapes: dicts with layers, heads_per_layer, intermediate_size (hidden_size optional, checked);
            None: `candidate_shapes(teacher)` (every depth × 3 head counts × 4 FFN widths).
        speedup: the throughput speed-up to meet (> 1). criterion: "low" (the lower bound of its `confidence`
            interval meets it; needs rounds >= 6 at 95%) or "median" (see the module docstring).
        seq_len, batch_size, latency_inputs, rounds, warmup, seed, threads: as `measure_speeds` (random ids,
            all positions attended; throughput at batch `batch_size`, latency at batch 1).
            rounds=20 by default: the 95% lower bound is then the 6th smallest of 20 paired ratios, which a few
            rounds disturbed by other processes do not move (with 10 it is the 2nd smallest: on the shared
            2-core machine one 10-round run read intervals like ×1.0–×5.1 and kept nothing).
        max_candidates: at most this many shapes are measured; more shapes are screened first by the fitted
            cost model (probes timed for `probe_rounds` rounds): of those predicted to reach
            speedup * (1 - margin), the largest near the target and the largest clearly faster, half each.
        build: `build(teacher, shape) -> model` for timing (default: `random_student`).
        state_path: JSON file of the table; an existing one made with the same teacher shape, shapes and settings
            is returned without timing again (the stage resumes). It does not know the machine: delete it after
            moving to another one.

    Returns a JSON-able dict: "settings", "teacher" (shape; throughput and latency_ms when anything was
    measured), "fit" (None, or the probes, their seconds and the coefficients), "candidates" (one row per shape:
    the shape, name, parameters, fraction, predicted_speedup, measured, speedup, speedup_low, speedup_high,
    latency_speedup(_low/_high), throughput, latency_ms, kept, reason) and "kept" (names, most computation
    first). Raises ValueError for speedup <= 1, no shapes, a bad shape, an unknown criterion, too few rounds
    for the interval, max_candidates / probe_rounds < 1, margin outside [0, 1), or a teacher not on the CPU.
    """
    teacher = base_model(teacher)
    _check_args(teacher, speedup, criterion, rounds, confidence, max_candidates, probe_rounds, margin)
    shapes = normalised_shapes(teacher, candidate_shapes(teacher) if shapes is None else list(shapes))
    if not shapes:
        raise ValueError(
            "no candidate shapes: pass shapes=None (candidate_shapes(teacher)) or a non-empty list"
        )
    settings = {
        "speedup": float(speedup),
        "criterion": criterion,
        "seq_len": seq_len,
        "batch_size": batch_size,
    }
    settings |= {
        "rounds": rounds,
        "warmup": warmup,
        "latency_inputs": latency_inputs,
        "confidence": confidence,
    }
    settings |= {"max_candidates": max_candidates, "probe_rounds": probe_rounds, "margin": margin}
    settings |= {"seed": seed, "threads": threads}
    full = encoder_shape(teacher)
    own = {"layers": full["layers"], "heads_per_layer": full["heads"], "hidden_size": full["hidden"]}
    own |= {"intermediate_size": full["intermediate"], "model_type": teacher.config.model_type}
    key = {"teacher": own, "shapes": shapes, "settings": settings}
    stored = _stored(state_path, key)
    if stored is not None:
        return stored
    was_training = teacher.training
    teacher.eval()  # dropout off: the deployed model's speed
    try:
        fit = _screen(teacher, own, shapes, settings, build) if len(shapes) > max_candidates else None
        chosen = _choose(shapes, fit, speedup, margin, max_candidates)
        speeds = _confirm(teacher, [shapes[i] for i in chosen], settings, build) if chosen else None
    finally:
        teacher.train(was_training)
    table = _table(key, fit, shapes, chosen, speeds)
    if state_path is not None:
        write_json(state_path, table)
    return table


def _check_args(
    teacher, speedup, criterion, rounds, confidence, max_candidates, probe_rounds, margin
) -> None:
    if not speedup > 1:
        raise ValueError(
            f"speedup={speedup}: a student must be faster than its teacher; pass a throughput ratio > 1, e.g. 2.5"
        )
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r}: use 'low' (lower interval bound) or 'median'")
    if criterion == "low" and _interval_missing(rounds, confidence):
        need = next(n for n in range(1, 1000) if not _interval_missing(n, confidence))
        raise ValueError(
            f"rounds={rounds}: the {confidence:.0%} interval of the speed-up needs rounds >= {need}; "
            "raise rounds or use criterion='median'"
        )
    if max_candidates < 1 or probe_rounds < 1 or not 0 <= margin < 1:
        raise ValueError(
            f"max_candidates={max_candidates}, probe_rounds={probe_rounds}, margin={margin}: need "
            "max_candidates >= 1, probe_rounds >= 1 and 0 <= margin < 1"
        )
    device = next(teacher.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"the teacher is on {device}: CPU speed is measured on the CPU; pass teacher.cpu()")


def _interval_missing(rounds: int, confidence: float) -> bool:
    """Whether `rounds` values are too few for a `confidence` interval of their median."""
    return median_interval(np.arange(1.0, rounds + 1.0), confidence)["median_low"] is None


def _stored(path, key: dict) -> dict | None:
    if path is None or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        table = json.load(handle)
    if table.get("key") != json.loads(json.dumps(key)):
        logger.info("stage speed: %s was made with other shapes or settings; timing again", path)
        return None
    logger.info("stage speed: reusing the timings in %s", path)
    return table


def _screen(teacher, own: dict, shapes: list[dict], settings: dict, build) -> dict:
    """Times the probes and the teacher briefly and predicts every shape's speed-up from the fitted cost."""
    probes = probe_shapes(teacher, shapes)
    logger.info("stage speed: fitting the cost model on %d probe shapes and the teacher", len(probes))
    models = {"teacher": teacher} | {shape_name(p): build(teacher, p) for p in probes}
    batch = _batch(teacher, settings["batch_size"], settings["seq_len"], settings["seed"])
    timed = time_interleaved(
        models,
        [batch],
        rounds=settings["probe_rounds"],
        warmup=1,
        seed=settings["seed"],
        threads=settings["threads"],
    )["models"]
    seconds = [timed[name]["ms"] / 1000.0 for name in models]
    coefficients = fit_cost([own, *probes], seconds)
    predicted = cost_features([own, *shapes]) @ coefficients
    return {
        "probes": [shape_name(p) for p in probes],
        "seconds": dict(zip(models, seconds)),
        "coefficients": dict(zip(("c0", "a_d2", "b_df", "c_d"), coefficients.tolist())),
        "predicted_seconds": predicted[1:].tolist(),
        "predicted_speedups": (predicted[0] / np.maximum(predicted[1:], 1e-12)).tolist(),
    }


def _choose(shapes: list[dict], fit, speedup: float, margin: float, most: int) -> list[int]:
    """Indices of the shapes to measure: all, or `most` of those predicted to reach speedup * (1 - margin): half
    the largest near the target (predicted below speedup * (1 + margin): the most capacity, but the measurement
    may find them too slow) and half the largest predicted clearly faster (kept unless the prediction is badly
    off); a group with too few shapes leaves its slots to the other."""
    if fit is None:
        return list(range(len(shapes)))
    seconds, predicted = fit["predicted_seconds"], fit["predicted_speedups"]
    order = sorted(
        range(len(shapes)), key=lambda i: (-seconds[i], -shapes[i]["parameters"], shape_name(shapes[i]))
    )
    near = [i for i in order if speedup * (1 - margin) <= predicted[i] < speedup * (1 + margin)]
    fast = [i for i in order if predicted[i] >= speedup * (1 + margin)]
    take_near = min(len(near), max((most + 1) // 2, most - len(fast)))
    return sorted(near[:take_near] + fast[: most - take_near])


def _confirm(teacher, chosen: list[dict], settings: dict, build) -> dict:
    logger.info(
        "stage speed: timing %d shapes and the teacher interleaved (%d rounds, batch %d × %d tokens)",
        len(chosen), settings["rounds"], settings["batch_size"], settings["seq_len"],
    )  # fmt: skip
    models = {"teacher": teacher} | {shape_name(s): build(teacher, s) for s in chosen}
    keys = ("seq_len", "batch_size", "latency_inputs", "rounds", "warmup", "seed", "confidence", "threads")
    return measure_speeds(models, reference="teacher", **{k: settings[k] for k in keys})


def _table(key: dict, fit, shapes: list[dict], chosen: list[int], speeds) -> dict:
    settings = key["settings"]
    target, criterion = settings["speedup"], settings["criterion"]
    teacher = dict(key["teacher"])
    if speeds is not None:
        measured = speeds["models"]["teacher"]
        teacher |= {"throughput": measured["throughput"], "latency_ms": measured["latency_ms"]}
    rows = []
    for i, shape in enumerate(shapes):
        row = dict(shape) | {"name": shape_name(shape), "measured": i in chosen, "kept": False}
        row["predicted_speedup"] = None if fit is None else fit["predicted_speedups"][i]
        if i in chosen:
            entry = speeds["models"][row["name"]]
            row |= {
                k: entry[k] for k in ("speedup", "speedup_low", "speedup_high", "throughput", "latency_ms")
            }
            row |= {k: entry[k] for k in ("latency_speedup", "latency_speedup_low", "latency_speedup_high")}
            value = entry["speedup_low"] if criterion == "low" else entry["speedup"]
            row["kept"] = value >= target
            span = f"median ×{entry['speedup']:.2f}, interval ×{entry['speedup_low'] or float('nan'):.2f}"
            span += f"–×{entry['speedup_high'] or float('nan'):.2f}"
            word = "lower bound" if criterion == "low" else "median"
            row["reason"] = (
                f"meets ×{target:g} ({span})"
                if row["kept"]
                else f"too slow: {word} ×{value:.2f} < ×{target:g} ({span})"
            )
        elif row["predicted_speedup"] < target * (1 - settings["margin"]):
            row["reason"] = (
                f"not measured: predicted ×{row['predicted_speedup']:.2f} < ×{target * (1 - settings['margin']):.2f} "
                f"(×{target:g} less the {settings['margin']:.0%} margin)"
            )
        else:
            row["reason"] = (
                f"not measured: predicted ×{row['predicted_speedup']:.2f} meets it, but larger "
                f"shapes filled the max_candidates={settings['max_candidates']} slots"
            )
        rows.append(row)
    kept = sorted((r for r in rows if r["kept"]), key=lambda r: (r["throughput"], r["name"]))
    return {
        "key": key,
        "settings": settings,
        "teacher": teacher,
        "fit": fit,
        "candidates": rows,
        "kept": [r["name"] for r in kept],
    }
