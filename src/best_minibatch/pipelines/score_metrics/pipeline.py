"""Wiring of ``score_metrics``: one namespace per registered metric, plus the combined table."""

import warnings
from functools import partial, update_wrapper

from kedro.pipeline import Pipeline, node

from best_minibatch.metrics.scoring import METRICS
from best_minibatch.pipelines.orderings import per_ordering

from .nodes import combine_metric_scores, score_training_images

SHARED_INPUTS = {"train_images", "image_index"}


def ordering_template(metric: str) -> Pipeline:
    """The per-metric template: the metric's name is bound to the node function (keeping its name for
    logs and kedro-viz); every other input is shared or namespaced."""
    return Pipeline(
        [
            node(
                update_wrapper(partial(score_training_images, metric), score_training_images),
                inputs=["train_images", "image_index", "params:score_metrics"],
                outputs=["image_scores", "metric_status"],
                name="score_images",
            )
        ]
    )


def create_pipeline(**kwargs) -> Pipeline:
    orderings = per_ordering(ordering_template, SHARED_INPUTS, "score_metrics")
    with warnings.catch_warnings():
        # This node reads every namespace's table by its namespaced name on purpose (the data
        # contract); Kedro's advice against dots in dataset names does not apply.
        warnings.filterwarnings("ignore", message="One or more dataset names contain '.'")
        combined = Pipeline(
            [
                node(
                    combine_metric_scores,
                    inputs=["image_index", *(f"{metric}.image_scores" for metric in METRICS)],
                    outputs="metric_scores",
                    name="combine_metric_scores",
                )
            ]
        )
    return orderings + combined
