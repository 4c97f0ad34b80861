"""The screenshots of docs/tracking.md: the MLflow UI comparing orderings, and policies x seeds.

    python scripts/mlflow_screenshots.py                 # runs the project in a temporary copy first
    python scripts/mlflow_screenshots.py --project DIR   # the same in DIR (kept), or DIR's tracked runs

In a copy of the project (its own tracking store), this runs the default
``kedro run`` (as ``make run``) and a shortened ``batch_selection`` (``SELECTION`` below),
starts ``mlflow ui`` on the copy's store, and saves two views of it, taken in headless
Chromium (Debian's ``chromium``), into docs/images/:

* ``mlflow_compare_orderings.png``: the test accuracy of every ordering per epoch (mean
  over the seeds), one chart, from the default run (metrics ``test_accuracy/<ordering>``,
  step = epoch);
* ``mlflow_compare_seeds.png``: the validation accuracy per optimizer step of every
  (policy, seed) nested run of the batch_selection run.

The MLflow UI's assistant panel (right-hand side, empty) is cropped off.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# 3 seeds x 3 policies, 8 epochs (4 + 2 + 2) of 40 steps: a few minutes on a 2-core CPU.
SELECTION = {"batch_selection": {
    "seeds": [0, 1, 2], "policies": ["shuffle", "fixed_random", "learned"],
    "training": {"phases": [{"epochs": 4, "lr": 0.1}, {"epochs": 2, "lr": 0.01}, {"epochs": 2, "lr": 0.001}]},
}}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1700,860", "--virtual-time-budget=30000"]
ASSISTANT_PANEL_WIDTH = 434  # px at this window size


def copy_project(destination: Path) -> Path:
    shutil.copytree(PROJECT_ROOT / "conf", destination / "conf", ignore=shutil.ignore_patterns("local"))
    (destination / "conf" / "local").mkdir()
    (destination / "data" / "01_raw").mkdir(parents=True)
    shutil.copy2(PROJECT_ROOT / "data/01_raw/cifar10-sample.zip", destination / "data/01_raw/")
    shutil.copy2(PROJECT_ROOT / "pyproject.toml", destination / "pyproject.toml")
    (destination / "src").mkdir()  # the package is installed; Kedro only checks that src/ exists
    return destination


def run(project: Path, pipeline: str | None, runtime_params: dict | None = None) -> None:
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    previous = Path.cwd()
    os.chdir(project)
    try:
        bootstrap_project(project)
        with KedroSession.create(project_path=project, runtime_params=runtime_params) as session:
            session.run(pipeline_names=[pipeline] if pipeline else None)
    finally:
        os.chdir(previous)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def metric_page(base: str, run_ids: list[str], experiment_id: str, keys: list[str]) -> str:
    query = {
        "runs": json.dumps(run_ids), "metric": json.dumps(keys[0]), "experiments": json.dumps([experiment_id]),
        "plot_metric_keys": json.dumps(keys), "plot_layout": "{}", "x_axis": "step", "y_axis_scale": "linear",
        "line_smoothness": "1", "show_point": "true", "deselected_curves": "[]", "last_linear_y_axis_range": "[]",
    }
    return f"{base}/#/metric?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)


def screenshot(chromium: str, url: str, out: Path) -> None:
    from PIL import Image

    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=180)
    image = Image.open(out)
    image.crop((0, 0, image.width - ASSISTANT_PANEL_WIDTH, image.height)).save(out)
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, help="a project whose default and batch_selection runs are "
                        "tracked; when it does not exist, the project is copied there and run first")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "images")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("Chromium is not installed: `apt-get install chromium` (Debian), then run this again.")
    os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MPLBACKEND", "Agg")
    with tempfile.TemporaryDirectory() as work:
        project = args.project or Path(work) / "project"
        if not project.exists():
            copy_project(project)
            run(project, None)
            run(project, "batch_selection", SELECTION)
        serve(project.resolve(), chromium, args.out)


def serve(project: Path, chromium: str, out: Path) -> None:
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{project / 'data' / '09_tracking' / 'mlflow.db'}"
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("best_minibatch")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    # the newest default run that trained (a rerun that reused its trainings logs no training curves)
    default = next(r for r in runs if r.info.run_name.startswith("__default__")
                   and any(key.startswith("test_accuracy/") for key in r.data.metrics))
    selection = next(r for r in runs if r.info.run_name.startswith("batch_selection"))
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == selection.info.run_id]
    children.sort(key=lambda r: (r.data.params["policy"], int(r.data.params["seed"])))
    # the seed means (test_accuracy/<ordering>), not each seed's curve (test_accuracy/<ordering>.seed_<S>)
    orderings = sorted(key for key in default.data.metrics if key.startswith("test_accuracy/") and "." not in key)

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("mlflow ui did not start") from None
                time.sleep(1)
        out.mkdir(parents=True, exist_ok=True)
        screenshot(chromium, metric_page(base, [default.info.run_id], experiment.experiment_id, orderings),
                   out / "mlflow_compare_orderings.png")
        screenshot(chromium, metric_page(base, [c.info.run_id for c in children], experiment.experiment_id,
                                         ["val_accuracy"]), out / "mlflow_compare_seeds.png")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
