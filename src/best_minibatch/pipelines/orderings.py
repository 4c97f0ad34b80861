"""One namespaced copy of a pipeline per ordering (every metric in the registry)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kedro.pipeline import Pipeline, pipeline

from best_minibatch.metrics.scoring import METRICS


def per_ordering(
    template: Callable[[str], Pipeline], shared_inputs: Iterable[str], parameter_section: str
) -> Pipeline:
    """``template(ordering)`` in namespace ``ordering`` for each metric of ``METRICS``.

    The datasets in ``shared_inputs`` and the pipeline's own ``params:<parameter_section>``
    stay un-namespaced; every other dataset becomes ``<ordering>.<name>``, so that
    ``kedro run --namespaces=edges`` runs one ordering.
    """
    section = f"params:{parameter_section}"
    return sum(
        (
            pipeline(template(ordering), namespace=ordering, inputs=set(shared_inputs), parameters={section: section})
            for ordering in METRICS
        ),
        Pipeline([]),
    )
