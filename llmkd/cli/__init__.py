"""The `llmkd` command: distill, finetune, eval, data and demo. Logic lives in the library modules."""

from __future__ import annotations

import argparse
import json
import logging
import sys

COMMANDS = {
    "distill": "distil a teacher into a student: llmkd distill RECIPE.yaml [--field value ...]",
    "finetune": "fine-tune a classifier (e.g. a teacher): llmkd finetune RECIPE.yaml [--field value ...]",
    "eval": "evaluate checkpoints on GLUE-format tasks and write the teacher-vs-student report",
    "data": "prepare an offline dataset: llmkd data rotten-tomatoes OUT_DIR",
    "generate": "synthesise a transfer set from the teacher: llmkd generate RECIPE.yaml [--field value ...]",
    "cache-teacher": "run the teacher once and cache its top-k log-probs: llmkd cache-teacher RECIPE.yaml [--field value ...]",
}


def _run(command: str, rest: list[str]) -> int:
    if command in ("distill", "finetune"):
        from llmkd.cli import pipeline

        if not rest or rest[0].startswith("--"):
            raise ValueError(f"usage: llmkd {command} RECIPE.yaml [--field value ...]")
        report = getattr(pipeline, command)(rest[0], rest[1:])
        print(json.dumps(report.get("eval", report["train"]), indent=2, default=str))
        return 0
    if command == "generate":
        from llmkd.cli.generate import generate

        if not rest or rest[0].startswith("--"):
            raise ValueError("usage: llmkd generate RECIPE.yaml [--field value ...]")
        print(generate(rest[0], rest[1:]))
        return 0
    if command == "cache-teacher":
        from llmkd.cli.cache import cache_teacher, summary

        if not rest or rest[0].startswith("--"):
            raise ValueError("usage: llmkd cache-teacher RECIPE.yaml [--field value ...]")
        manifest = cache_teacher(rest[0], rest[1:])
        print(json.dumps(summary(manifest), indent=2))
        return 0
    if command == "eval":
        from llmkd.cli.eval import main as eval_main

        return eval_main(rest) or 0
    from llmkd.cli.data import main as data_main

    return data_main(rest) or 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmkd", description="Knowledge distillation for HF transformers.")
    parser.add_argument(
        "command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v}" for k, v in COMMANDS.items())
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help or the usage error and exits
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(argv[0], argv[1:])  # `llmkd eval --help` reaches the sub-command's own parser
    except (ValueError, FileNotFoundError, ImportError) as err:  # ImportError: a missing optional package
        # Bad input: one clear line, no traceback (bugs still raise everything else).
        print(f"llmkd: error: {err}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun/accelerate, ranks leave together: one exiting mid-talk can make gloo abort its peer."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
