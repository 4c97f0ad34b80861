"""Wiring of ``score_metrics``: one namespace per registered metric, plus the combined table."""

import warnings
from functools import partial, update_wrapper

from kedro.pipeline import Pipeline, node, pipeline

from best_minibatch.metrics.scoring import METRICS

from .nodes import combine_metric_scores, score_training_images

SHARED_INPUTS = {"train_images", "image_index"}


def ordering_template(metric: str, earlier_metrics: tuple[str, ...]) -> Pipeline:
    """The per-metric template: the metric's name is bound to the node function (keeping its name for
    logs and kedro-viz). Besides the images it reads the score tables of the metrics registered before
    it, to recognise a metric that orders the images exactly like one of them."""
    return Pipeline(
        [
            node(
                update_wrapper(partial(score_training_images, metric, earlier_metrics), score_training_images),
                inputs=["train_images", "image_index", "params:score_metrics",
                        *(f"{earlier}.image_scores" for earlier in earlier_metrics)],
                outputs=["image_scores", "metric_status"],
                name="score_images",
            )
        ]
    )


def create_pipeline(**kwargs) -> Pipeline:
    names = tuple(METRICS)
    with warnings.catch_warnings():
        # These nodes read other namespaces' tables by their namespaced names on purpose (the data
        # contract); Kedro's advice against dots in dataset names does not apply.
        warnings.filterwarnings("ignore", message="One or more dataset names contain '.'")
        # Like pipelines.orderings.per_ordering, plus each metric's own shared inputs: the
        # earlier metrics' score tables stay un-namespaced.
        orderings = sum(
            (
                pipeline(
                    ordering_template(metric, names[:position]),
                    namespace=metric,
                    inputs=SHARED_INPUTS | {f"{earlier}.image_scores" for earlier in names[:position]},
                    parameters={"params:score_metrics": "params:score_metrics"},
                )
                for position, metric in enumerate(names)
            ),
            Pipeline([]),
        )
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
