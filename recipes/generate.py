"""Entry script for `accelerate launch recipes/generate.py RECIPE.yaml [--field value …]` (or torchrun).

The same recipe YAML as `llmkd generate`; every process writes its own shards, the main one merges them.
It holds no logic of its own (see llmkd.generate and llmkd.data.synthesis.io).
"""

import sys

from llmkd.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
