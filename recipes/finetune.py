"""Entry script for `accelerate launch recipes/finetune.py RECIPE.yaml [--field value …]` (see llmkd.cli.pipeline)."""

import sys

from llmkd.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
