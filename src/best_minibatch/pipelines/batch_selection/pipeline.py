"""Wiring of ``batch_selection``."""

from __future__ import annotations

from collections.abc import Sequence

from kedro.pipeline import Pipeline, node

from .nodes import build_batch_pools, run_selection_experiment, split_validation, summarise_selection


def _per_ordering(kind: str, orderings: Sequence[str]) -> dict[str, str]:
    return {f"{kind}__{ordering}": f"{ordering}.{kind}" for ordering in orderings}


def create_pipeline(orderings: Sequence[str] | None = None, **kwargs) -> Pipeline:
    """``orderings`` defaults to every metric in ``best_minibatch.metrics.METRICS``."""
    if orderings is None:
        from best_minibatch.metrics import METRICS

        orderings = list(METRICS)
    params = "params:batch_selection"
    return Pipeline(
        [
            node(split_validation, inputs=["image_index", params], outputs="batch_selection.validation_split",
                 name="hold_out_validation_split"),
            node(
                build_batch_pools,
                inputs={"validation_split": "batch_selection.validation_split",
                        "batch_phase_stats": "batch_phase_stats", "params": params,
                        **_per_ordering("image_scores", orderings), **_per_ordering("metric_status", orderings)},
                outputs=["batch_selection.batch_pools", "batch_selection.notes"],
                name="build_batch_pools",
            ),
            node(
                run_selection_experiment,
                inputs=["image_index", "train_images", "test_images", "batch_selection.validation_split",
                        "batch_selection.batch_pools", params],
                outputs=["batch_selection.learning_curves", "batch_selection.run_results"],
                name="run_selection_experiment",
            ),
            node(
                summarise_selection,
                inputs=["batch_selection.learning_curves", "batch_selection.run_results",
                        "batch_selection.validation_split", "batch_selection.notes", params],
                outputs=["batch_selection.curve_summary", "batch_selection.summary",
                         "batch_selection.report_fragment_md", "batch_selection.report_fragment_html",
                         "batch_selection.convergence_png", "batch_selection.convergence_pdf"],
                name="summarise_selection",
            ),
        ]
    )
