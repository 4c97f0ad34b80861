"""The orderings: each registered metric's plain and class-stratified batching of the training set.

Knows nothing of Kedro. An *ordering* is what ``sort_batches`` cuts and
``gradient_training`` trains: the metric's ascending order cut into batches
(*plain*, the paper's), or the same order within each class with every batch
holding the same number of images of each class (*stratified*, named
``<metric>_stratified``). Stratification holds the batches' class mix fixed by
design, so the stratified ordering measures the metric's own effect; the
difference between the plain and the stratified ordering is the part that the
class mix carries (docs/analysis.md).

A *control* ordering is one of a control metric (``random``): its scores carry no
information, so it is the reference every claim is gated on, and each training seed
trains a batching of its own (``batching`` = the seed's place in
``gradient_training.seeds``), so seeds replicate the batching, not only the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from best_minibatch.metrics.scoring import METRICS, STRATIFIED_SUFFIX


@dataclass(frozen=True)
class Ordering:
    """One ordering: its name (the Kedro namespace), its metric and whether it is class-stratified."""

    name: str
    metric: str
    stratified: bool

    @property
    def control(self) -> bool:
        """Whether the metric is a null control (random scores)."""
        return METRICS[self.metric].control

    @property
    def plain_name(self) -> str:
        """The plain ordering of the same metric."""
        return self.metric


def ordering_name(metric: str, stratified: bool) -> str:
    """``metric`` or ``<metric>_stratified``."""
    return f"{metric}{STRATIFIED_SUFFIX}" if stratified else metric


def all_orderings() -> dict[str, Ordering]:
    """Every ordering in registry order: each metric's plain ordering, then every stratified one.

    Read at call time, so a metric registered later (a test's, a user's) has its orderings.
    """
    plain = {m: Ordering(m, m, False) for m in METRICS}
    stratified = {ordering_name(m, True): Ordering(ordering_name(m, True), m, True) for m in METRICS}
    return {**plain, **stratified}


def ordering_of(name: str) -> Ordering:
    """The :class:`Ordering` called ``name``; a metric's name is its plain ordering."""
    if name.endswith(STRATIFIED_SUFFIX) and name[: -len(STRATIFIED_SUFFIX)] in METRICS:
        return Ordering(name, name[: -len(STRATIFIED_SUFFIX)], True)
    return Ordering(name, name, False)


def control_for(name: str, null_ordering: str) -> str:
    """The control an ordering's claims are gated on: the null ordering of the same kind (plain or stratified)."""
    return ordering_name(ordering_of(null_ordering).metric, ordering_of(name).stratified)
