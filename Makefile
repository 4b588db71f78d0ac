# Two entry points on a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv on first use; torch is pinned to the CPU wheel these machines carry.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test setup

$(VENV)/.dev-installed: pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements-dev.txt
	$(PIP) install -e ".[dev]"
	touch $@

setup: $(VENV)/.dev-installed

test: $(VENV)/.dev-installed
	OMP_NUM_THREADS=2 $(PY) -m pytest

demo: $(VENV)/.dev-installed
	$(PY) examples/demo.py
