"""The ``batch_selection`` pipeline end to end on a tiny configuration, through SequentialRunner in memory."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from best_minibatch import selection as S
from best_minibatch.metrics.scoring import METRICS, score_images
from best_minibatch.pipelines.batch_selection import create_pipeline
from best_minibatch.services.run_manifest import COMPLETED, Entry, Manifest, ManifestStore

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TRAIN_PER_CLASS, TEST_PER_CLASS = 40, 10
HISTORY_SECONDS = 2.0

PARAMS = {
    "seeds": [0, 1],
    "policies": list(S.POLICIES),
    "validation": {"fraction": 0.2, "seed": 1},
    "target_validation_accuracy": 0.15,
    "training": {"model": {"name": "small_cnn", "small_cnn": {"width": 4}},
                 "batch_size": 32, "phases": [{"epochs": 1, "lr": 0.1}, {"epochs": 1, "lr": 0.01}],
                 "evaluations_per_epoch": 1, "eval_batch_size": 200, "device": "cpu", "cpu_threads": 1,
                 "progress_bar": False},
    "learned": {"ordering": "intensity", "measure": "noise_z_mean", "keep_fraction": 0.25},
    "oracle": {"keep_fraction": 0.25},
}


def subset(dataset, split: str, per_class: int) -> tuple[pd.DataFrame, torch.Tensor]:
    """The first ``per_class`` images of every class of ``split``, re-indexed from row 0."""
    index = dataset.index.loc[dataset.index["split"] == split].sort_values("row")
    chosen = index.groupby("label", sort=True).head(per_class).sort_values("row")
    images = dataset.images[split][torch.from_numpy(chosen["row"].to_numpy().copy())]
    chosen = chosen.assign(row=np.arange(len(chosen)))
    return chosen.reset_index(drop=True), images


@pytest.fixture(scope="module")
def inputs(sample_dataset):
    train_index, train_images = subset(sample_dataset, "train", TRAIN_PER_CLASS)
    test_index, test_images = subset(sample_dataset, "test", TEST_PER_CLASS)
    train_index["image_id"] = np.arange(len(train_index))
    test_index["image_id"] = len(train_index) + np.arange(len(test_index))
    image_index = pd.concat([train_index, test_index], ignore_index=True)
    datasets = {"image_index": image_index, "train_images": train_images, "test_images": test_images}
    ids = train_index["image_id"].to_numpy()
    for name in METRICS:
        if name == "perceptual":  # as on a machine without the AlexNet weights
            scores = METRICS[name].empty_scores()
            status = {"metric": name, "status": "skipped", "reason": "AlexNet weights not found"}
        else:
            scores, status = score_images(name, train_images.numpy(), ids, {})
        datasets[f"{name}.image_scores"] = scores
        datasets[f"{name}.metric_status"] = status
        # gradient_training's per-epoch seconds (empty for a skipped metric): learned's up-front cost
        seconds = [] if name == "perceptual" else [HISTORY_SECONDS, HISTORY_SECONDS + 1.0]
        datasets[f"{name}.training_history"] = pd.DataFrame({"ordering": name, "seed": range(len(seconds)),
                                                             "seconds": seconds})
    # distance_analysis' batch table, as computed on 8 batches of all training images; planted so
    # that intensity's batches nearest the middle are closest in phase 1 and the lowest in phase 2.
    rows = []
    for ordering in ("intensity", "color", "edges", "random"):
        for phase in (1, 2):
            for batch in range(8):
                position = (batch + 0.5) / 8
                rows.append({"ordering": ordering, "phase": phase, "batch": batch, "batch_position": position,
                             "noise_z_mean": abs(position - 0.5) if phase == 1 else position})
    datasets["batch_phase_stats"] = pd.DataFrame(rows)
    return datasets


def project_catalog(folder: Path) -> DataCatalog:
    """The project's batch_selection catalog (versioned Parquet, text, figures) moved under ``folder``."""
    config = yaml.safe_load((PROJECT_ROOT / "conf" / "base" / "catalog_batch_selection.yml").read_text())
    for entry in config.values():
        inner = entry.get("dataset", entry)  # OptionalDataset wraps the file's dataset
        inner["filepath"] = str(folder / inner["filepath"])
    return DataCatalog.from_config(config)


def run_pipeline(inputs: dict, params: dict, folder: Path) -> DataCatalog:
    catalog = project_catalog(folder)
    for name, value in inputs.items():
        catalog[name] = MemoryDataset(value)
    catalog["params:batch_selection"] = MemoryDataset(params)
    catalog["params:training"] = MemoryDataset({})  # the shared recipe's defaults; PARAMS overrides them
    catalog["params:sort_batches"] = MemoryDataset({"batch_size": 32, "tie_seed": 0})
    SequentialRunner().run(create_pipeline(), catalog)
    return catalog


def test_pipeline_runs_every_policy_and_reports(inputs, tmp_path):
    catalog = run_pipeline(inputs, PARAMS, tmp_path)
    load = lambda name: catalog[f"batch_selection.{name}"].load()  # noqa: E731

    split = load("validation_split")
    validation_ids = split.loc[split["subset"] == "validation", "image_id"].to_numpy()
    assert len(validation_ids) == 10 * round(0.2 * TRAIN_PER_CLASS)
    pools = load("batch_pools")
    assert set(pools["policy"]) == {"fixed_random", "paper_advice", "learned"}
    assert not np.isin(np.concatenate(pools["image_ids"].to_list()), validation_ids).any()
    # perceptual was skipped: the paper's advice uses intensity alone in phase 1, and the notes say so.
    assert set(pools.loc[(pools["policy"] == "paper_advice") & (pools["phase"] == 1), "source_ordering"]) == {"intensity"}
    assert any("perceptual" in note for note in load("notes"))

    results = load("run_results")
    steps_per_epoch = (10 * TRAIN_PER_CLASS - len(validation_ids)) // 32
    assert len(results) == 2 * len(S.POLICIES)
    assert (results["steps"] == 2 * steps_per_epoch).all()
    assert (results.loc[results["policy"] == "oracle", "probe_passes"] == 2 * steps_per_epoch).all()
    assert (results.loc[results["policy"] != "oracle", "probe_passes"] == 0).all()
    curves = load("learning_curves")
    assert len(curves) == 2 * len(S.POLICIES) * 3  # the start and one evaluation per epoch
    # Equal compute: learned is charged the seconds of intensity's gradient_training run, nobody else anything
    # up front; the oracle's probing is its selection time.
    by_policy = results.set_index(["policy", "seed"])
    assert (by_policy.loc["learned", "upfront_seconds"] == 2 * HISTORY_SECONDS + 1.0).all()
    assert (results.loc[results["policy"] != "learned", "upfront_seconds"] == 0).all()
    np.testing.assert_allclose(results["total_seconds"], results["seconds"] + results["upfront_seconds"])
    np.testing.assert_allclose(results["selection_seconds"], results["probe_seconds"] + results["upfront_seconds"])
    assert (curves.loc[(curves["policy"] == "learned") & (curves["step"] == 0), "total_seconds"] == 5.0).all()

    # The control trains per phase on as many random-ordering batches as learned keeps (2 of the 10).
    learned_counts = pools.loc[pools["policy"] == "learned"].groupby("phase").size()
    assert S.kept_count(0.25, steps_per_epoch) == 2 and (learned_counts == 2).all()
    distinct = results.groupby("policy")["distinct_images_trained"].max()
    assert distinct["random_subset"] <= 2 * 2 * 32 < distinct["shuffle"]

    summary = load("summary")
    assert list(summary["policy"]) == list(S.POLICIES)
    compared = summary.loc[summary["control_verdict"] != "", "policy"]
    assert list(compared) == ["paper_advice", "learned", "oracle"]
    assert summary.loc[summary["policy"].isin(compared), "val_auc_ctrl_p_holm"].notna().all()
    assert summary.loc[summary["policy"] == "shuffle", "verdict"].item() == "baseline"
    assert summary.loc[summary["policy"] != "shuffle", "test"].eq("paired t-test").all()
    assert summary.loc[summary["policy"] != "shuffle", "wallclock_verdict"].isin(
        ["faster", "slower", "no detectable difference"]).all()
    curve_summary = load("curve_summary")
    assert set(curve_summary["policy"]) == set(S.POLICIES) and (curve_summary["n_seeds"] == 2).all()

    markdown, html = load("report_fragment_md"), load("report_fragment_html")
    for policy in S.POLICIES:
        assert policy in markdown and policy in html
    assert "**Answer.**" in markdown and "data:image/png;base64," in html
    assert "against the random_subset control: " in markdown and "Against the random_subset control" in html
    reporting = tmp_path / "data" / "08_reporting" / "batch_selection"
    png = list((reporting / "convergence.png").glob("*/convergence.png"))
    pdf = list((reporting / "convergence.pdf").glob("*/convergence.pdf"))
    assert len(png) == len(pdf) == 1
    assert png[0].read_bytes().startswith(b"\x89PNG") and pdf[0].read_bytes().startswith(b"%PDF")
    for table in ("learning_curves", "run_results", "curve_summary", "summary"):
        assert len(list((reporting / f"{table}.parquet").glob(f"*/{table}.parquet"))) == 1


def test_pipeline_rejects_bad_parameters_before_any_output(inputs, tmp_path):
    bad = {**PARAMS, "training": {**PARAMS["training"], "batch_size": 1}}
    with pytest.raises(Exception, match="batch_selection.training.batch_size"):
        run_pipeline(inputs, bad, tmp_path)
    assert not (tmp_path / "data").exists()


def test_learned_policy_needs_an_analysed_ordering(inputs, tmp_path):
    bad = {**PARAMS, "learned": {**PARAMS["learned"], "ordering": "perceptual"}}
    with pytest.raises(Exception, match="learned.ordering"):
        run_pipeline(inputs, bad, tmp_path)
    assert not (tmp_path / "data").exists()


def test_batch_selection_is_registered_but_not_in_the_default_run():
    from kedro.framework.project import pipelines
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(PROJECT_ROOT)
    assert "batch_selection" in pipelines
    default_nodes = {n.name for n in pipelines["__default__"].nodes}
    assert not any(name.startswith("batch_selection.") for name in default_nodes)


def test_the_pipeline_reads_the_plain_metric_orderings_only():
    """Each metric's own order is re-cut on the training images; derived orderings of other pipelines (several
    random batchings, class-stratified variants) are no input of this experiment."""
    inputs = create_pipeline().inputs()
    for kind in ("image_scores", "metric_status", "training_history"):
        assert {name.split(".")[0] for name in inputs if name.endswith(f".{kind}")} == set(METRICS)


def page_script():
    spec = importlib.util.spec_from_file_location("selection_page", PROJECT_ROOT / "scripts" / "selection_page.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_results_page_script_writes_the_page_from_a_runs_outputs(inputs, tmp_path):
    """scripts/selection_page.py on a tiny base run's real outputs, found through a run manifest as a project run
    records them: the page holds the setup, figure, table at equal steps and wall-clock, and the answers."""
    params = {**PARAMS, "seeds": [0, 1, 2], "policies": ["shuffle", "class_balanced", "class_balanced_fixed",
                                                         "fixed_random", "learned", "oracle"]}
    catalog = run_pipeline(inputs, params, tmp_path)
    datasets = {}
    for name in catalog.keys():
        if not name.startswith("batch_selection."):
            continue
        dataset = catalog[name]
        inner = getattr(dataset, "_dataset", dataset)  # OptionalDataset wraps the file's dataset
        path = Path(inner._filepath)
        (version,) = [folder.name for folder in path.iterdir()]
        datasets[name] = Entry(version, "run-1", path.relative_to(tmp_path).as_posix())
    manifest = Manifest(run_id="run-1", status=COMPLETED, command="kedro run --pipelines=batch_selection",
                        started="2026-01-01T10:00:00+00:00", finished="2026-01-01T10:30:00+00:00",
                        parameters={"batch_selection": params, "training": {}, "sort_batches": {"batch_size": 32}},
                        outputs=sorted(datasets), datasets=datasets)
    ManifestStore(tmp_path / "data" / "runs" / "run_manifest.json").write(manifest)
    script = page_script()
    page = tmp_path / "docs" / "page.md"
    script.main(["--env", "base", "--project-root", str(tmp_path), "--page", str(page)])

    text = page.read_text()
    summary = pd.read_parquet(tmp_path / datasets["batch_selection.summary"].path / datasets[
        "batch_selection.summary"].version / "summary.parquet")
    assert "Run `run-1`" in text and "0.50 h end to end" in text and "3 seeds" in text
    assert (page.parent / "page" / "convergence.png").read_bytes().startswith(b"\x89PNG")
    assert "](page/convergence.png)" in text
    for policy in params["policies"]:
        assert f"\n| {policy} |" in text  # a row of the table
    assert "wall-clock verdict" in text and "seconds / run (selection)" in text
    assert "3 images of each of the 10 classes in every batch, the other 2 from 2 different classes" in text
    assert "learned is charged 5 s up front" in text  # intensity's gradient_training seconds: 2 + 3
    assert S.statistics.answer_sentence(summary) in text
    assert "**Class balancing:** Class balancing" in text and "class_balanced_fixed:" in text
    assert "**The base sample** (base run `run-1`: 320 training images, batches of 32, policies shuffle," in text
    for anchor in ("2307.06440", "2312.05021", "1405.3080"):
        assert anchor in text
    # The hand-written conclusion survives regeneration; everything else is rewritten.
    page.write_text(text.replace("(to be written from the tables above)", "Written by hand."))
    script.main(["--env", "base", "--project-root", str(tmp_path), "--page", str(page)])
    assert "Written by hand." in page.read_text()
    with pytest.raises(SystemExit, match="No completed run of --env full"):
        script.main(["--project-root", str(tmp_path), "--page", str(page)])


def test_the_results_page_quotes_the_measured_base_answer_without_a_base_run(tmp_path):
    sentence, source = page_script().base_answer(ManifestStore(tmp_path / "runs"), tmp_path, None)
    assert source.startswith("the base run measured in docs/batch_selection.md")
    assert sentence.startswith("No: no policy converged faster than shuffle") and "\n" not in sentence
