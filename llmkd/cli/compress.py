"""`llmkd compress [RECIPE.yaml] --teacher DIR --train_file F [--validation_file F] [--speedup 2.5] ...`

Every setting is a CompressConfig field (llmkd.compress.config), given in a YAML recipe or as `--field value`
flags (flags win). Settings are checked before torch is imported; the run is llmkd.compress.run.compress.
"""

from __future__ import annotations

import dataclasses

USAGE = (
    "usage: llmkd compress [RECIPE.yaml] --teacher DIR_OR_ID --train_file FILE [--validation_file FILE] "
    "[--speedup 2.5] [--budget_minutes 30] [--field value ...]"
)


def help_text() -> str:
    from llmkd.compress.config import CompressConfig

    lines = [
        USAGE,
        "",
        "Distils the teacher into the best student that meets the CPU speed-up within the budget.",
        "",
    ]
    for f in dataclasses.fields(CompressConfig):
        default = "" if f.default is None else f" (default {f.default})"
        lines.append(f"  --{f.name:<22} {f.metadata['help']}{default}")
    lines += ["", "Rerun the same command to resume an interrupted run; results: OUTPUT_DIR/report.md."]
    return "\n".join(lines)


def read_settings(argv: list[str]) -> dict:
    """The recipe's values (paths found beside it as for `llmkd distill`) with the flags merged in."""
    from llmkd.cli.paths import check_recipe_paths, resolve_recipe_paths
    from llmkd.cli.recipe_files import parse_overrides, read_yaml

    recipe = argv[0] if argv and not argv[0].startswith("--") else None
    flags = parse_overrides(argv[1:] if recipe else argv)
    values = resolve_recipe_paths(read_yaml(recipe), recipe) if recipe else {}
    values |= flags
    check_recipe_paths(values, recipe or "compress.yaml", flags=set(flags) if recipe else set(values))
    return values


def main(argv: list[str]) -> int:
    if not argv or any(token in ("-h", "--help") for token in argv):
        print(help_text())
        return 0 if argv else 2
    from llmkd.compress.config import compress_config

    config = compress_config(read_settings(argv))  # every value checked before torch is imported
    from llmkd.compress.run import compress

    report = compress(config)
    print(f"report: {config.output_dir}/report.md; result: {report['result']['folder']}")
    return 0
