"""Nodes of ``visualize``; the figures are drawn by :mod:`best_minibatch.analysis.figures`, the report by
:mod:`best_minibatch.analysis.report`.

Each figure node returns its figures twice, keyed ``<stem>.png`` and
``<stem>.pdf`` (two ``MatplotlibDataset`` entries, each with its ``format``:
the dataset renders into a buffer, so the file name alone would not choose the
format), plus the PNG bytes the report embeds.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure

from best_minibatch.analysis import figures, report
from best_minibatch.analysis.report import VisualizeConfig
from best_minibatch.analysis.statistics import AnalysisConfig
from best_minibatch.pipelines.orderings import by_ordering

FigureOutputs = tuple[dict[str, Figure], dict[str, Figure], dict[str, bytes]]


def _outputs(drawn: dict[str, Figure], params: dict[str, Any]) -> FigureOutputs:
    """``(png-keyed figures, pdf-keyed figures, {stem: PNG bytes for the report})``."""
    dpi = VisualizeConfig.from_params(params).report_png_dpi
    return (
        {f"{stem}.png": figure for stem, figure in drawn.items()},
        {f"{stem}.pdf": figure for stem, figure in drawn.items()},
        {stem: figures.png_bytes(figure, dpi=dpi) for stem, figure in drawn.items()},
    )


def _null(analysis_params: dict[str, Any]) -> str:
    return AnalysisConfig.from_params(analysis_params).null_ordering


def plot_distance_heatmaps(
    noise_units: pd.DataFrame, ordering_status: pd.DataFrame, analysis_params: dict[str, Any], params: dict[str, Any]
) -> FigureOutputs:
    """Per ordering: the heat maps of distance and of noise units (seed means), one panel per phase."""
    drawn = figures.distance_heatmaps(noise_units, list(ordering_status["ordering"]), _null(analysis_params))
    return _outputs(drawn, params)


def plot_seed_spread(
    batch_stats_by_seed: pd.DataFrame, ordering_status: pd.DataFrame, analysis_params: dict[str, Any],
    params: dict[str, Any],
) -> FigureOutputs:
    """Every ordering and phase: each seed's phase-mean noise units per batch, their mean and spread."""
    drawn = {"seed_spread": figures.seed_spread(batch_stats_by_seed, list(ordering_status["ordering"]),
                                                _null(analysis_params))}
    return _outputs(drawn, params)


def plot_distance_by_rank(
    batch_stats: pd.DataFrame, ordering_status: pd.DataFrame, analysis_params: dict[str, Any], params: dict[str, Any]
) -> FigureOutputs:
    """Per phase: every metric's distance against batch rank over the random ordering's band."""
    drawn = {"distance_by_rank": figures.distance_by_rank(batch_stats, list(ordering_status["ordering"]),
                                                          _null(analysis_params))}
    return _outputs(drawn, params)


def plot_batch_images(
    best_worst: pd.DataFrame, train_images: torch.Tensor, image_index: pd.DataFrame, params: dict[str, Any],
    **tables: pd.DataFrame,
) -> FigureOutputs:
    """Per ordering: images and class mix of the best and worst batch of every phase."""
    drawn = figures.batch_image_grids(best_worst, by_ordering(tables, "batch_assignments"),
                                      train_images.numpy(), image_index)
    return _outputs(drawn, params)


def plot_training_curves(
    analysis_params: dict[str, Any], params: dict[str, Any], **tables: pd.DataFrame
) -> FigureOutputs:
    """Loss and accuracy per epoch of every ordering, phases marked."""
    drawn = {"training_curves": figures.training_curves(by_ordering(tables, "training_history"),
                                                        _null(analysis_params))}
    return _outputs(drawn, params)


def write_report(
    ordering_status: pd.DataFrame,
    claims: pd.DataFrame,
    comparisons: pd.DataFrame,
    confounds: pd.DataFrame,
    best_worst: pd.DataFrame,
    trace_check: pd.DataFrame,
    image_index: pd.DataFrame,
    parameters: dict[str, Any],
    batch_selection_section: str | None = None,
    position_effects: pd.DataFrame | None = None,
    **tables: Any,
) -> str:
    """The self-contained HTML report of the run (with batch_selection's answer once it has run)."""
    analysis_params = AnalysisConfig.from_params(parameters.get("distance_analysis"))
    histories = by_ordering(tables, "training_history")
    setup = report.run_setup(histories, by_ordering(tables, "batch_assignments"), image_index)
    pngs = by_ordering(tables, "figures")
    return report.render_report(
        setup=setup, ordering_status=ordering_status, claims=claims, comparisons=comparisons,
        confounds=confounds, best_worst=best_worst, trace_check=trace_check, histories=histories,
        figures=pngs, parameters=parameters, null_ordering=analysis_params.null_ordering,
        alpha=analysis_params.alpha, title=VisualizeConfig.from_params(parameters.get("visualize")).report_title,
        batch_selection_section=batch_selection_section, position_effects=position_effects,
    )
