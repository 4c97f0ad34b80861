"""Whole-project runs through a Kedro session, on a copy of the project in a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from best_minibatch.metrics.scoring import METRICS
from tests.conftest import copy_project, run_session


def newest(folder: Path) -> Path:
    """The newest version's file of a versioned dataset folder."""
    version = sorted(folder.iterdir())[-1]
    return version / folder.name


@pytest.fixture
def project_copy(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    return copy_project(tmp_path / "project")


def test_ingest_pipeline_writes_versioned_outputs(project_copy):
    run_session(project_copy, pipeline="ingest_cifar")
    index = pd.read_parquet(newest(project_copy / "data/02_intermediate/image_index.parquet"))
    assert len(index) == 6_000 and set(index.split) == {"train", "test"}
    assert (project_copy / "data/02_intermediate/train_images.pt").is_dir()


def test_bad_source_path_fails_before_writing_anything(project_copy):
    with pytest.raises(Exception, match="not found"):
        run_session(
            project_copy,
            pipeline="ingest_cifar",
            runtime_params={"ingest_cifar": {"source": {"path": "data/01_raw/missing.zip"}}},
        )
    assert not (project_copy / "data/02_intermediate").exists() or not any(
        (project_copy / "data/02_intermediate").iterdir()
    )


@pytest.mark.slow
def test_default_run_produces_every_ordering_and_the_report(finished_project):
    data = finished_project / "data"
    for ordering in METRICS:
        status = json.loads(newest(data / f"04_feature/{ordering}/metric_status.json").read_text())
        distances = pd.read_parquet(newest(data / f"07_model_output/{ordering}/gradient_distances.parquet"))
        if status["status"] == "skipped":
            assert ordering == "perceptual" and distances.empty  # no LPIPS weights on this machine
            continue
        # 5,000 sample images in batches of 100, one epoch per phase in the quick run, once per seed.
        seeds = yaml.safe_load((finished_project / "conf/base/parameters_gradient_training.yml").read_text())[
            "gradient_training"]["seeds"]
        assert len(distances) == len(seeds) * 3 * 50 and sorted(distances.seed.unique()) == sorted(seeds)
        assert distances.distance.gt(0).all() and distances.cosine_similarity.between(-1, 1).all()
        assert sorted(distances.phase.unique()) == [1, 2, 3]
    verdicts = pd.read_parquet(newest(data / "08_reporting/analysis/claim_verdicts.parquet"))
    assert {"supported", "contradicted", "undecided"} & set(verdicts.verdict)
    report = newest(data / "08_reporting/report.html").read_text()  # versioned: report.html/<timestamp>/report.html
    for ordering in METRICS:
        assert ordering in report
    assert "skipped" in report
