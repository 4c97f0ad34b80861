"""Wiring of ``batch_selection``: one Kedro namespace, so its datasets are ``batch_selection.<name>``."""

from __future__ import annotations

from collections.abc import Sequence

from kedro.pipeline import Pipeline, node, pipeline

from best_minibatch.pipelines.orderings import per_ordering_inputs
from best_minibatch.services.parallel import GPU_TAG

from .nodes import prepare_policies, run_selection_experiment, summarise_selection

NAMESPACE = "batch_selection"
SHARED_INPUTS = ("image_index", "train_images", "test_images", "batch_phase_stats")


def create_pipeline(orderings: Sequence[str] | None = None, **kwargs) -> Pipeline:
    """``orderings`` defaults to every metric in ``best_minibatch.metrics.METRICS``.

    Only the plain metric orderings: the experiment re-cuts each metric's own order on its training
    images, so derived orderings of other pipelines (several random batchings, class-stratified
    variants) are no input here.
    """
    if orderings is None:
        from best_minibatch.metrics.scoring import METRICS

        orderings = list(METRICS)
    params = "params:batch_selection"
    recipe = {"training": "params:training", "sort_batches": "params:sort_batches"}
    per_ordering = {**per_ordering_inputs("image_scores", orderings), **per_ordering_inputs("metric_status", orderings)}
    histories = per_ordering_inputs("training_history", orderings)  # learned's up-front cost
    template = Pipeline(
        [
            node(
                prepare_policies,
                inputs={"image_index": "image_index", "batch_phase_stats": "batch_phase_stats", "params": params,
                        **recipe, **per_ordering},
                outputs=["validation_split", "batch_pools", "notes"],
                name="prepare_policies",
            ),
            node(
                run_selection_experiment,
                inputs={"image_index": "image_index", "train_images": "train_images", "test_images": "test_images",
                        "validation_split": "validation_split", "batch_pools": "batch_pools", "params": params,
                        **recipe, **histories},
                outputs=["learning_curves", "run_results"],
                name="run_selection_experiment",
                tags=[GPU_TAG],  # each (policy, seed) run needs a GPU of its own (docs/scaling.md)
            ),
            node(
                summarise_selection,
                inputs={"learning_curves": "learning_curves", "run_results": "run_results",
                        "validation_split": "validation_split", "notes": "notes", "params": params, **recipe},
                outputs=["curve_summary", "summary", "report_fragment_md", "report_fragment_html",
                         "convergence_png", "convergence_pdf"],
                name="summarise_selection",
            ),
        ]
    )
    return pipeline(
        template,
        namespace=NAMESPACE,
        inputs={*SHARED_INPUTS, *per_ordering.values(), *histories.values()},
        parameters={name: name for name in (params, *recipe.values())},
    )
