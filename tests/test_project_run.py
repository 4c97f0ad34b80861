"""Whole-project runs through a Kedro session, on a copy of the project in a temporary folder.

The copy keeps the real ``data/`` folder of the checkout untouched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from tests.conftest import PROJECT_ROOT


def copy_project(destination: Path) -> Path:
    """Copy what a run needs (conf, embedded data, pyproject) into ``destination``."""
    shutil.copytree(PROJECT_ROOT / "conf", destination / "conf", ignore=shutil.ignore_patterns("local"))
    (destination / "conf" / "local").mkdir()
    (destination / "data" / "01_raw").mkdir(parents=True)
    shutil.copy2(PROJECT_ROOT / "data/01_raw/cifar10-sample.zip", destination / "data/01_raw/")
    shutil.copy2(PROJECT_ROOT / "pyproject.toml", destination / "pyproject.toml")
    # The package itself is installed (editable); Kedro only checks that src/ exists.
    (destination / "src").mkdir()
    return destination


@pytest.fixture
def project_copy(tmp_path, monkeypatch) -> Path:
    project = copy_project(tmp_path / "project")
    monkeypatch.chdir(project)  # catalog paths are relative to the working directory
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    bootstrap_project(project)
    return project


def run_session(project: Path, env: str | None = None, pipeline: str | None = None, runtime_params: dict | None = None):
    """One ``kedro run`` (one session); ``runtime_params`` nests like ``--params a.b=1``."""
    with KedroSession.create(project_path=project, env=env, runtime_params=runtime_params) as session:
        return session.run(pipeline_names=[pipeline] if pipeline else None)


def test_ingest_pipeline_writes_versioned_outputs(project_copy):
    run_session(project_copy, pipeline="ingest_cifar")
    versions = list((project_copy / "data/02_intermediate/image_index.parquet").iterdir())
    assert len(versions) == 1
    index = pd.read_parquet(versions[0] / "image_index.parquet")
    assert len(index) == 6_000 and set(index.split) == {"train", "test"}
    assert (project_copy / "data/02_intermediate/train_images.pt").is_dir()


def test_bad_source_path_fails_before_writing_anything(project_copy):
    with pytest.raises(Exception, match="not found"):
        run_session(
            project_copy,
            pipeline="ingest_cifar",
            runtime_params={"ingest_cifar": {"source": {"path": "data/01_raw/missing.zip"}}},
        )
    assert not (project_copy / "data/02_intermediate/image_index.parquet").exists()
    assert not (project_copy / "data/02_intermediate/train_images.pt").exists()
