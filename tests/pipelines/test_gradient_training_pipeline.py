"""``gradient_training`` end to end through Kedro's SequentialRunner, with the project's catalog entries."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from kedro.io import DataCatalog
from kedro.runner import SequentialRunner
from kedro_datasets.partitions import PartitionedDataset

from best_minibatch.batches.orderings import all_orderings
from best_minibatch.gradient_training import DISTANCE_COLUMNS, HISTORY_COLUMNS, seed_model_states
from best_minibatch.kedro_glue.datasets import TensorDataset
from best_minibatch.metrics.scoring import METRICS
from best_minibatch.pipelines.gradient_training import create_pipeline
from best_minibatch.training.models import build_model

CONF = Path(__file__).resolve().parents[2] / "conf" / "base"
NUM_BATCHES, BATCH = 10, 20
SEEDS = [0, 3]


def project_catalog_config(tmp_path: Path) -> dict:
    """This project's gradient_training catalog entries, every path moved under ``tmp_path``."""
    config = yaml.safe_load((CONF / "catalog_gradient_training.yml").read_text(encoding="utf-8"))
    for entry in config.values():
        if "filepath" in entry:
            entry["filepath"] = str(tmp_path / entry["filepath"])
        if "path" in entry:  # the gradients root: a runtime parameter with a default in the YAML
            assert entry["path"] == "${runtime_params:gradients_dir, data/07_model_output/gradients}"
            entry["path"] = str(tmp_path / "gradients")
    return config


TRAINING = {
    "model": {"name": "small_cnn", "small_cnn": {"width": 2}},
    "phases": [{"epochs": 1, "lr": 0.05}, {"epochs": 1, "lr": 0.01}],
    "cpu_threads": 1,
    "progress_bar": False,
}


def params(tmp_path: Path) -> dict:
    return {
        "keep_gradients": "all",
        "spill_dtype": "float32",
        "checkpoint_dir": str(tmp_path / "checkpoints"),
        "gradients_dir": str(tmp_path / "gradients"),
        "seeds": SEEDS,
    }


def run_pipeline(tmp_path: Path, sample_dataset) -> tuple[DataCatalog, list]:
    """gradient_training of intensity and perceptual through the project's catalog; returns the catalog and
    the log records of the run."""
    index = sample_dataset.index
    image_ids = index[index["split"] == "train"]["image_id"].to_numpy()[:: 25][: NUM_BATCHES * BATCH]
    assignments = pd.DataFrame({
        "metric": "intensity",
        "batch": np.repeat(np.arange(NUM_BATCHES), BATCH),
        "position": np.tile(np.arange(BATCH), NUM_BATCHES),
        "image_id": image_ids,
        "metric_value": np.linspace(0, 1, NUM_BATCHES * BATCH),
    })
    pipeline = create_pipeline().only_nodes_with_namespaces(["intensity", "perceptual"])
    catalog = DataCatalog.from_config(project_catalog_config(tmp_path))
    catalog["intensity.batch_assignments"] = assignments
    catalog["perceptual.batch_assignments"] = assignments.iloc[:0]
    catalog["image_index"] = index
    catalog["train_images"] = sample_dataset.images["train"]
    catalog["test_images"] = sample_dataset.images["test"]
    catalog["params:training"] = TRAINING
    catalog["params:gradient_training"] = params(tmp_path)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("best_minibatch")
    logger.addHandler(handler)
    try:
        SequentialRunner().run(pipeline, catalog)
    finally:
        logger.removeHandler(handler)
    return catalog, records


@pytest.fixture(scope="module")
def finished(tmp_path_factory, sample_dataset):
    """intensity (10 batches of 20 real images, seeds 0 and 3) and perceptual (skipped upstream: zero rows)."""
    tmp_path = tmp_path_factory.mktemp("gradient_training_run")
    catalog, _ = run_pipeline(tmp_path, sample_dataset)
    return tmp_path, catalog


def test_one_namespace_per_ordering_with_shared_inputs():
    pipeline = create_pipeline()
    assert {n.namespace for n in pipeline.nodes} == set(all_orderings())  # plain and stratified
    assert {f"{m}.train_with_gradient_probe" for m in all_orderings()} <= {n.name for n in pipeline.nodes}
    assert {"image_index", "train_images", "test_images", "params:training",
            "params:gradient_training"} <= pipeline.inputs()
    assert {f"{m}.gradient_distances" for m in METRICS} <= pipeline.outputs()


@pytest.mark.parametrize("seed", SEEDS)
def test_gradients_are_spilled_per_run_and_match_the_distance_table(finished, seed):
    tmp_path, catalog = finished
    history = catalog.load("intensity.training_history")
    run_name = history.loc[history["seed"] == seed, "run_name"].iloc[0]
    # The way docs/gradient_spill_format.md loads one run's gradients.
    gradients = PartitionedDataset(path=str(tmp_path / "gradients" / run_name / "intensity"),
                                   dataset=TensorDataset, filename_suffix=".pt").load()
    expected_ids = [f"epoch={e:03d}/batch={k:04d}" for e in (1, 2) for k in range(NUM_BATCHES)]
    assert sorted(gradients) == expected_ids
    num_params = sum(p.numel() for p in build_model("small_cnn", width=2).parameters())
    table = catalog.load("intensity.gradient_distances")
    table = table[table["seed"] == seed]
    for epoch in (1, 2):
        rows = torch.stack([gradients[f"epoch={epoch:03d}/batch={k:04d}"]() for k in range(NUM_BATCHES)])
        assert rows.dtype == torch.float32 and rows.shape == (NUM_BATCHES, num_params)
        rows = rows.double()
        full = rows.mean(dim=0)
        got = table[table["epoch"] == epoch].sort_values("batch")
        np.testing.assert_allclose(got["distance"], torch.linalg.vector_norm(rows - full, dim=1), rtol=1e-9)
        np.testing.assert_allclose(got["grad_norm"], torch.linalg.vector_norm(rows, dim=1), rtol=1e-9)
        assert got["full_grad_norm"].iloc[0] == pytest.approx(float(torch.linalg.vector_norm(full)), rel=1e-9)


def test_versioned_outputs_follow_the_contract(finished):
    tmp_path, catalog = finished
    table = catalog.load("intensity.gradient_distances")
    assert list(table.columns) == DISTANCE_COLUMNS and len(table) == len(SEEDS) * 2 * NUM_BATCHES
    assert (table["ordering"] == "intensity").all() and table["phase"].tolist() == ([1] * 10 + [2] * 10) * 2
    assert table["seed"].tolist() == [0] * 20 + [3] * 20
    matrix = catalog.load("intensity.distance_matrix")  # seeds x epochs x batches
    assert matrix.dtype == torch.float64 and matrix.shape == (len(SEEDS), 2, NUM_BATCHES)
    np.testing.assert_array_equal(matrix.numpy().ravel(), table["distance"].to_numpy())
    history = catalog.load("intensity.training_history")
    assert list(history.columns)[:11] == HISTORY_COLUMNS[:11] and len(history) == 2 * len(SEEDS)
    assert history["seed"].tolist() == [0, 0, 3, 3] and history["run_name"].nunique() == 2
    nulls = catalog.load("intensity.null_distances")
    assert "seed" in nulls.columns
    saved = catalog.load("intensity.trained_model")  # one flat dict of tensors, keyed seed=<S>/<key>
    assert all(isinstance(t, torch.Tensor) for t in saved.values()) and "seed=3/0.weight" in saved
    models = seed_model_states(saved)  # {seed: state_dict}
    assert sorted(models) == SEEDS
    for seed in SEEDS:
        model = build_model("small_cnn", width=2)
        model.load_state_dict(models[seed])  # a complete state_dict
    assert not torch.equal(models[0]["0.weight"], models[3]["0.weight"])
    # Versioned: each output sits in a timestamped folder.
    assert len(list((tmp_path / "data/07_model_output/intensity/gradient_distances.parquet").iterdir())) == 1
    for name in ("gradient_distances", "distance_matrix", "training_history"):
        assert catalog.exists(f"intensity.{name}")


def test_skipped_ordering_gets_zero_row_tables(finished):
    tmp_path, catalog = finished
    distances = catalog.load("perceptual.gradient_distances")
    history = catalog.load("perceptual.training_history")
    assert distances.empty and list(distances.columns) == DISTANCE_COLUMNS
    assert history.empty and list(history.columns) == HISTORY_COLUMNS
    assert catalog.load("perceptual.distance_matrix").shape == (0, 0, 0)
    assert catalog.load("perceptual.trained_model") == {}
    assert not list((tmp_path / "gradients").glob("*/perceptual"))
    assert len(list((tmp_path / "gradients").rglob("*.pt"))) == len(SEEDS) * 2 * NUM_BATCHES


def test_a_rerun_reuses_every_ordering_and_seed(finished, sample_dataset):
    """The same command again: each (ordering, seed) run is found by its name and reused, nothing retrained."""
    tmp_path, catalog = finished
    first = catalog.load("intensity.training_history")
    again, records = run_pipeline(tmp_path, sample_dataset)
    messages = [r.getMessage() for r in records]
    for seed in SEEDS:
        run_name = first.loc[first["seed"] == seed, "run_name"].iloc[0]
        label = f"intensity seed {seed}"
        assert any(m.startswith(f"{label}: run '{run_name}' found") and "complete; reusing its results" in m
                   for m in messages), messages
    assert not any(" epoch 1/2 " in m for m in messages)  # no epoch was trained
    # Reused, not retrained: the histories (with their wall-clock seconds) come back unchanged.
    pd.testing.assert_frame_equal(again.load("intensity.training_history"), first, check_exact=True)
    assert len(list((tmp_path / "gradients").rglob("*.pt"))) == len(SEEDS) * 2 * NUM_BATCHES
