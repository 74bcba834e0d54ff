"""Which student shapes of a classifier teacher meet a CPU throughput speed-up on this machine: the candidate grid
(`candidate_shapes`: every depth × 3 head counts × 4 FFN widths), screened by a cost model fitted on a few probes,
then the largest shapes predicted to meet the target timed interleaved with the teacher
(`llmkd.compress.search.shapes_meeting_speedup`).

    OMP_NUM_THREADS=2 .venv/bin/python scripts/probe_shapes.py --teacher runs/demo/teacher --speedup 2.5 \
        --out /tmp/probe_shapes.json

Prints a Markdown table (every shape: parameters, predicted and measured speed-up with its 95% interval, kept or
why not) and writes the whole table as JSON to --out.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from transformers import AutoModelForSequenceClassification

from llmkd.atomic import write_json
from llmkd.compress.search import shapes_meeting_speedup


def _x(value) -> str:
    return "-" if value is None else f"×{value:.2f}"


def markdown(table: dict) -> str:
    lines = [
        "| shape | params (M) | predicted | throughput speed-up [95% interval] | latency speed-up | kept |",
        "|---|---:|---:|---|---:|---|",
    ]
    rows = sorted(table["candidates"], key=lambda r: (not r["measured"], r["predicted_speedup"] or 0.0))
    for r in rows:
        measured = (
            f"{_x(r['speedup'])} [{_x(r['speedup_low'])}, {_x(r['speedup_high'])}]" if r["measured"] else "-"
        )
        lines.append(
            f"| {r['name']} | {r['parameters'] / 1e6:.1f} | {_x(r['predicted_speedup'])} | {measured} | "
            f"{_x(r.get('latency_speedup'))} | {'yes' if r['kept'] else r['reason']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="folder or Hub id of a sequence classifier")
    parser.add_argument("--speedup", type=float, default=2.5, help="throughput speed-up to meet")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--max_candidates", type=int, default=8)
    parser.add_argument("--criterion", default="low", choices=["low", "median"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's count)")
    parser.add_argument("--out", required=True, help="JSON file for the table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher).eval()
    start = time.perf_counter()
    table = shapes_meeting_speedup(
        teacher,
        None,
        args.speedup,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        rounds=args.rounds,
        max_candidates=args.max_candidates,
        criterion=args.criterion,
        threads=args.threads,
    )
    table["wall_seconds"] = time.perf_counter() - start
    table["torch_threads"] = torch.get_num_threads() if args.threads is None else args.threads
    write_json(args.out, table)
    print(markdown(table))
    print(f"\n{len(table['kept'])} shapes kept of {len(table['candidates'])}; {table['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
