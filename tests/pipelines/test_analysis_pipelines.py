"""``distance_analysis`` and ``visualize`` run end to end through Kedro on synthetic inputs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from matplotlib.figure import Figure

from best_minibatch.analysis.statistics import DEFAULT_PARAMETERS
from best_minibatch.batches.orderings import all_orderings
from best_minibatch.pipelines.distance_analysis import create_pipeline as create_analysis
from best_minibatch.pipelines.orderings import METRIC_KINDS, dataset_name
from best_minibatch.pipelines.visualize import create_pipeline as create_visualize
from best_minibatch.pipelines.visualize.pipeline import FIGURE_GROUPS
from tests.test_analysis import SKIP_REASON, planted_effects, synthetic_run

CONF = Path(__file__).resolve().parents[2] / "conf" / "base"
ANALYSIS_TABLES = ("ordering_status", "distance_noise_units", "batch_phase_stats", "batch_phase_stats_by_seed",
                   "batch_group_comparisons", "batch_group_comparisons_by_seed", "claim_verdicts",
                   "confound_correlations", "position_effects", "best_worst_batches", "gradient_noise_trace_check")
KINDS = ("gradient_distances", "training_history", "batch_summary", "metric_status", "batch_assignments",
         "null_distances")


def project_catalog_config(tmp_path: Path) -> dict:
    """This project's catalog entries of both pipelines, with every file under ``tmp_path``."""
    config = {}
    for name in ("catalog_distance_analysis.yml", "catalog_visualize.yml"):
        config.update(yaml.safe_load((CONF / name).read_text(encoding="utf-8")))
    # The report reads batch_selection's fragment (read as nothing until that pipeline has run).
    selection = yaml.safe_load((CONF / "catalog_batch_selection.yml").read_text(encoding="utf-8"))
    config["batch_selection.report_fragment_html"] = selection["batch_selection.report_fragment_html"]
    for entry in config.values():
        for dataset in (entry, entry.get("dataset") if isinstance(entry.get("dataset"), dict) else {}):
            if "filepath" in dataset:
                dataset["filepath"] = str(tmp_path / dataset["filepath"])
    return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Both pipelines on every ordering, plain and stratified (perceptual skipped), through SequentialRunner.

    The catalog is the project's own (versioned Parquet tables, the HTML report) moved
    under a temporary folder; the figures stay in memory, since rendering every one as
    PNG and PDF would take most of a minute (test_figures writes real files).
    """
    tmp_path = tmp_path_factory.mktemp("analysis_run")
    orderings = list(all_orderings())
    run = synthetic_run(orderings=orderings, effects=planted_effects(n_batches=20), seed=3,
                        phase_lengths=(2, 2), learning_rates=(0.1, 0.01), n_batches=20, seeds=(0, 1),
                        skipped=("perceptual", "perceptual_stratified"))
    analysis_params = {**DEFAULT_PARAMETERS, "n_permutations": 2000, "n_bootstrap": 300}
    visualize_params = {"report_title": "Test report", "report_png_dpi": 30}
    catalog = DataCatalog.from_config(project_catalog_config(tmp_path))
    inputs = {
        "train_images": run["train_images"],
        "image_index": run["image_index"],
        "params:distance_analysis": analysis_params,
        "params:visualize": visualize_params,
        "parameters": {"distance_analysis": analysis_params, "visualize": visualize_params},
    }
    for ordering in orderings:
        for kind in KINDS:  # a metric's own datasets (its status) are read by both of its orderings
            inputs[dataset_name(ordering, kind)] = run["orderings"][ordering if kind not in METRIC_KINDS
                                                                   else ordering.removesuffix("_stratified")][kind]
    for name, data in inputs.items():
        catalog[name] = MemoryDataset(data)
    for group in FIGURE_GROUPS:
        for fmt in ("png", "pdf"):
            catalog[f"figures_{group}_{fmt}"] = MemoryDataset(copy_mode="assign")
    pipeline = create_analysis() + create_visualize()
    SequentialRunner().run(pipeline, catalog)
    return tmp_path, catalog, orderings


def test_pipelines_derive_their_inputs_from_the_metric_registry():
    inputs = create_analysis().inputs() | create_visualize().inputs()
    for ordering in all_orderings():
        for kind in KINDS:
            assert dataset_name(ordering, kind) in inputs
    assert "intensity_stratified.metric_status" not in inputs  # the metric's status, shared by its orderings


def test_analysis_tables_come_out_of_the_run(finished_run):
    _, catalog, orderings = finished_run
    status = catalog.load("ordering_status")
    assert list(status["ordering"]) == orderings
    table = catalog.load("claim_verdicts")
    claims = table.set_index(["claim_id", "ordering", "phase"])["test_verdict"]
    assert claims[("first_phase_upper_quartile_closest", "intensity", 1)] == "supported"
    assert claims[("first_phase_color_extremes_better", "color", 1)] == "contradicted"
    assert claims[("later_phases_extremes_worse", "edges", 2)] == "supported"
    assert claims[("first_phase_edges_middle_better", "edges", 1)] == "undecided"
    assert claims[("later_phases_extremes_worse", "perceptual", 2)] == f"not tested (metric skipped: {SKIP_REASON})"
    # the final reading is the test's unless the ordering's control itself got a verdict (here the random
    # control's extremes in phase 2 of seed 0 happen to sit low: the gate closes for that claim and phase)
    tested = table[table["test_verdict"].isin(["supported", "contradicted", "undecided"])]
    gated = tested["control_verdict"].isin(["supported", "contradicted"])
    assert (tested.loc[gated, "verdict"] == "invalid: control fails").all()
    assert (tested.loc[~gated, "verdict"] == tested.loc[~gated, "test_verdict"]).all()
    assert set(tested["control"]) == {"random", "random_stratified"}
    trace = catalog.load("gradient_noise_trace_check")
    assert set(trace["status"]) == {"not measured"} and len(trace) == 4 * 2  # epochs x seeds
    assert set(catalog.load("distance_noise_units")["seed"]) == {0, 1}
    assert (catalog.load("batch_phase_stats")["n_seeds"] == 2).all()
    by_seed = catalog.load("batch_group_comparisons_by_seed")
    assert set(by_seed["seed"]) == {0, 1} and len(by_seed) == 2 * len(catalog.load("batch_group_comparisons"))
    tested = catalog.load("claim_verdicts").dropna(subset=["n_seeds"])
    assert (tested["n_seeds"] == 2).all()
    for name in ("distance_noise_units", "batch_phase_stats", "batch_group_comparisons",
                 "confound_correlations", "best_worst_batches"):
        table = catalog.load(name)
        assert isinstance(table, pd.DataFrame) and len(table) > 0
        assert "perceptual" not in set(table["ordering"])


def test_analysis_tables_are_versioned_parquet_files(finished_run):
    tmp_path, _, _ = finished_run
    folder = tmp_path / "data" / "08_reporting" / "analysis"
    written = sorted(p.name for p in folder.glob("*.parquet/*/*.parquet"))
    assert written == sorted(f"{name}.parquet" for name in ANALYSIS_TABLES)


def test_every_present_ordering_gets_its_figures_in_png_and_pdf(finished_run):
    _, catalog, orderings = finished_run
    present = [o for o in orderings if not o.startswith("perceptual")]
    stems = set()
    for group in FIGURE_GROUPS:
        png, pdf = catalog.load(f"figures_{group}_png"), catalog.load(f"figures_{group}_pdf")
        assert all(isinstance(f, Figure) for f in png.values())
        assert [k.removesuffix(".png") for k in png] == [k.removesuffix(".pdf") for k in pdf]
        stems |= {k.removesuffix(".png") for k in png}
    expected = {f"heatmap_{o}" for o in present}
    expected |= {f"batches_{o}" for o in present} | {"seed_spread", "distance_by_rank", "training_curves"}
    assert stems == expected


def test_report_is_written_and_lists_every_ordering(finished_run):
    tmp_path, _, orderings = finished_run
    versions = list((tmp_path / "data" / "08_reporting" / "report.html").glob("*/report.html"))  # versioned
    assert len(versions) == 1
    page = versions[0].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<title>Test report</title>" in page
    for ordering in orderings:
        assert f"<td>{ordering}</td>" in page
    assert SKIP_REASON in page
    # heat maps and batch images of the 8 orderings with distances (perceptual skipped, plain and stratified),
    # spread, rank, curves
    assert page.count("data:image/png;base64,") == 8 + 8 + 3
    assert "2 seeds (0, 1)" in page
    assert "http://" not in page and "https://" not in page
