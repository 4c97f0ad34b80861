"""Wiring of ``gradient_training``: one namespaced copy per ordering."""

from functools import partial, update_wrapper

from kedro.pipeline import Pipeline, node

from best_minibatch.pipelines.orderings import per_ordering
from best_minibatch.services.parallel import GPU_TAG

from .nodes import train_with_gradient_probe

SHARED_INPUTS = {"image_index", "train_images", "test_images"}


def _ordering_template(ordering: str) -> Pipeline:
    return Pipeline(
        [
            node(
                update_wrapper(partial(train_with_gradient_probe, ordering=ordering), train_with_gradient_probe),
                inputs=["batch_assignments", "image_index", "train_images", "test_images",
                        "params:training", "params:gradient_training"],
                outputs=["batch_gradients", "gradient_distances", "distance_matrix", "training_history",
                         "trained_model", "null_distances"],
                name="train_with_gradient_probe",
                tags=[GPU_TAG],  # each seed's training needs a GPU of its own (docs/scaling.md)
            ),
        ]
    )


def create_pipeline(**kwargs) -> Pipeline:
    return per_ordering(_ordering_template, SHARED_INPUTS, "training", "gradient_training")
