"""Runs `llmkd generate` / `llmkd cache-teacher` slowly, for tests/test_faults_generate.py to SIGKILL from outside.

    python tests/faults_worker.py COMMAND RECIPE [--field value ...]

Each teacher forward (a cache shard's, a sampled batch's) first sleeps LLMKD_TEST_SLOW seconds, so that the test
can kill the process while it works; nothing else differs from the `llmkd` command.
"""

from __future__ import annotations

import functools
import os
import sys
import time


def slowed(function, seconds: float):
    @functools.wraps(function)
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return function(*args, **kwargs)

    return slow


def main() -> int:
    from llmkd.cli import main as llmkd
    from llmkd.data.synthesis import sampling
    from llmkd.teachers.cached import writer

    seconds = float(os.environ.get("LLMKD_TEST_SLOW", "0.3"))
    writer._shard_tensors = slowed(writer._shard_tensors, seconds)
    sampling.sample_batch = slowed(sampling.sample_batch, seconds)
    return llmkd(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
