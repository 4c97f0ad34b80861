"""Per-ordering wiring, in one place: namespaced copies of a pipeline, and the fan-in of per-ordering datasets.

``per_ordering`` makes one namespaced copy of a template per ordering (every
metric's plain and class-stratified ordering, ``best_minibatch.batches.orderings``);
``per_ordering_inputs`` and ``by_ordering`` are the two halves of a fan-in node that
reads one dataset kind of every ordering (``<ordering>.<kind>`` arrives as the
keyword argument ``<kind>__<ordering>``). The metric's own datasets (its scores and
status) live in the metric's namespace and are shared by its two orderings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kedro.pipeline import Pipeline, pipeline

from best_minibatch.batches.orderings import all_orderings, ordering_of

#: Dataset kinds written once per metric (by score_metrics), read by both of the metric's orderings.
METRIC_KINDS = ("image_scores", "metric_status")


def per_ordering(
    template: Callable[[str], Pipeline], shared_inputs: Iterable[str], *parameter_sections: str
) -> Pipeline:
    """``template(ordering)`` in namespace ``ordering`` for each ordering of :func:`all_orderings`.

    The datasets in ``shared_inputs`` and the ``params:<section>`` of each parameter
    section stay un-namespaced; a metric kind (:data:`METRIC_KINDS`) comes from the
    metric's namespace; every other dataset becomes ``<ordering>.<name>``, so that
    ``kedro run --namespaces=edges`` runs one ordering.
    """
    parameters = {f"params:{section}": f"params:{section}" for section in parameter_sections}
    copies = []
    for name, ordering in all_orderings().items():
        template_pipeline = template(name)
        inputs: dict[str, str] = {shared: shared for shared in shared_inputs}
        inputs |= {kind: f"{ordering.metric}.{kind}" for kind in METRIC_KINDS
                   if kind in template_pipeline.inputs() and ordering.stratified}
        copies.append(pipeline(template_pipeline, namespace=name, inputs=inputs, parameters=parameters))
    return sum(copies, Pipeline([]))


def dataset_name(ordering: str, kind: str) -> str:
    """``<ordering>.<kind>``, or the metric's dataset for a metric kind."""
    return f"{ordering_of(ordering).metric if kind in METRIC_KINDS else ordering}.{kind}"


def per_ordering_inputs(kind: str, orderings: Sequence[str]) -> dict[str, str]:
    """``{"<kind>__<ordering>": "<ordering>.<kind>"}``: the node arguments of one dataset kind."""
    return {f"{kind}__{ordering}": dataset_name(ordering, kind) for ordering in orderings}


def by_ordering(tables: dict[str, Any], kind: str) -> dict[str, Any]:
    """``{ordering: data}`` of the keyword arguments named ``<kind>__<ordering>``."""
    prefix = f"{kind}__"
    return {name[len(prefix):]: value for name, value in tables.items() if name.startswith(prefix)}
