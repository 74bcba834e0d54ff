"""The `llmkd` command: distill, finetune, eval, data, generate, cache-teacher, export and compress.

Logic lives in the library modules. This one imports nothing heavy: `--help` and a recipe's unknown keys are
answered before torch and transformers are imported (llmkd.cli.usage); each command imports what it needs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

COMMANDS = {
    "distill": "distil a teacher into a student: llmkd distill RECIPE.yaml [--field value ...]",
    "finetune": "fine-tune a classifier (e.g. a teacher): llmkd finetune RECIPE.yaml [--field value ...]",
    "eval": "evaluate checkpoints on GLUE-format tasks and write the teacher-vs-student report",
    "data": "prepare an offline dataset: llmkd data rotten-tomatoes OUT_DIR",
    "generate": "synthesise a transfer set from the teacher: llmkd generate RECIPE.yaml [--field value ...]",
    "cache-teacher": "run the teacher once and cache its top-k log-probs: llmkd cache-teacher RECIPE.yaml [--field value ...]",
    "export": "export a student folder for deployment: llmkd export STUDENT_DIR --onnx [--quantize int8]",
    "compress": "teacher + data -> the best student at a CPU speed-up: llmkd compress --teacher DIR --train_file F",
}
HELP = ("-h", "--help")
EPILOG = (
    "`llmkd COMMAND --help` lists a command's options (recipe commands: every recipe key with its help).\n"
    "`make install` puts llmkd in .venv: run `source .venv/bin/activate` first, or call .venv/bin/llmkd."
)


def _recipe_command(command: str, rest: list[str]) -> int:
    """distill, finetune, generate, cache-teacher: `--help`, then the fast key check, then the run."""
    from llmkd.cli.usage import check_recipe, command_help

    if any(token in HELP for token in rest):
        recipe = rest[0] if rest and rest[0] not in HELP and not rest[0].startswith("--") else None
        print(command_help(command, recipe))
        return 0
    if not rest or rest[0].startswith("--"):
        raise ValueError(
            f"usage: llmkd {command} RECIPE.yaml [--field value ...] (llmkd {command} --help lists the keys)"
        )
    check_recipe(command, rest[0], rest[1:])  # unknown keys, before torch is imported
    if command in ("distill", "finetune"):
        from llmkd.cli import pipeline

        report = getattr(pipeline, command)(rest[0], rest[1:])
        print(json.dumps(report.get("eval", report["train"]), indent=2, default=str))
    elif command == "generate":
        from llmkd.cli.generate import generate

        print(generate(rest[0], rest[1:]))
    else:
        from llmkd.cli.cache import cache_teacher, summary

        print(json.dumps(summary(cache_teacher(rest[0], rest[1:])), indent=2))
    return 0


def _run(command: str, rest: list[str]) -> int:
    if command in ("distill", "finetune", "generate", "cache-teacher"):
        return _recipe_command(command, rest)
    if command == "eval":
        from llmkd.cli.eval import main as sub_main
    elif command == "export":
        from llmkd.cli.export import main as sub_main
    elif command == "compress":
        from llmkd.cli.compress import main as sub_main
    else:
        from llmkd.cli.data import main as sub_main
    return sub_main(rest) or 0  # `llmkd eval --help` reaches the sub-command's own parser


def main(argv: list[str] | None = None) -> int:
    commands = "\n".join(f"  {name:<14} {text}" for name, text in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="llmkd",
        description=f"Knowledge distillation for HF transformers.\n\ncommands:\n{commands}",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "command", choices=list(COMMANDS), metavar="COMMAND", help="one of the commands above"
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help or the usage error and exits
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(argv[0], argv[1:])
    except BrokenPipeError:  # `llmkd distill --help | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError, ImportError) as err:
        # Bad input (a missing file or model, a bad value, a missing optional package): one clear line, no
        # traceback. OSError covers transformers' "not a valid model identifier" for a model it cannot find.
        from llmkd.cli.usage import hub_hint

        print(f"llmkd: error: {err}{hub_hint(err)}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun/accelerate, ranks leave together: one exiting mid-talk can make gloo abort its peer."""
    if "torch.distributed" not in sys.modules:
        return  # torch never imported (--help, a recipe refused early): no process group to leave
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
