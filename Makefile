# llmkd — every target does its own set-up: on a fresh clone `make demo` and `make test` are all you need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: install test demo demo-data-free demo-cross-modal espeak-ng quality style bench bench-methods bench-compress clean

install: $(STAMP)

# Torch is pinned through a constraints file so that no later install can swap the CPU build for a
# multi-GB CUDA one; a torch that $(PYTHON) already has is reused (scripts/install.sh).
$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(PYTHON) $(VENV)
	touch $(STAMP)

# Tests run single-threaded (OMP_NUM_THREADS=1) so that their timing does not depend on the machine.
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

demo: install
	$(PY) recipes/demo.py

# Data-free distillation (issue 4): SmolLM2 writes the transfer sets; reuses `make demo`'s teacher (or makes it).
demo-data-free: install
	$(PY) recipes/demo_data_free.py

# Cross-modal distillation (issue 13): the demo's MiniLM teacher reads Rotten Tomatoes sentences, a speech student
# hears them spoken by espeak-ng (installed here from the system packages when missing). About 20 minutes.
demo-cross-modal: install espeak-ng
	$(PY) recipes/demo_cross_modal.py

espeak-ng:
	@command -v espeak-ng >/dev/null || { if [ "$$(id -u)" = 0 ]; then apt-get install -y espeak-ng || { apt-get update && apt-get install -y espeak-ng; }; else sudo apt-get install -y espeak-ng; fi; }

quality: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

style: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The demo with 3 seeds per student method (reuses the demo's teacher and seed-42 students, adds two seeds); the
# loss memory/time benchmark (naive vs chunked vs fused, side by side in one run; naive cases that do not fit are
# skipped); the teacher-logit cache's size/faithfulness and training-step costs; batched sampling vs generate().
bench: install
	$(PY) recipes/demo.py --seeds 3
	$(PY) -m benchmarks.bench_losses --losses jsd --vocab 49152 --positions 4096 --chunk-size 32 --threads 1 --repeats 2 --memory-budget-gib 14 --out runs/bench/losses_v49k.json
	$(PY) -m benchmarks.bench_losses --losses jsd --vocab 151936 --positions 1024 4096 --chunk-size 32 --threads 1 --repeats 2 --memory-budget-gib 14 --out runs/bench/losses_v152k.json
	$(PY) -m benchmarks.bench_steps --what faithfulness --out runs/bench/cache_faithfulness.json
	$(PY) -m benchmarks.bench_steps --what steps --out runs/bench/cache_steps.json
	$(PY) -m benchmarks.bench_generation --out runs/bench/generation.json

# The survey's comparison table (issue 10): every scheme and algorithm on the demo task, 3 seeds each, on the same
# slice of the training data (about an hour on 2 cores); reuses `make demo`'s teacher and data (or makes them).
bench-methods: install
	$(PY) recipes/methods.py

# `llmkd compress` (issue 12) on the demo task and on two tasks of other kinds, 3 seeds each, 30-minute budget per
# run (about 4.5 hours on 2 cores); reuses `make demo`'s teacher and data (or makes them). Writes
# runs/compress/summary-*.md. A subset: make bench-compress COMPRESS_ARGS="--tasks demo --seeds 1".
COMPRESS_ARGS ?=
bench-compress: install
	$(PY) recipes/compress_bench.py $(COMPRESS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
