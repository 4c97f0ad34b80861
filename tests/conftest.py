"""Shared fixtures: the real data every test may use."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from best_minibatch.data.cifar import ImageDataset, read_image_dataset
from tests.process_guard import pytest_configure, pytest_sessionfinish  # noqa: F401 (hooks: no process outlives the tests)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_ZIP = PROJECT_ROOT / "data" / "01_raw" / "cifar10-sample.zip"
FULL_CIFAR_ZIP = PROJECT_ROOT.parent / "shared" / "data" / "cifar10-jpeg.zip"

# Two cores: keep torch from oversubscribing them when tests run.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def sample_dataset() -> ImageDataset:
    """The embedded sample (5,000 train + 1,000 test real CIFAR-10 images)."""
    return read_image_dataset(SAMPLE_ZIP)


# .ci/run sets this: there the full dataset must be present, and its absence fails the tests that need it.
FULL_DATA_REQUIRED = "BEST_MINIBATCH_REQUIRE_FULL_DATA"


def full_data_or_skip(path: Path, required: bool) -> Path:
    """``path`` if it exists; else skip the test naming the file, or fail it when the full data is ``required``."""
    if path.exists():
        return path
    reason = (f"{path} is absent: all of CIFAR-10 as JPEG, which is not part of the project (machines of this "
              f"project and CI have it at ../shared/data/)")
    if required:
        pytest.fail(f"{reason}; {FULL_DATA_REQUIRED}=1 says the full data is required here.")
    pytest.skip(f"{reason}; set {FULL_DATA_REQUIRED}=1 to make its absence a failure.")


@pytest.fixture(scope="session")
def full_cifar_zip() -> Path:
    """All of CIFAR-10 as JPEG: in ../shared on this project's machines and in CI, absent from a bare clone."""
    return full_data_or_skip(FULL_CIFAR_ZIP, os.environ.get(FULL_DATA_REQUIRED, "") not in ("", "0"))


@pytest.fixture(scope="session")
def full_dataset(full_cifar_zip: Path) -> ImageDataset:
    """All 60,000 CIFAR-10 images, decoded once per test session (~2 s)."""
    return read_image_dataset(full_cifar_zip)


# --------------------------------------------------------------------------- whole-project runs

# The default pipeline with one epoch per phase: every pipeline and ordering runs, in about
# a third of `kedro run`'s time. The real default (3 epochs per phase) is what `make run` does.
QUICK_RUN_PARAMS = {
    "training": {
        "phases": [{"epochs": 1, "lr": 0.1}, {"epochs": 1, "lr": 0.01}, {"epochs": 1, "lr": 0.001}]
    }
}


def copy_project(destination: Path, tracking: bool = False) -> Path:
    """Copy what a run needs (conf, embedded data, pyproject) into ``destination``.

    Runs in the copy leave the checkout's own data/ untouched. MLflow tracking is off in
    the copy (conf/local/mlflow.yml) unless ``tracking``: only tests of tracking need it.
    """
    shutil.copytree(PROJECT_ROOT / "conf", destination / "conf", ignore=shutil.ignore_patterns("local"))
    (destination / "conf" / "local").mkdir()
    if not tracking:
        (destination / "conf" / "local" / "mlflow.yml").write_text("enabled: false\n")
    (destination / "data" / "01_raw").mkdir(parents=True)
    shutil.copy2(PROJECT_ROOT / "data/01_raw/cifar10-sample.zip", destination / "data/01_raw/")
    shutil.copy2(PROJECT_ROOT / "pyproject.toml", destination / "pyproject.toml")
    # The package itself is installed (editable); Kedro only checks that src/ exists.
    (destination / "src").mkdir()
    return destination


def run_session(project: Path, env: str | None = None, pipeline: str | None = None,
                runtime_params: dict | None = None, load_versions: dict | None = None):
    """One ``kedro run`` (one session) in ``project``; ``runtime_params`` nests like ``--params a.b=1``."""
    previous = Path.cwd()
    os.chdir(project)  # catalog paths are relative to the working directory
    try:
        bootstrap_project(project)
        with KedroSession.create(project_path=project, env=env, runtime_params=runtime_params) as session:
            return session.run(pipeline_names=[pipeline] if pipeline else None, load_versions=load_versions)
    finally:
        os.chdir(previous)


#: Fixtures that run a whole project, `make gpu-check` or a kedro-viz server: a test that uses one, directly or
#: through another fixture, is marked slow (`make test-fast` leaves it out; `make test` and CI run it).
SLOW_FIXTURES = {"finished_project", "dask_project", "cpu_report", "viz_server", "finished_run"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def finished_project(tmp_path_factory) -> Path:
    """A copy of the project after one quick default run (every pipeline, every ordering), tracked in
    MLflow in its own store (data/09_tracking/; tests/test_tracking.py reads it)."""
    os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
    project = copy_project(tmp_path_factory.mktemp("finished") / "project", tracking=True)
    run_session(project, runtime_params=QUICK_RUN_PARAMS)
    return project
