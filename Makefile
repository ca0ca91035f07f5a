# Two commands for a fresh machine: `make demo` (set up + run the demo) and `make test`.
# `make test` is the fast tier; `make test-all` (what CI runs) adds the slow, deploy, faults and
# realdata tiers, which pyproject's pytest addopts deselect by default.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-all lint typecheck setup clean

setup: $(VENV)/.installed

# torch first, pinned: a resolver left alone would pull a newer build with GBs of CUDA packages.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "pivotmap needs Python 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c requirements.lock -e ".[test]"
	touch $@

demo: setup
	$(BIN)/pivotmap demo --out demo-out

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# An empty -m lifts the default deselection: every tier runs.
test-all: setup
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

# mypy with [tool.mypy] of pyproject.toml, over the package layout that setuptools installs.
typecheck: setup
	$(BIN)/python .ci/typecheck.py

clean:
	rm -rf demo-out .pytest_cache .mypy_cache
