"""Tests of ``best_minibatch.analysis.figures``: panels and axes per phase count, shared scales, real PNG and PDF files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from kedro.io import DataCatalog
from matplotlib.collections import PolyCollection
from matplotlib.patches import Rectangle

from best_minibatch.analysis import figures
from best_minibatch.analysis import statistics as analysis
from tests.test_analysis import run_analysis, synthetic_run

ORDERINGS = ("intensity", "edges", "perceptual", "random")
CONF = Path(__file__).resolve().parents[1] / "conf" / "base"


@pytest.fixture(scope="module", params=[3, 2], ids=["3 phases", "2 phases"])
def analysed(request):
    """A small synthetic run with 3 or 2 learning-rate phases, analysed."""
    n_phases = request.param
    run = synthetic_run(orderings=ORDERINGS, phase_lengths=(2,) * n_phases,
                        learning_rates=(0.1, 0.01, 0.001)[:n_phases], n_batches=12, batch_size=9)
    result = run_analysis(run, n_permutations=500)
    result["best_worst"] = analysis.best_and_worst_batches(result["batch_stats"], 2)
    return n_phases, run, result


def test_heatmap_has_a_panel_per_phase_in_two_rows_with_one_scale_and_colour_bar_each(analysed):
    n_phases, _, result = analysed
    figure = figures.distance_heatmap(result["noise_units"], "intensity", "random")
    assert len(figure.axes) == 2 * n_phases + 2  # distance and noise-unit rows, a colour bar each
    distance_panels, noise_panels = figure.axes[:n_phases], figure.axes[n_phases : 2 * n_phases]
    colorbars = figure.axes[2 * n_phases :]
    for panels in (distance_panels, noise_panels):
        assert len({a.get_images()[0].get_clim() for a in panels}) == 1  # one scale across phases
        assert all(a.get_xlabel() == "batch index (ascending intensity)" for a in panels)
        assert panels[0].get_ylabel() == "epoch"
        assert all(a.get_images()[0].get_cmap().name == figures.DISTANCE_CMAP for a in panels)
    assert distance_panels[0].get_title() == "Phase 1: epochs 1–2, lr 0.1: distance"
    assert noise_panels[-1].get_title().endswith("distance in noise units")
    assert distance_panels[0].get_images()[0].get_array().shape == (2, 12)  # epochs x batches
    raw = result["noise_units"].query("ordering == 'intensity' and epoch == 1").sort_values("batch")
    np.testing.assert_allclose(distance_panels[0].get_images()[0].get_array()[0], raw["distance"])
    np.testing.assert_allclose(noise_panels[0].get_images()[0].get_array()[0], raw["noise_z"])
    assert "‖g_k − g_full‖" in colorbars[0].get_ylabel() and "random batches" in colorbars[1].get_ylabel()
    assert any(np.allclose(line.get_ydata(), 0.0) for line in colorbars[1].get_lines())  # random-batch level


def test_heatmaps_cover_every_ordering_with_distances_including_random(analysed):
    _, _, result = analysed
    drawn = figures.distance_heatmaps(result["noise_units"], ORDERINGS, "random")
    assert list(drawn) == ["heatmap_intensity", "heatmap_edges", "heatmap_random"]
    assert drawn["heatmap_random"].axes[0].get_xlabel() == "batch index (random assignment)"
    with pytest.raises(ValueError, match="No distance rows for ordering 'perceptual'"):
        figures.distance_heatmap(result["noise_units"], "perceptual", "random")


def test_distance_by_rank_has_two_rows_of_phases_with_the_random_band_behind(analysed):
    n_phases, _, result = analysed
    figure = figures.distance_by_rank(result["batch_stats"], ORDERINGS, "random")
    assert len(figure.axes) == 2 * n_phases
    for axis in figure.axes:
        metric_lines = [line for line in axis.get_lines() if len(line.get_xdata()) == 12]
        assert len(metric_lines) == 2  # intensity and edges; perceptual was skipped
        bands = [p for p in axis.patches if isinstance(p, Rectangle)]
        bands += [c for c in axis.collections if isinstance(c, PolyCollection)]
        assert len(bands) == 3  # the random ordering's band and the two tints of the extremes
        assert min(p.get_zorder() for p in bands) < min(line.get_zorder() for line in metric_lines)
    assert len(figure.legends) == 1
    labels = [t.get_text() for t in figure.legends[0].get_texts()]
    assert labels == ["random batches: 95% range", "random batches: mean", "intensity", "edges"]


def test_batch_image_grid_shows_best_and_worst_batch_and_class_mix_per_phase(analysed):
    n_phases, run, result = analysed
    tables = run["orderings"]["edges"]
    figure = figures.batch_image_grid("edges", result["best_worst"], tables["batch_assignments"],
                                      run["train_images"].numpy(), run["image_index"])
    assert len(figure.axes) == 4 * n_phases
    best = result["best_worst"].query("ordering == 'edges' and phase == 1 and kind == 'best' and rank == 1")
    image_axis, mix_axis = figure.axes[0], figure.axes[1]
    assert f"batch {int(best['batch'].iloc[0])}" in image_axis.get_title()
    montage = image_axis.get_images()[0].get_array()
    assert montage.shape == (3 * 8 + 2, 3 * 8 + 2, 3)  # nine 8x8 images in a 3x3 grid, 1-pixel gaps
    assert sum(bar.get_width() for bar in mix_axis.patches) == 9
    assert [t.get_text() for t in mix_axis.get_yticklabels()] == ["airplane", "automobile", "bird", "cat"]


def test_batch_montage_places_images_in_rows_with_white_gaps():
    images = np.stack([np.full((2, 2, 3), i, np.uint8) for i in range(5)])
    montage = figures.batch_montage(images)
    assert montage.shape == (5, 8, 3)  # 3 columns, 2 rows
    assert montage[0, 2, 0] == 255 and montage[0, 3, 0] == 1  # a white gap, then image 1
    assert montage[2, 0, 0] == 255 and montage[3, 0, 0] == 3  # image 3 starts the second row
    assert (montage[3:, 6:] == 255).all()  # the sixth cell is empty


def test_training_curves_have_loss_and_accuracy_with_phase_boundaries(analysed):
    n_phases, run, _ = analysed
    histories = {o: t["training_history"] for o, t in run["orderings"].items()}
    figure = figures.training_curves(histories, "random")
    assert len(figure.axes) == 2
    for axis in figure.axes:
        boundaries = [line for line in axis.get_lines() if len(set(line.get_xdata())) == 1]
        assert len(boundaries) == n_phases - 1
        assert len(axis.get_lines()) - len(boundaries) == 2 * 3  # train and test of 3 orderings
    assert figure.axes[0].get_ylabel() == "cross-entropy loss"


def test_catalog_entries_write_real_png_and_pdf_files(tmp_path):
    """The figure datasets as configured: each file holds the format its name says."""
    run = synthetic_run(orderings=("edges", "random"), phase_lengths=(2,), learning_rates=(0.1,), n_batches=4)
    config = yaml.safe_load((CONF / "catalog_visualize.yml").read_text(encoding="utf-8"))
    config = {name: {**entry, "filepath": str(tmp_path / entry["filepath"])}
              for name, entry in config.items() if name.startswith("figures_training_curves_")
              and "filepath" in entry}
    catalog = DataCatalog.from_config(config)
    histories = {o: t["training_history"] for o, t in run["orderings"].items()}
    figure = figures.training_curves(histories, "random")
    catalog.save("figures_training_curves_png", {"training_curves.png": figure})
    catalog.save("figures_training_curves_pdf", {"training_curves.pdf": figure})
    (png,) = tmp_path.rglob("training_curves.png")
    (pdf,) = tmp_path.rglob("training_curves.pdf")
    assert png.read_bytes().startswith(b"\x89PNG")
    assert pdf.read_bytes().startswith(b"%PDF")
    assert figures.png_bytes(figure, dpi=30).startswith(b"\x89PNG")
