"""Speed-up of a student over its teacher, timed two ways side by side: each model alone (the old way) and all
models interleaved with a paired per-round ratio (`llmkd.evaluation.speed`), several repetitions each,
alternating old and new so that both see the same spells of machine load.

    python -m benchmarks.bench_speed [--teacher runs/demo/teacher] [--student runs/demo/student-distil-seed42]
        [--repetitions 3] [--rounds 10] [--out runs/bench/speed.json]

The spread of each method's speed-up across repetitions (range and coefficient of variation) is what to read:
on a shared machine the alone-timed figure moves with the load, the interleaved one much less.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from transformers import AutoModelForSequenceClassification

from llmkd.atomic import write_json
from llmkd.evaluation.checkpoints import measure_speed
from llmkd.evaluation.speed import measure_speeds

KEYS = ("speedup", "latency_speedup")


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="runs/demo/teacher", help="reference checkpoint folder")
    parser.add_argument(
        "--student", default="runs/demo/student-distil-seed42", help="student checkpoint folder"
    )
    parser.add_argument("--repetitions", type=int, default=3, help="repetitions of both methods (>= 2)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per figure")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=32, help="batch of the throughput figure")
    parser.add_argument("--out", default="runs/bench/speed.json", help="JSON results")
    args = parser.parse_args(argv)
    if args.repetitions < 2:
        parser.error(f"--repetitions must be >= 2 to show a spread, got {args.repetitions}")
    return args


def alone(models: dict, args) -> dict:
    """The old evaluate_checkpoints: each model's latency and throughput timed alone, one after the other."""
    speed = {
        name: {
            "latency_ms": measure_speed(model, 1, args.seq_len, args.rounds, args.warmup)["latency_ms"],
            "throughput": measure_speed(model, args.batch_size, args.seq_len, args.rounds, args.warmup)[
                "throughput"
            ],
        }
        for name, model in models.items()
    }
    teacher, student = speed["teacher"], speed["student"]
    return {
        "speedup": student["throughput"] / teacher["throughput"],
        "latency_speedup": teacher["latency_ms"] / student["latency_ms"],
    }


def interleaved(models: dict, args) -> dict:
    new = measure_speeds(
        models,
        reference="teacher",
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        rounds=args.rounds,
        warmup=args.warmup,
    )["models"]["student"]
    return {k: new[k] for key in KEYS for k in (key, f"{key}_low", f"{key}_high")}


def main(argv=None) -> dict:
    args = parse(argv)
    load = AutoModelForSequenceClassification.from_pretrained
    models = {"teacher": load(args.teacher).eval(), "student": load(args.student).eval()}
    out = {"threads": torch.get_num_threads(), "old": [], "new": []}
    for rep in range(args.repetitions):
        out["old"].append(alone(models, args))
        out["new"].append(interleaved(models, args))
        print(rep, json.dumps({"old": out["old"][-1], "new": out["new"][-1]}), flush=True)
    for method in ("old", "new"):
        for key in KEYS:
            values = [r[key] for r in out[method]]
            out[f"{method}_{key}_range"] = [min(values), max(values)]
            out[f"{method}_{key}_cv_pct"] = 100 * statistics.stdev(values) / statistics.mean(values)
    write_json(args.out, out)
    print(json.dumps({k: v for k, v in out.items() if k not in ("old", "new")}, indent=1))
    return out


if __name__ == "__main__":
    main()
