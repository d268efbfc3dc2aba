# Quickstart: `make demo` and `make test` on a fresh machine with Python 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/featurepipe demo

test: lint
	$(BIN)/pytest -q

test-fast: lint
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check tasks flows tests benchmarks
	$(BIN)/ruff format --check tasks flows tests benchmarks

clean:
	rm -rf data/demo data/stores runs .pytest_cache
