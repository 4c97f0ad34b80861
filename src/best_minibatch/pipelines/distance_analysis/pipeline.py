"""Wiring of ``distance_analysis``: one set of nodes over every ordering of the metric registry."""

from __future__ import annotations

from collections.abc import Sequence

from kedro.pipeline import Pipeline, node

from best_minibatch.pipelines.orderings import per_ordering_inputs

from .nodes import (
    check_gradient_noise_trace,
    correlate_confounds,
    evaluate_paper_claims,
    express_in_noise_units,
    relate_distance_to_position,
    select_best_and_worst_batches,
    summarise_batches_per_phase,
    tabulate_orderings,
)


def create_pipeline(orderings: Sequence[str] | None = None, **kwargs) -> Pipeline:
    """``orderings`` defaults to every ordering (``best_minibatch.batches.orderings``), in registry order."""
    if orderings is None:
        from best_minibatch.batches.orderings import all_orderings

        orderings = list(all_orderings())
    params = "params:distance_analysis"
    return Pipeline(
        [
            node(
                tabulate_orderings,
                inputs={**per_ordering_inputs("metric_status", orderings),
                        **per_ordering_inputs("gradient_distances", orderings)},
                outputs="ordering_status",
                name="tabulate_orderings",
            ),
            node(
                express_in_noise_units,
                inputs={"params": params, **per_ordering_inputs("gradient_distances", orderings),
                        **per_ordering_inputs("null_distances", orderings)},
                outputs="distance_noise_units",
                name="express_in_noise_units",
            ),
            node(
                summarise_batches_per_phase,
                inputs={"noise_units": "distance_noise_units", **per_ordering_inputs("batch_summary", orderings)},
                outputs=["batch_phase_stats", "batch_phase_stats_by_seed"],
                name="summarise_batches_per_phase",
            ),
            node(
                evaluate_paper_claims,
                inputs=["batch_phase_stats", "batch_phase_stats_by_seed", "ordering_status", params],
                outputs=["batch_group_comparisons", "claim_verdicts", "batch_group_comparisons_by_seed"],
                name="evaluate_paper_claims",
            ),
            node(
                correlate_confounds,
                inputs=["batch_phase_stats", params],
                outputs="confound_correlations",
                name="correlate_confounds",
            ),
            node(
                relate_distance_to_position,
                inputs="distance_noise_units",
                outputs="position_effects",
                name="relate_distance_to_position",
            ),
            node(
                select_best_and_worst_batches,
                inputs=["batch_phase_stats", params],
                outputs="best_worst_batches",
                name="select_best_and_worst_batches",
            ),
            node(
                check_gradient_noise_trace,
                inputs={"noise_units": "distance_noise_units", "params": params,
                        **per_ordering_inputs("training_history", orderings)},
                outputs="gradient_noise_trace_check",
                name="check_gradient_noise_trace",
            ),
        ]
    )
