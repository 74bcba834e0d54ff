"""GLUE teacher-vs-student report from the command line (the same as `llmkd eval`).

    python eval/glue.py --task sst2 --checkpoints teacher=DIR student=DIR [--data_dir DIR] [--out DIR]
        [--max_eval_samples N]        (--task all: the nine tasks; --data_dir then holds one folder per task)

Prints the Markdown table; with --out also writes report.md, report.json and score_vs_speedup.png.
"""

import logging
import sys

from llmkd.cli.eval import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
