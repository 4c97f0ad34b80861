"""The policies: each picks the batches of every epoch, all taking the same number of steps.

Knows nothing of Kedro. ``shuffle`` (a fresh random partition per epoch, the
baseline), ``class_balanced`` (a fresh class-balanced partition per epoch),
``class_balanced_fixed`` (one class-balanced partition per seed, in a fresh order
each epoch), ``fixed_random`` (the null ordering's batches in a fixed order),
``random_subset``, ``paper_advice`` and ``learned`` (per phase, cycled from a
pool, ``pools.py``) and ``oracle`` (probes a fresh partition's gradients at the
epoch start through Algorithm 1's probe and keeps the closest to their mean).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd

from best_minibatch.selection.config import (
    CLASS_BALANCED,
    CONTROL,
    POLICIES,
    SelectionConfig,
    SelectionConfigError,
    SelectionDataError,
    kept_count,
    policy_rng,
)
from best_minibatch.selection.pools import pools_by_phase, random_subset_pools

logger = logging.getLogger(__name__)


#: Gradient probe handed to policies: ``C x m`` image ids -> ``C`` distances of each batch's gradient
#: (at the current parameters) to the mean of the ``C`` gradients.
ProbeFn = Callable[[np.ndarray], np.ndarray]


class BatchPolicy:
    """A rule that picks the ``steps_per_epoch`` batches of every epoch."""

    name: str = ""
    #: Whether :meth:`epoch_batches` uses the gradient probe (its cost is counted).
    probes: bool = False

    def __init__(self, steps_per_epoch: int, batch_size: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = batch_size

    def epoch_batches(self, epoch: int, phase: int, probe: ProbeFn | None = None) -> np.ndarray:
        """The epoch's batches as a ``steps_per_epoch x batch_size`` array of image ids."""
        raise NotImplementedError


def random_partition(train_ids: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of ``train_ids`` cut into ``floor(N / m)`` batches (the remainder is dropped)."""
    k = len(train_ids) // batch_size
    return rng.permutation(train_ids)[: k * batch_size].reshape(k, batch_size)


class ShufflePolicy(BatchPolicy):
    """A fresh random partition of the training images every epoch."""

    name = "shuffle"

    def __init__(self, train_ids: np.ndarray, batch_size: int, seed: int) -> None:
        super().__init__(len(train_ids) // batch_size, batch_size)
        self.train_ids = np.asarray(train_ids, dtype=np.int64)
        self.rng = policy_rng(seed, self.name)

    def epoch_batches(self, epoch: int, phase: int, probe: ProbeFn | None = None) -> np.ndarray:
        return random_partition(self.train_ids, self.batch_size, self.rng)


def class_balanced_partition(train_ids: np.ndarray, labels: np.ndarray, batch_size: int,
                             rng: np.random.Generator) -> np.ndarray:
    """A random partition of ``train_ids`` into ``K = floor(N / m)`` batches with as equal class counts as can be.

    With ``C`` classes, every batch first gets ``q_c = min(floor(m / C), floor(n_c / K))``
    images of each class ``c`` (``n_c`` its images): ``floor(m / C)`` when the class has
    enough, fewer only for a class too small to give that many to every batch. The
    ``r = m - sum_c q_c`` remaining places of each batch (the remainder of ``m / C``,
    plus what small classes could not give) are filled from the images left over,
    dealt round-robin over the classes: the leftovers are interleaved (one of each
    class in a random class order, then the next of each, ...) and cut into
    consecutive runs of ``r``, so a batch's extra images come from ``r`` different
    classes while ``r <= C`` and those classes have leftovers. With equal classes a
    batch therefore holds ``floor(m / C)`` or ``floor(m / C) + 1`` images of every
    class, exactly ``m / C`` when ``C`` divides ``m``. The ``N - K m`` leftovers dealt
    last are left out of the epoch (as ``shuffle``'s remainder is). Which images of a
    class go to which batch, the class order of the leftovers and the order of the
    batches are all drawn from ``rng``.
    """
    train_ids = np.asarray(train_ids, dtype=np.int64)
    labels = np.asarray(labels)
    if labels.shape != train_ids.shape:
        raise SelectionDataError(f"{len(labels)} labels for {len(train_ids)} training images.")
    k = len(train_ids) // batch_size
    if k == 0:
        raise SelectionDataError(f"{len(train_ids)} training images cannot fill one batch of {batch_size}.")
    classes = np.unique(labels)
    per_class = batch_size // len(classes)
    columns, leftovers = [], []
    for label in classes:
        members = rng.permutation(train_ids[labels == label])
        quota = min(per_class, len(members) // k)
        columns.append(members[: k * quota].reshape(k, quota))
        leftovers.append(members[k * quota:])
    remainder = batch_size - sum(c.shape[1] for c in columns)
    if remainder:
        rounds = max(len(part) for part in leftovers)
        class_order = rng.permutation(len(classes))
        interleaved = np.concatenate([leftovers[c][j: j + 1] for j in range(rounds) for c in class_order])
        columns.append(interleaved[: k * remainder].reshape(k, remainder))
    batches = np.concatenate(columns, axis=1)
    return rng.permuted(batches[rng.permutation(k)], axis=1)


class ClassBalancedPolicy(BatchPolicy):
    """Class-balanced batches (:func:`class_balanced_partition`): a fresh partition each epoch, or one per seed.

    ``fixed=False`` (``class_balanced``): every epoch a new partition, in a new
    order, from the generator of ``(seed, "class_balanced")``. ``fixed=True``
    (``class_balanced_fixed``): one partition drawn once from ``(seed,
    "class_balanced_fixed", "partition")``, its batches visited each epoch in a
    fresh order from ``(seed, "class_balanced_fixed", "order")``; it separates
    "balanced" from "balanced and freshly partitioned".
    """

    def __init__(self, train_ids: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                 fixed: bool = False) -> None:
        super().__init__(len(train_ids) // batch_size, batch_size)
        self.name = "class_balanced_fixed" if fixed else "class_balanced"
        self.train_ids = np.asarray(train_ids, dtype=np.int64)
        self.labels = np.asarray(labels)
        self.fixed = fixed
        if fixed:
            self.partition = class_balanced_partition(self.train_ids, self.labels, batch_size,
                                                      policy_rng(seed, self.name, "partition"))
            self.rng = policy_rng(seed, self.name, "order")
        else:
            self.rng = policy_rng(seed, self.name)

    def epoch_batches(self, epoch: int, phase: int, probe: ProbeFn | None = None) -> np.ndarray:
        if self.fixed:
            return self.partition[self.rng.permutation(len(self.partition))]
        return class_balanced_partition(self.train_ids, self.labels, self.batch_size, self.rng)


class FixedOrderPolicy(BatchPolicy):
    """The same batches in the same order every epoch."""

    name = "fixed_random"

    def __init__(self, batches: np.ndarray) -> None:
        super().__init__(len(batches), batches.shape[1])
        self.batches = np.asarray(batches, dtype=np.int64)

    def epoch_batches(self, epoch: int, phase: int, probe: ProbeFn | None = None) -> np.ndarray:
        return self.batches.copy()


class PoolCycler:
    """Visits a pool of batches in random order, reshuffling the visit order each time it is used up.

    Successive calls continue where the last one stopped, so over an epoch
    boundary every pool batch is used equally often (to within one visit).
    """

    def __init__(self, pool: np.ndarray, rng: np.random.Generator) -> None:
        self.pool = pool
        self.rng = rng
        self._queue = np.zeros(0, dtype=np.int64)

    def take(self, count: int) -> np.ndarray:
        chosen = []
        while count > 0:
            if len(self._queue) == 0:
                self._queue = self.rng.permutation(len(self.pool))
            n = min(count, len(self._queue))
            chosen.append(self._queue[:n])
            self._queue = self._queue[n:]
            count -= n
        return self.pool[np.concatenate(chosen)]


class PoolPolicy(BatchPolicy):
    """Per phase, ``steps_per_epoch`` batches cycled from that phase's pool (``paper_advice``, ``learned``, ``random_subset``)."""

    def __init__(self, name: str, pools: Mapping[int, np.ndarray], steps_per_epoch: int, seed: int) -> None:
        batch_sizes = {p.shape[1] for p in pools.values()}
        if len(batch_sizes) != 1:
            raise SelectionDataError(f"Policy '{name}' has pools of different batch sizes {sorted(batch_sizes)}.")
        super().__init__(steps_per_epoch, batch_sizes.pop())
        self.name = name
        self.pools = dict(pools)
        self.seed = seed
        self._cyclers: dict[int, PoolCycler] = {}

    def epoch_batches(self, epoch: int, phase: int, probe: ProbeFn | None = None) -> np.ndarray:
        if phase not in self.pools:
            raise SelectionDataError(f"Policy '{self.name}' has no pool for phase {phase}.")
        if phase not in self._cyclers:
            self._cyclers[phase] = PoolCycler(self.pools[phase], policy_rng(self.seed, self.name, "phase", phase))
        return self._cyclers[phase].take(self.steps_per_epoch)


def closest_batches(distances: np.ndarray, keep: int) -> np.ndarray:
    """Indices of the ``keep`` smallest distances, closest first (ties by index)."""
    distances = np.asarray(distances, dtype=np.float64)
    if not np.isfinite(distances).all():
        bad = int(np.flatnonzero(~np.isfinite(distances))[0])
        raise FloatingPointError(f"The probed gradient of candidate batch {bad} is not finite.")
    return np.lexsort((np.arange(len(distances)), distances))[:keep]


class OraclePolicy(BatchPolicy):
    """Gradient matching: probe candidates at the epoch's start, train on the closest to their mean.

    Each epoch draws a fresh random partition of the training images (``K``
    batches; ``candidates`` of them if set), asks the probe for every candidate's
    distance to the candidates' mean gradient (the full gradient when all ``K``
    are probed), keeps the ``round(keep_fraction * C)`` closest (at least 1) and
    cycles through them in random order for the epoch's ``K`` steps. The probe
    costs ``C`` forward and backward passes per epoch, counted by the runner.
    """

    name = "oracle"
    probes = True

    def __init__(self, train_ids: np.ndarray, batch_size: int, seed: int, keep_fraction: float,
                 candidates: int | None = None) -> None:
        super().__init__(len(train_ids) // batch_size, batch_size)
        self.train_ids = np.asarray(train_ids, dtype=np.int64)
        self.num_candidates = self.steps_per_epoch if candidates is None else min(candidates, self.steps_per_epoch)
        self.keep = kept_count(keep_fraction, self.num_candidates)
        self.seed = seed
        self.rng = policy_rng(seed, self.name)

    def epoch_batches(self, epoch: int, phase: int, probe: ProbeFn | None = None) -> np.ndarray:
        if probe is None:
            raise ValueError("The oracle policy needs a gradient probe.")
        candidates = random_partition(self.train_ids, self.batch_size, self.rng)[: self.num_candidates]
        distances = np.asarray(probe(candidates), dtype=np.float64)
        if distances.shape != (len(candidates),):
            raise ValueError(f"The probe returned {distances.shape} distances for {len(candidates)} candidates.")
        kept = closest_batches(distances, self.keep)
        return PoolCycler(candidates[kept], policy_rng(self.seed, self.name, "cycle", epoch)).take(
            self.steps_per_epoch
        )


def build_policy(
    name: str,
    config: SelectionConfig,
    seed: int,
    train_ids: np.ndarray,
    pools: pd.DataFrame | None,
    labels: np.ndarray | None = None,
) -> BatchPolicy:
    """The policy ``name`` for one seed, from the split's training ids (and their ``labels``) and the pool table.

    ``labels`` (one per training id) are needed by the class-balanced policies only;
    ``pools`` by the policies built from the pool table only.
    """
    m = config.batch_size
    steps = len(train_ids) // m
    if name == "shuffle":
        return ShufflePolicy(train_ids, m, seed)
    if name in CLASS_BALANCED:
        if labels is None:
            raise SelectionDataError(f"Policy '{name}' needs the labels of the training images.")
        return ClassBalancedPolicy(train_ids, labels, m, seed, fixed=name == "class_balanced_fixed")
    if name == "oracle":
        return OraclePolicy(train_ids, m, seed, config.oracle_keep_fraction, config.oracle_candidates)
    if pools is None:
        raise SelectionDataError(f"Policy '{name}' needs the batch pool table (prepare_policies' batch_pools).")
    by_phase = pools_by_phase(pools, "fixed_random" if name == CONTROL else name)
    if name in ("fixed_random", CONTROL):
        batches = by_phase[min(by_phase)]
        if len(batches) != steps:
            raise SelectionDataError(f"fixed_random has {len(batches)} batches, the baseline takes {steps} steps.")
        if name == "fixed_random":
            return FixedOrderPolicy(batches)
        subsets = random_subset_pools(batches, config.learned_keep_fraction, config.recipe.num_phases, seed)
        logger.info("batch_selection: %s, seed %d, trains per phase on %d of the %d batches of %s's ordering",
                    CONTROL, seed, len(subsets[1]), steps, config.fixed_ordering)
        return PoolPolicy(CONTROL, subsets, steps, seed)
    if name in ("paper_advice", "learned"):
        return PoolPolicy(name, by_phase, steps, seed)
    raise SelectionConfigError(f"Unknown policy {name!r}; use one of {', '.join(POLICIES)}.")


