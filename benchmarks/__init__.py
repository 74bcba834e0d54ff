"""Benchmarks (`make bench`): outside the package, run from the repository root as `python -m benchmarks.NAME`."""
