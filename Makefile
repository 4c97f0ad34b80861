# Two commands a new user needs (see README):
#   make run    set everything up, then run the main job (kedro run) on the embedded sample
#   make test   set everything up, then run the whole test suite (CI runs exactly this)
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export KEDRO_DISABLE_TELEMETRY := true
export MPLBACKEND := Agg

.PHONY: setup run test benchmark viz clean-outputs

setup: $(STAMP)

# Reinstalls only when the declared dependencies change.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[test]"
	touch $(STAMP)

run: setup
	$(BIN)/kedro run

test: setup
	bash scripts/install_test_tools.sh
	$(BIN)/python -m pytest

benchmark: setup
	$(BIN)/python benchmarks/run_all.py

viz: setup
	$(BIN)/kedro viz run --no-browser
