"""The six policies: each picks the batches of every epoch, all taking the same number of steps.

Knows nothing of Kedro. ``shuffle`` (a fresh random partition per epoch, the
baseline), ``fixed_random`` (the null ordering's batches in a fixed order),
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
    pools: pd.DataFrame,
) -> BatchPolicy:
    """The policy ``name`` for one seed, from the split's training ids and the pool table."""
    m = config.batch_size
    steps = len(train_ids) // m
    if name == "shuffle":
        return ShufflePolicy(train_ids, m, seed)
    if name == "oracle":
        return OraclePolicy(train_ids, m, seed, config.oracle_keep_fraction, config.oracle_candidates)
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


