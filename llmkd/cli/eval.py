"""`llmkd eval` / `python eval/glue.py`: evaluate checkpoints and write the teacher-vs-student report.

On GLUE tasks (`--task`, files from `--data_dir` or the Hub) or on any classification file (`--validation_file`,
its columns from the flags, the checkpoints' records or the data: llmkd.evaluation.any_data). Every score comes
with a 95% bootstrap interval and every difference to the reference with a paired one.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

# Written out so that `llmkd eval --help` imports no torch or datasets; tests/test_cli_fast.py checks it equals
# sorted(llmkd.data.glue.GLUE_TASKS).
TASK_NAMES = ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llmkd eval",
        description="Evaluate checkpoints on GLUE tasks or on any classification file: teacher-vs-student report "
        "with 95% intervals.",
    )
    parser.add_argument(
        "--task",
        default=None,
        help=f"one of {TASK_NAMES}, a comma list, or 'all' (default: the checkpoints' recorded validation file, "
        "else sst2)",
    )
    _add_data_flags(parser)
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
        "--speed_repeats",
        type=int,
        default=10,
        help="interleaved timing rounds (all models in each round; the speed-up interval needs >= 6); 0: skip",
    )
    parser.add_argument("--speed_seq_len", type=int, default=128, help="sequence length of the speed runs")
    parser.add_argument("--title", default=None, help="report title")
    args = parser.parse_args(argv)
    _check_data_flags(parser, args)
    return args


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    """A user's own data file and its columns; the intervals' resampling."""
    parser.add_argument(
        "--validation_file",
        help="your own data instead of a GLUE task: csv/tsv/json/jsonl/parquet (or a saved dataset folder); "
        "default without --task: the file the checkpoints recorded when llmkd trained them",
    )
    parser.add_argument(
        "--text_columns",
        nargs="+",
        metavar="COLUMN",
        help="with --validation_file: the text column, or two for sentence pairs (default: what the checkpoint "
        "recorded, else the file's one text column)",
    )
    parser.add_argument(
        "--label_column",
        help="with --validation_file: the gold labels, ids or class names (default: recorded, else label/labels)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="resamples of the examples for the 95%% intervals (percentile bootstrap, paired between models); "
        "0: none",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples")


def _check_data_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """GLUE tasks have fixed columns and files; a user's file has no task name: refuse mixed flags."""
    if args.validation_file and (args.task or args.data_dir):
        parser.error("--validation_file replaces --task/--data_dir: give one or the other")
    if (args.task or args.data_dir) and (args.text_columns or args.label_column):
        parser.error(
            "--text_columns/--label_column go with --validation_file (GLUE tasks have fixed columns)"
        )
    if args.text_columns and len(args.text_columns) > 2:
        parser.error(f"--text_columns takes one column or two (a sentence pair), got {args.text_columns}")
    if args.bootstrap < 0:
        parser.error(f"--bootstrap takes a number of resamples >= 0 (0: no intervals), got {args.bootstrap}")


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
    from llmkd.evaluation.any_data import evaluate_file, recorded_file
    from llmkd.evaluation.checkpoints import evaluate_checkpoints
    from llmkd.evaluation.report import markdown_table, write_report

    checkpoints = parse_checkpoints(args.checkpoints)
    reference = args.reference or ("teacher" if "teacher" in checkpoints else next(iter(checkpoints)))
    common = {
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "max_eval_samples": args.max_eval_samples,
        "reference": reference,
        "speed_repeats": args.speed_repeats,
        "speed_seq_len": args.speed_seq_len,
        "bootstrap": args.bootstrap,
        "seed": args.seed,
    }
    # No data named: the validation file the checkpoints recorded when llmkd trained them, else sst2 as before.
    if not (args.validation_file or args.task or args.data_dir):
        args.validation_file = recorded_file(checkpoints)
    if not args.validation_file and (args.text_columns or args.label_column):
        raise ValueError(
            "--text_columns/--label_column go with --validation_file, and the checkpoints recorded no validation "
            "file: pass --validation_file"
        )
    if args.validation_file:
        results = evaluate_file(
            checkpoints, args.validation_file, args.text_columns, args.label_column, **common
        )
        name = os.path.basename(os.path.normpath(args.validation_file))
    else:
        results = evaluate_checkpoints(checkpoints, args.task or "sst2", data_dir=args.data_dir, **common)
        name = ", ".join(results["tasks"])
    title = args.title or f"llmkd eval: {name}"
    print(write_report(results, args.out, title) if args.out else markdown_table(results, title))
    return 0
