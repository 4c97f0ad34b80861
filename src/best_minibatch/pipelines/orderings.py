"""One namespaced copy of a pipeline per ordering (every metric in the registry)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kedro.pipeline import Pipeline, pipeline

from best_minibatch.metrics.scoring import METRICS


def per_ordering(
    template: Callable[[str], Pipeline], shared_inputs: Iterable[str], *parameter_sections: str
) -> Pipeline:
    """``template(ordering)`` in namespace ``ordering`` for each metric of ``METRICS``.

    The datasets in ``shared_inputs`` and the ``params:<section>`` of each parameter
    section stay un-namespaced; every other dataset becomes ``<ordering>.<name>``, so that
    ``kedro run --namespaces=edges`` runs one ordering.
    """
    parameters = {f"params:{section}": f"params:{section}" for section in parameter_sections}
    return sum(
        (
            pipeline(template(ordering), namespace=ordering, inputs=set(shared_inputs), parameters=parameters)
            for ordering in METRICS
        ),
        Pipeline([]),
    )
