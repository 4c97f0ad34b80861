"""Per-ordering wiring, in one place: namespaced copies of a pipeline, and the fan-in of per-ordering datasets.

``per_ordering`` makes one namespaced copy of a template per metric;
``per_ordering_inputs`` and ``by_ordering`` are the two halves of a fan-in node that
reads one dataset kind of every ordering (``<ordering>.<kind>`` arrives as the
keyword argument ``<kind>__<ordering>``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

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


def per_ordering_inputs(kind: str, orderings: Sequence[str]) -> dict[str, str]:
    """``{"<kind>__<ordering>": "<ordering>.<kind>"}``: the node arguments of one dataset kind."""
    return {f"{kind}__{ordering}": f"{ordering}.{kind}" for ordering in orderings}


def by_ordering(tables: dict[str, Any], kind: str) -> dict[str, Any]:
    """``{ordering: data}`` of the keyword arguments named ``<kind>__<ordering>``."""
    prefix = f"{kind}__"
    return {name[len(prefix):]: value for name, value in tables.items() if name.startswith(prefix)}
