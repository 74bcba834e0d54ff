"""Entry script for `accelerate launch recipes/distill.py RECIPE.yaml [--field value …]`.

Every recipe YAML runs through this one script; it holds no logic of its own (see llmkd.cli).
"""

import sys

from llmkd.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
