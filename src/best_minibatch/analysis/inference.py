"""The tests behind the verdicts: a rank permutation test and Freedman-Lane's test under a class-composition model.

Knows nothing of Kedro or of the tables; every function takes arrays over the
batches of one ordering and phase (the batches are the units).

* :func:`rank_test`: the primary test of a group comparison. The batches' values are
  ranked and the difference of mean ranks is tested by permuting the group labels
  (exactly the Mann-Whitney test, two-sided). Its effect size is the rank-biserial
  correlation ``2 (mean rank(group) - mean rank(rest)) / K`` in ``[-1, 1]``. Ranks,
  not means, because a few batches far from the full gradient (single-class batches
  sit 2-4 noise units out) widen a mean difference's permutation distribution and
  hide a shift of the bulk; a rank is moved by at most one place by such a batch.
* :func:`freedman_lane`: the group effect with the batches' class composition held
  fixed by regression, for plain orderings whose batches differ in class mix. Model
  ``y = a + b group + composition . c``; the statistic is ``t`` of ``b``; the null
  distribution permutes the residuals of the reduced model ``y ~ composition`` and adds
  them back to its fitted values (Freedman & Lane 1983; Winkler et al. 2014, NeuroImage
  92, show it keeps its level when the nuisance and the effect are correlated, where
  permuting ``y`` or residualising on a single summary does not). Reported with
  ``composition_r2``, the share of the group indicator explained by the composition:
  the test has power only for the part of the group that the composition does not
  predict, so above :data:`SEPARABLE_R2` the group is called not separable from class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations

import numpy as np
from scipy import stats

#: Above this share of the group indicator explained by class composition (a variance inflation
#: factor of 10), the group's own effect is called not separable from the class mix.
SEPARABLE_R2 = 0.9


def _as_extreme(observed: float, permuted: np.ndarray) -> np.ndarray:
    """Which permuted statistics are at least as extreme as ``observed`` (two-sided), with a tolerance so that
    relabellings equal to the observed one up to rounding count."""
    return np.abs(permuted) >= abs(observed) * (1 - 1e-9) - 1e-12


def permutation_p(observed: float, permuted: np.ndarray) -> float:
    """Two-sided Monte-Carlo p ``(count + 1) / (n + 1)``."""
    return float((np.sum(_as_extreme(observed, permuted)) + 1) / (len(permuted) + 1))


def permutation_test(
    values: np.ndarray, in_group: np.ndarray, n_permutations: int, rng: np.random.Generator
) -> tuple[float, float, str]:
    """Two-sided permutation test of ``mean(group) - mean(rest)``; batches are the exchangeable units.

    Enumerates every relabelling when there are at most ``n_permutations`` of them
    (an exact test), otherwise draws ``n_permutations`` random relabellings and
    uses ``(count + 1) / (n + 1)``. Returns the observed difference, the p-value
    and ``"exact"`` or ``"monte carlo"``.
    """
    values = np.asarray(values, dtype=np.float64)
    in_group = np.asarray(in_group, dtype=bool)
    n, k = len(values), int(in_group.sum())
    if k == 0 or k == n:
        raise ValueError(f"A comparison needs batches on both sides; got {k} of {n} in the group.")
    total = values.sum()

    def differences(group_sums: np.ndarray) -> np.ndarray:
        return group_sums / k - (total - group_sums) / (n - k)

    observed = float(differences(np.array([values[in_group].sum()]))[0])
    if math.comb(n, k) <= n_permutations:
        group_sums = values[_all_subsets(n, k)].sum(axis=1)
        return observed, float(np.mean(_as_extreme(observed, differences(group_sums)))), "exact"
    keys = rng.random((n_permutations, n))
    chosen = np.argpartition(keys, k - 1, axis=1)[:, :k]
    return observed, permutation_p(observed, differences(values[chosen].sum(axis=1))), "monte carlo"


@lru_cache(maxsize=32)
def _all_subsets(n: int, k: int) -> np.ndarray:
    """Every ``k``-subset of ``range(n)`` as rows of an index array."""
    return np.array(list(combinations(range(n), k)), dtype=np.int64).reshape(-1, k)


def rank_biserial_of_ranks(ranks: np.ndarray, in_group: np.ndarray) -> float:
    """``2 (mean rank(group) - mean rank(rest)) / n``: the rank-biserial correlation from ranks."""
    return float(2 * (ranks[in_group].mean() - ranks[~in_group].mean()) / len(ranks))


@dataclass(frozen=True)
class RankTest:
    rank_biserial: float
    p_value: float
    method: str


def rank_test(values: np.ndarray, in_group: np.ndarray, n_permutations: int, rng: np.random.Generator) -> RankTest:
    """Two-sided permutation test of the rank-biserial correlation of ``group`` vs ``rest`` (see the module)."""
    ranks = stats.rankdata(np.asarray(values, dtype=np.float64))
    in_group = np.asarray(in_group, dtype=bool)
    _, p_value, method = permutation_test(ranks, in_group, n_permutations, rng)
    return RankTest(rank_biserial_of_ranks(ranks, in_group), p_value, method)


def _design(composition: np.ndarray) -> np.ndarray:
    """Intercept plus the composition columns that vary (a count column summing to m with the others is
    redundant; the least-squares projection below handles that through the pseudo-inverse)."""
    composition = np.asarray(composition, dtype=np.float64)
    varying = composition[:, np.ptp(composition, axis=0) > 0] if composition.size else composition
    return np.column_stack([np.ones(len(composition)), varying])


def composition_varies(composition: np.ndarray) -> bool:
    """Whether the batches' class counts differ by more than one image anywhere (a stratified batching's
    remainder rotation moves counts by one at most: class held fixed by design)."""
    composition = np.asarray(composition, dtype=np.float64)
    return bool(composition.size and np.ptp(composition, axis=0).max() > 1)


@dataclass(frozen=True)
class FreedmanLane:
    coefficient: float       # the group's coefficient b (units of the values), composition held fixed
    t: float
    p_value: float
    composition_r2: float    # R^2 of the group indicator on the composition
    residual_df: int


def _group_residual(in_group: np.ndarray, composition: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """``(projection, g~, g~' g~, composition_r2)``: the composition model's hat matrix, the group indicator
    residualised on it, its sum of squares and the share of the group the composition predicts."""
    z = _design(composition)
    projection = z @ np.linalg.pinv(z)
    g = np.asarray(in_group, dtype=np.float64)
    g_res = g - projection @ g
    g_ss = float(g_res @ g_res)
    total = float(((g - g.mean()) ** 2).sum())
    return projection, g_res, g_ss, (1.0 - g_ss / total if total > 0 else math.nan)


def _explained(g_ss: float, in_group: np.ndarray) -> bool:
    """Whether the composition predicts the group entirely (nothing of it left to estimate an effect from)."""
    g = np.asarray(in_group, dtype=np.float64)
    return g_ss <= 1e-12 * max(float(((g - g.mean()) ** 2).sum()), 1e-300)


def group_coefficient(values: np.ndarray, in_group: np.ndarray, composition: np.ndarray) -> tuple[float, float]:
    """``(b, composition_r2)`` of ``values ~ group + composition`` by least squares (no test)."""
    _, g_res, g_ss, r2 = _group_residual(in_group, composition)
    if _explained(g_ss, in_group):
        return math.nan, r2
    return float(g_res @ np.asarray(values, dtype=np.float64) / g_ss), r2


def freedman_lane(values: np.ndarray, in_group: np.ndarray, composition: np.ndarray, n_permutations: int,
                  rng: np.random.Generator) -> FreedmanLane:
    """Freedman-Lane permutation test of the group's coefficient given the composition (see the module).

    Vectorised over permutations: by Frisch-Waugh-Lovell, ``b = g~' y* / g~' g~`` with
    ``g~`` the group indicator residualised on the composition, and the residual sum of
    squares is ``|M y*|^2 - b^2 g~' g~`` with ``M`` the composition model's residual maker.
    NaN results when the group is entirely explained by the composition or when fewer
    than 2 residual degrees of freedom remain.
    """
    y = np.asarray(values, dtype=np.float64)
    n = len(y)
    projection, g_res, g_ss, r2 = _group_residual(in_group, composition)
    df = n - int(np.linalg.matrix_rank(_design(composition))) - 1
    residual_maker = np.eye(n) - projection
    if df < 2 or _explained(g_ss, in_group):
        return FreedmanLane(math.nan, math.nan, math.nan, r2, df)
    fitted = projection @ y
    residuals = y - fitted

    def t_statistics(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(b, t)`` for each column of ``samples``."""
        b = g_res @ samples / g_ss
        m_samples = residual_maker @ samples
        sse = np.maximum((m_samples**2).sum(axis=0) - b**2 * g_ss, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            return b, b / np.sqrt(sse / df / g_ss)

    b_obs, t_obs = t_statistics(y[:, None])
    chunk = max(1, 2_000_000 // max(n, 1))
    permuted_t = []
    for start in range(0, n_permutations, chunk):
        count = min(chunk, n_permutations - start)
        order = np.argsort(rng.random((count, n)), axis=1)
        samples = fitted[:, None] + residuals[order].T
        permuted_t.append(t_statistics(samples)[1])
    t_value = float(t_obs[0])
    if not np.isfinite(t_value):  # a perfect fit: the effect is exact, every permutation as extreme or less
        return FreedmanLane(float(b_obs[0]), t_value, math.nan, r2, df)
    return FreedmanLane(float(b_obs[0]), t_value, permutation_p(t_value, np.concatenate(permuted_t)), r2, df)
