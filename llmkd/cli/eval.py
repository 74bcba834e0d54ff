"""`llmkd eval` / `python eval/glue.py`: evaluate checkpoints and write the teacher-vs-student report."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

# Written out so that `llmkd eval --help` imports no torch or datasets; tests/test_cli_fast.py checks it equals
# sorted(llmkd.data.glue.GLUE_TASKS).
TASK_NAMES = ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llmkd eval", description="Evaluate checkpoints on GLUE-format tasks: teacher-vs-student report."
    )
    parser.add_argument("--task", default="sst2", help=f"one of {TASK_NAMES}, a comma list, or 'all'")
    parser.add_argument(
        "--checkpoints",
        nargs="+",
        required=True,
        metavar="NAME=DIR",
        help="e.g. teacher=DIR (DIR may be a .onnx file or an `llmkd export` folder)",
    )
    parser.add_argument(
        "--data_dir", help="<split>.<ext> files (several tasks: <task>/ folders); default: Hub"
    )
    parser.add_argument("--out", help="write report.md, report.json and the plot here (default: print only)")
    parser.add_argument("--reference", help="checkpoint to compare with (default: teacher, else the first)")
    parser.add_argument("--max_eval_samples", type=int, help="the first N validation examples of each split")
    parser.add_argument("--batch_size", type=int, default=32, help="evaluation batch size")
    parser.add_argument(
        "--max_length",
        type=int,
        default=None,
        help="truncate inputs to this many tokens (default: each checkpoint's own, as trained; else 128)",
    )
    parser.add_argument(
        "--speed_repeats", type=int, default=10, help="timed passes per speed figure; 0: skip"
    )
    parser.add_argument("--speed_seq_len", type=int, default=128, help="sequence length of the speed runs")
    parser.add_argument("--title", default=None, help="report title")
    return parser.parse_args(argv)


def parse_checkpoints(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--checkpoints takes NAME=DIR pairs, got {pair!r}")
        if name in out:
            raise ValueError(f"checkpoint name {name!r} is given twice")
        out[name] = path
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from llmkd.evaluation.checkpoints import evaluate_checkpoints
    from llmkd.evaluation.report import markdown_table, write_report

    checkpoints = parse_checkpoints(args.checkpoints)
    reference = args.reference or ("teacher" if "teacher" in checkpoints else next(iter(checkpoints)))
    results = evaluate_checkpoints(
        checkpoints,
        args.task,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_eval_samples=args.max_eval_samples,
        reference=reference,
        speed_repeats=args.speed_repeats,
        speed_seq_len=args.speed_seq_len,
    )
    title = args.title or f"llmkd eval: {', '.join(results['tasks'])}"
    print(write_report(results, args.out, title) if args.out else markdown_table(results, title))
    return 0
