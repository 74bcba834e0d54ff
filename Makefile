# llmkd — every target does its own set-up: on a fresh clone `make demo` and `make test` are all you need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: install test demo quality style bench clean

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
.PHONY: demo-data-free
demo-data-free: install
	$(PY) recipes/demo_data_free.py

quality: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

style: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The demo with 3 seeds per student method (reuses the demo's teacher and seed-42 students, adds two seeds), then
# the loss memory/time benchmark: naive vs chunked vs fused logit distillation, side by side in one run.
bench: install
	$(PY) recipes/demo.py --seeds 3
	$(PY) -m llmkd.bench_losses --positions 4096 --vocab 49152 151936 --chunk-size 256 --out runs/bench/losses.json

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
