"""Benchmark: the sequential runner against the Dask runner on two workers, side by side, in one run.

Two measurements, each a whole ``kedro run`` in a fresh copy of the project (conf/,
the embedded CIFAR-10 sample; MLflow tracking off), so no run finds another's trained
results to reuse:

* the default pipeline (``kedro run``, what ``make run`` does);
* ``batch_selection``'s base experiment (``kedro run --pipeline=batch_selection``), on
  the outputs of one default run made first (not timed), copied afresh for every
  measured run.

For each, the sequential runner and ``--runner=best_minibatch.kedro_glue.runner.DaskRunner`` with a
``local`` cluster of two worker processes (a ``conf/local/dask.yml`` in the copy) take
turns, ``--rounds`` times each, and the median wall-clock seconds (from starting
``kedro run`` to its exit, cluster start and stop included) and their ratio are
printed. Wall-clock is the figure that matters here (the Dask runner's gain is using
both cores at once), so run it on a quiet machine.

    .venv/bin/python benchmarks/benchmark_runners.py [--rounds 1] [--workers 2]
        [--params "gradient_training.null_batches=2"] [--conf-overlay tiny.yml] [--out results.json]

``--params`` goes to every ``kedro run`` as its ``--params`` (Kedro's syntax);
``--conf-overlay`` is a YAML file copied into each copy's ``conf/local/`` (parameters
merged key by key over conf/base), for overrides ``--params`` cannot spell (lists of
phases). Both make a tiny configuration to try the script quickly; the figures of
record use neither. ``--tiny`` times only the ``ingest_cifar`` pipeline on one worker (seconds;
the test suite runs it so that the script cannot rot unnoticed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path("data/01_raw/cifar10-sample.zip")
DASK_RUNNER = "best_minibatch.kedro_glue.runner.DaskRunner"


def copy_project(destination: Path, overlay: Path | None, workers: int) -> Path:
    """conf/ (without local), the sample, pyproject.toml and an empty src/: what a run needs."""
    shutil.copytree(PROJECT_ROOT / "conf", destination / "conf", ignore=shutil.ignore_patterns("local"))
    local = destination / "conf" / "local"
    local.mkdir()
    (local / "mlflow.yml").write_text("enabled: false\n")
    (local / "dask.yml").write_text(f"cluster: local\nlocal:\n  n_workers: {workers}\n")
    if overlay is not None:
        shutil.copy2(overlay, local / "parameters_benchmark_overlay.yml")
    (destination / SAMPLE.parent).mkdir(parents=True)
    shutil.copy2(PROJECT_ROOT / SAMPLE, destination / SAMPLE)
    shutil.copy2(PROJECT_ROOT / "pyproject.toml", destination / "pyproject.toml")
    (destination / "src").mkdir()
    return destination


def kedro_run(project: Path, pipeline: str | None, dask: bool, params: str, log: Path) -> float:
    """Wall-clock seconds of one ``kedro run`` in ``project``; its output goes to ``log``."""
    command = [str(Path(sys.executable).parent / "kedro"), "run"]
    if pipeline:
        command.append(f"--pipeline={pipeline}")
    if dask:
        command.append(f"--runner={DASK_RUNNER}")
    if params:
        command.append(f"--params={params}")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"), "KEDRO_DISABLE_TELEMETRY": "true",
           "MPLBACKEND": "Agg"}
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"`{' '.join(command)}` failed in {project} (exit {done.returncode}); see {log}")
    return seconds


def measure(name: str, rounds: int, fresh: callable, pipeline: str | None, params: str, logs: Path
            ) -> dict[str, list[float]]:
    seconds: dict[str, list[float]] = {"sequential": [], "dask": []}
    for round_ in range(rounds):
        # Alternate which runner goes first, so a trend in machine load hits both alike.
        order = ("sequential", "dask") if round_ % 2 == 0 else ("dask", "sequential")
        for runner in order:
            project = fresh()
            took = kedro_run(project, pipeline, runner == "dask", params, logs / f"{name}-{runner}-{round_}.log")
            seconds[runner].append(took)
            print(f"  {name}, {runner}: {took:.1f} s", flush=True)
            shutil.rmtree(project, ignore_errors=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="measured runs per runner and pipeline")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the Dask runner's local cluster")
    parser.add_argument("--params", default="", help="passed to every kedro run as --params")
    parser.add_argument("--conf-overlay", type=Path, default=None, help="a YAML file copied into conf/local/")
    parser.add_argument("--skip-selection", action="store_true", help="measure the default run only")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--pipeline", default=None, help="time this pipeline instead of the default run")
    parser.add_argument("--tiny", action="store_true", help="every section with tiny sizes, seconds long (the test "
                        "suite runs it: tests/test_benchmarks.py); its figures mean nothing")
    args = parser.parse_args(argv)
    if args.tiny:
        args.rounds, args.workers, args.skip_selection, args.pipeline = 1, 1, True, "ingest_cifar"
    if args.conf_overlay is not None and not args.conf_overlay.is_file():
        parser.error(f"--conf-overlay {args.conf_overlay} is not a file")

    root = Path(tempfile.mkdtemp(prefix="benchmark-runners-"))
    logs = root / "logs"
    logs.mkdir()
    counter = iter(range(10**6))

    def fresh_copy() -> Path:
        return copy_project(root / f"project-{next(counter)}", args.conf_overlay, args.workers)

    print(f"Runner benchmark: sequential vs Dask ({args.workers} local workers), {args.rounds} round(s); "
          f"logs in {logs}", flush=True)
    figures: dict[str, dict[str, list[float]]] = {}
    try:
        figures[f"kedro run --pipeline={args.pipeline}" if args.pipeline else "default kedro run"] = measure(
            "default", args.rounds, fresh_copy, args.pipeline, args.params, logs)
        if not args.skip_selection:
            prepared = fresh_copy()
            print("  (a default run to make batch_selection's inputs, not timed)", flush=True)
            kedro_run(prepared, None, False, args.params, logs / "prepare.log")

            def prepared_copy() -> Path:
                copy = root / f"selection-{next(counter)}"
                shutil.copytree(prepared, copy)
                return copy

            figures["batch_selection (base)"] = measure("selection", args.rounds, prepared_copy, "batch_selection",
                                                        args.params, logs)
    finally:
        for path in root.iterdir():
            if path != logs:
                shutil.rmtree(path, ignore_errors=True)

    print(f"\n{'':28}{'sequential':>14}{f'Dask, {args.workers} workers':>20}{'sequential / Dask':>20}")
    results = {}
    for name, seconds in figures.items():
        sequential, dask = statistics.median(seconds["sequential"]), statistics.median(seconds["dask"])
        results[name] = {"sequential_s": seconds["sequential"], "dask_s": seconds["dask"],
                         "ratio_sequential_over_dask": sequential / dask}
        print(f"{name:28}{sequential:>12.1f} s{dask:>18.1f} s{sequential / dask:>19.2f}x")
    print("(median wall-clock seconds of each whole `kedro run`; a ratio above 1 means the Dask runner is faster)")
    if args.out is not None:
        args.out.write_text(json.dumps({"workers": args.workers, "rounds": args.rounds, "params": args.params,
                                        "conf_overlay": str(args.conf_overlay) if args.conf_overlay else None,
                                        "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
