"""``score_metrics`` and ``sort_batches`` run through Kedro on the real sample, in memory (nothing written to data/)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.json import JSONDataset
from kedro_datasets.pandas import ParquetDataset

from best_minibatch import settings
from best_minibatch.metrics.scoring import METRICS, score_images
from best_minibatch.pipelines.score_metrics import create_pipeline as create_score_metrics
from best_minibatch.pipelines.sort_batches import create_pipeline as create_sort_batches

CONF = Path(__file__).resolve().parents[2] / "conf"


def project_config(env: str = "local"):
    return OmegaConfigLoader(conf_source=str(CONF), env=env, **{
        key: value for key, value in settings.CONFIG_LOADER_ARGS.items() if key != "default_run_env"
    })


class KeptMemoryDataset(MemoryDataset):
    """A MemoryDataset the runner cannot empty: intermediate tables stay loadable after the run."""

    def _release(self) -> None:
        pass


def in_memory_catalog(dataset, parameters) -> DataCatalog:
    datasets = {
        "train_images": MemoryDataset(dataset.images["train"]),
        "image_index": MemoryDataset(dataset.index),
        "params:score_metrics": MemoryDataset(parameters["score_metrics"]),
        "params:sort_batches": MemoryDataset(parameters["sort_batches"]),
    }
    datasets.update({f"{metric}.image_scores": KeptMemoryDataset() for metric in METRICS})
    return DataCatalog(datasets)


@pytest.fixture
def no_cached_alexnet(tmp_path, monkeypatch):
    """No source has the AlexNet weights: torchvision's file and the converted one both live under TORCH_HOME."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def test_both_pipelines_run_every_ordering_with_perceptual_skipped_without_weights(
    sample_dataset, no_cached_alexnet, caplog
):
    parameters = project_config()["parameters"]  # the project's own base parameters
    catalog = in_memory_catalog(sample_dataset, parameters)
    with caplog.at_level(logging.INFO):
        SequentialRunner().run(create_score_metrics() + create_sort_batches(), catalog)
    project_warnings = [r for r in caplog.records
                        if r.name.startswith("best_minibatch") and r.levelno >= logging.WARNING]
    assert len(project_warnings) == 1 and "SKIPPED" in project_warnings[0].getMessage()  # one loud warning

    batchings = parameters["sort_batches"]["control_batchings"]
    for metric, stratified in ((m, s) for m in METRICS for s in (False, True)):
        ordering = f"{metric}_stratified" if stratified else metric
        status = catalog.load(f"{metric}.metric_status")
        assignments = catalog.load(f"{ordering}.batch_assignments")
        summary = catalog.load(f"{ordering}.batch_summary")
        if metric == "perceptual":
            assert status["status"] == "skipped" and "make weights" in status["reason"]
            assert len(catalog.load("perceptual.image_scores")) == 0
            assert len(assignments) == 0 and len(summary) == 0
            assert "class_count_airplane" in summary.columns
        else:
            assert status == {"metric": metric, "status": "ok", "reason": None}
            assert len(catalog.load(f"{metric}.image_scores")) == 5000
            # 5,000 sample images / batch_size 100; the random control one batching per seed
            assert len(summary) == 50 * (batchings if metric == "random" else 1)
            assert (assignments.groupby(["batching", "batch"]).size() == 100).all()
            for _, batching in assignments.groupby("batching"):
                assert batching["image_id"].is_unique
            if stratified:  # 100 = 10 x 10: every batch 10 images of each class
                assert (summary.filter(like="class_count_").to_numpy() == 10).all()

    combined = catalog.load("metric_scores")
    assert len(combined) == 5000 and combined["image_id"].is_unique
    assert combined["perceptual"].isna().all()
    assert combined.drop(columns="perceptual").notna().all().all()


def test_one_namespace_runs_on_its_own(sample_dataset):
    parameters = project_config()["parameters"]
    catalog = in_memory_catalog(sample_dataset, parameters)
    # edges is compared with the metrics registered before it: their tables of an earlier run.
    ids = sample_dataset.index.query("split == 'train'").sort_values("row")["image_id"].to_numpy()
    for earlier in ("intensity", "color"):
        scores, _ = score_images(earlier, sample_dataset.images["train"].numpy(), ids, {})
        catalog.save(f"{earlier}.image_scores", scores)
    pipeline = (create_score_metrics() + create_sort_batches()).only_nodes_with_namespaces(["edges"])
    assert {node.name for node in pipeline.nodes} == {"edges.score_images", "edges.sort_into_batches"}
    assert {"intensity.image_scores", "color.image_scores"} <= pipeline.inputs()
    outputs = SequentialRunner().run(pipeline, catalog)
    assert set(outputs) == {"edges.metric_status", "edges.batch_assignments", "edges.batch_summary"}
    assert len(catalog.load("edges.batch_summary")) == 50


def test_each_metric_reads_the_score_tables_of_the_metrics_registered_before_it():
    names = list(METRICS)
    for node in create_score_metrics().nodes:
        if node.name.endswith(".score_images"):
            metric = node.name.split(".")[0]
            earlier = names[:names.index(metric)]
            assert node.inputs == ["train_images", "image_index", "params:score_metrics",
                                   *(f"{e}.image_scores" for e in earlier)]


def test_catalog_factories_give_every_metric_its_own_versioned_files():
    catalog = DataCatalog.from_config(project_config()["catalog"])
    for metric in METRICS:
        expected = {
            "image_scores": ("04_feature", ParquetDataset, "parquet"),
            "metric_status": ("04_feature", JSONDataset, "json"),
            "batch_assignments": ("05_model_input", ParquetDataset, "parquet"),
            "batch_summary": ("05_model_input", ParquetDataset, "parquet"),
        }
        for kind, (folder, dataset_type, suffix) in expected.items():
            dataset = catalog.get(f"{metric}.{kind}")
            assert isinstance(dataset, dataset_type)
            described = dataset._describe()
            assert str(described["filepath"]).endswith(f"data/{folder}/{metric}/{kind}.{suffix}")
            assert described["version"] is not None  # versioned


def test_paper_environment_is_strict_about_lpips_and_uses_batches_of_256():
    base = project_config()["parameters"]
    paper = project_config("paper")["parameters"]
    assert base["score_metrics"]["perceptual"]["strict"] is False
    assert base["sort_batches"]["batch_size"] == 100
    assert paper["score_metrics"]["perceptual"]["strict"] is True
    assert paper["sort_batches"]["batch_size"] == 256
    # Soft merge: the paper environment keeps every other base option.
    assert paper["score_metrics"]["edges"] == base["score_metrics"]["edges"]
    assert paper["score_metrics"]["perceptual"]["upsample_to"] == base["score_metrics"]["perceptual"]["upsample_to"]
