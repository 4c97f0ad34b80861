"""Wiring of ``visualize``: figures over every ordering of the metric registry, then the report."""

from __future__ import annotations

from collections.abc import Sequence

from kedro.pipeline import Pipeline, node

from best_minibatch.pipelines.orderings import per_ordering_inputs

from .nodes import (
    plot_batch_images,
    plot_distance_by_rank,
    plot_distance_heatmaps,
    plot_seed_spread,
    plot_training_curves,
    write_report,
)

#: Figure groups, in the order the report shows them.
FIGURE_GROUPS = ("distance_heatmaps", "seed_spread", "distance_by_rank", "batch_images", "training_curves")


def figure_outputs(group: str) -> list[str]:
    """The PNG and PDF datasets of a figure group and the PNG bytes handed to the report."""
    return [f"figures_{group}_png", f"figures_{group}_pdf", f"figures_{group}_for_report"]


def create_pipeline(orderings: Sequence[str] | None = None, **kwargs) -> Pipeline:
    """``orderings`` defaults to every ordering (``best_minibatch.batches.orderings``), in registry order."""
    if orderings is None:
        from best_minibatch.batches.orderings import all_orderings

        orderings = list(all_orderings())
    analysis_params, params = "params:distance_analysis", "params:visualize"
    return Pipeline(
        [
            node(
                plot_distance_heatmaps,
                inputs=["distance_noise_units", "ordering_status", analysis_params, params],
                outputs=figure_outputs("distance_heatmaps"),
                name="plot_distance_heatmaps",
            ),
            node(
                plot_seed_spread,
                inputs=["batch_phase_stats_by_seed", "ordering_status", analysis_params, params],
                outputs=figure_outputs("seed_spread"),
                name="plot_seed_spread",
            ),
            node(
                plot_distance_by_rank,
                inputs=["batch_phase_stats", "ordering_status", analysis_params, params],
                outputs=figure_outputs("distance_by_rank"),
                name="plot_distance_by_rank",
            ),
            node(
                plot_batch_images,
                inputs={"best_worst": "best_worst_batches", "train_images": "train_images",
                        "image_index": "image_index", "params": params,
                        **per_ordering_inputs("batch_assignments", orderings)},
                outputs=figure_outputs("batch_images"),
                name="plot_batch_images",
            ),
            node(
                plot_training_curves,
                inputs={"analysis_params": analysis_params, "params": params,
                        **per_ordering_inputs("training_history", orderings)},
                outputs=figure_outputs("training_curves"),
                name="plot_training_curves",
            ),
            node(
                write_report,
                inputs={
                    "ordering_status": "ordering_status",
                    "claims": "claim_verdicts",
                    "comparisons": "batch_group_comparisons",
                    "confounds": "confound_correlations",
                    "position_effects": "position_effects",
                    "best_worst": "best_worst_batches",
                    "trace_check": "gradient_noise_trace_check",
                    "image_index": "image_index",
                    "parameters": "parameters",
                    "batch_selection_section": "batch_selection.report_fragment_html",
                    **per_ordering_inputs("training_history", orderings),
                    **per_ordering_inputs("batch_assignments", orderings),
                    **{f"figures__{group}": f"figures_{group}_for_report" for group in FIGURE_GROUPS},
                },
                outputs="report_html",
                name="write_report",
            ),
        ]
    )
