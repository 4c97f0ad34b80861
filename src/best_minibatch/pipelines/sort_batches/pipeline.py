"""Wiring of ``sort_batches``: one namespace per registered metric."""

from functools import partial, update_wrapper

from kedro.pipeline import Pipeline, node

from best_minibatch.pipelines.orderings import per_ordering

from .nodes import sort_scores_into_batches

SHARED_INPUTS = {"image_index"}


def ordering_template(ordering: str) -> Pipeline:
    """The per-ordering template: the ordering's name is bound to the node function (keeping its name for
    logs and kedro-viz); the scores are the metric's, every other input is shared or namespaced."""
    return Pipeline(
        [
            node(
                update_wrapper(partial(sort_scores_into_batches, ordering), sort_scores_into_batches),
                inputs=["image_scores", "image_index", "params:sort_batches"],
                outputs=["batch_assignments", "batch_summary"],
                name="sort_into_batches",
            )
        ]
    )


def create_pipeline(**kwargs) -> Pipeline:
    return per_ordering(ordering_template, SHARED_INPUTS, "sort_batches")
