# Two commands do all the set-up on a fresh machine (Python >= 3.10, 3.11 recommended):
#   make demo   -- creates/refreshes .venv, then runs the main job on data that ships
#   make test   -- creates/refreshes .venv, then lint + the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint format bench-cpu clean

# The venv is rebuilt when pyproject.toml changes (the stamp is older than it).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/medmamba demo

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-cpu: $(STAMP)
	$(BIN)/python benchmarks/scan_cpu.py

clean:
	rm -rf $(VENV) build dist *.egg-info
