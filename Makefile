# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test lint typecheck pytest bench bench-quick equivalence clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e .
	touch $@

$(DEV_STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@ $(STAMP)

demo: $(STAMP)
	$(BIN)/quantum-trader demo

test: $(DEV_STAMP)
	$(BIN)/ruff check src tests $(wildcard bench)
	$(BIN)/ruff format --check src tests $(wildcard bench)
	$(BIN)/mypy
	$(BIN)/python -m pytest

bench: $(DEV_STAMP)
	$(BIN)/python -m bench

bench-quick: $(DEV_STAMP)
	$(BIN)/python -m bench --quick

# The backtest's two transports held to one outcome on many more generated scenarios than `make test` runs.
equivalence: $(DEV_STAMP)
	QT_TEST_EQUIVALENCE_EXAMPLES=400 $(BIN)/python -m pytest -p no:randomly tests/backtest/test_equivalence.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
