"""Distance analysis: training phases, noise units, the paper's claims as tests, confounds.

Knows nothing of Kedro. The inputs are the per-ordering tables described in
``docs/data_flow.md`` (``gradient_distances``, ``batch_summary``,
``training_history``); ``docs/analysis.md`` explains every quantity computed here.

Vocabulary:

* an *ordering* is one metric's fixed batching of the training set (``random`` is
  the null control: the same batch size, images assigned at random);
* a *phase* is a run of consecutive epochs with the same learning rate (section
  3.1 of the paper), derived from the tables, never assumed;
* *noise units*: a batch's distance ``||g_k - g_full||`` at epoch ``e`` expressed
  against the null ordering's batches at the same epoch, as a z-score
  ``(d - mean_null(e)) / sd_null(e)`` and as a ratio ``d / mean_null(e)``. Phases
  whose gradient scales differ by orders of magnitude become comparable, and
  ``z = 0`` means "as close as a random batch of the same size";
* a *seed* is one training run of an ordering (``gradient_training.seeds``: other
  initial weights, the same batches). Noise units are taken within a seed's run;
  the per-batch phase statistic pools the seeds (the mean over the phase's epochs
  and the seeds), the permutation test's unit stays the batch, and a claim counts as
  supported only when every seed's own difference has the pooled difference's sign.
  Tables without a ``seed`` column (runs from before seeds) read as seed 0.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from best_minibatch.analysis import inference
from best_minibatch.analysis.inference import permutation_test
from best_minibatch.batches.orderings import control_for, ordering_name, ordering_of
from best_minibatch.config import ConfigError, Section

#: The three measures of ``gradient_distances`` summarised per phase.
DISTANCE_MEASURES = ("distance", "cosine_similarity", "relative_distance")
#: Noise-unit versions of ``distance``.
NOISE_MEASURES = ("noise_z", "noise_ratio")

DISTANCE_COLUMNS = ("ordering", "epoch", "learning_rate", "batch", *DISTANCE_MEASURES)
SUMMARY_COLUMNS = ("batch", "metric_mean", "class_entropy")

UPPER_QUARTILE = "upper_quartile_vs_rest"
EXTREMES = "extremes_vs_middle80"
COMPARISONS = (UPPER_QUARTILE, EXTREMES)
COMPARISON_GROUPS = {
    UPPER_QUARTILE: ("upper quartile of the metric", "other 75%"),
    EXTREMES: ("outer 10% on each side", "middle 80%"),
}

SUPPORTED, CONTRADICTED, UNDECIDED = "supported", "contradicted", "undecided"


def with_seed(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with a ``seed`` column: a table written before seeds existed is one run, seed 0."""
    if "seed" in table.columns:
        return table
    return table.assign(seed=np.zeros(len(table), dtype=np.int64))


class AnalysisInputError(ValueError):
    """An input table or parameter of the distance analysis is unusable; the message says how to fix it."""


# --------------------------------------------------------------------------- phases


def epoch_phase_table(table: pd.DataFrame, name: str) -> pd.DataFrame:
    """One row per epoch of ``table``: its ``phase`` and ``learning_rate`` as gradient_training recorded them.

    ``name`` names the table in errors. An epoch with two phases or two learning
    rates is an error.
    """
    _require_columns(table, ("epoch", "phase", "learning_rate"), name)
    per_epoch = table.groupby("epoch").agg(
        phases=("phase", "nunique"), phase=("phase", "first"),
        rates=("learning_rate", "nunique"), learning_rate=("learning_rate", "first"),
    ).reset_index()
    mixed = per_epoch.loc[(per_epoch["phases"] > 1) | (per_epoch["rates"] > 1), "epoch"].tolist()
    if mixed:
        raise AnalysisInputError(
            f"{name}: epochs {mixed} have rows with different phases or learning rates. Fix the table that "
            "produced it (gradient_training)."
        )
    return pd.DataFrame({
        "epoch": per_epoch["epoch"].astype(np.int64).to_numpy(),
        "learning_rate": per_epoch["learning_rate"].astype(np.float64).to_numpy(),
        "phase": per_epoch["phase"].astype(np.int64).to_numpy(),
    })


def phase_spans(epoch_phases: pd.DataFrame) -> pd.DataFrame:
    """``phase``, ``first_epoch``, ``last_epoch``, ``n_epochs``, ``learning_rate`` of each phase."""
    grouped = epoch_phases.groupby("phase")
    return pd.DataFrame(
        {
            "first_epoch": grouped["epoch"].min(),
            "last_epoch": grouped["epoch"].max(),
            "n_epochs": grouped["epoch"].size(),
            "learning_rate": grouped["learning_rate"].first(),
        }
    ).reset_index()


# --------------------------------------------------------------------------- noise units


def _require_columns(table: pd.DataFrame, columns: Iterable[str], name: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise AnalysisInputError(
            f"{name} lacks the columns {missing} (has {list(table.columns)}); see the schema in "
            "docs/data_flow.md."
        )


def pooled_null_scale(null_rows: pd.DataFrame) -> pd.DataFrame:
    """Per ordering, seed and epoch: the null mean and a noise scale pooled over the phase's epochs and seeds.

    A per-epoch standard deviation from ``R`` null batches is itself noisy (with
    ``R = 10`` about 24 % relative error and ``E[sigma / s] = 1.09``), and it would put
    every epoch on its own, noisy scale. Random batches' distances scale with the
    gradient's size, so the coefficient of variation ``sd / mean`` is what stays put
    within a phase: it is pooled over every null draw of the phase (every epoch and
    seed of the ordering, each epoch centred on its own mean, ``sum (d / mean_e - 1)^2 /
    sum (R_e - 1)``) and turned back into a scale per epoch, ``null_std = null_mean x
    null_cv``. Columns: ``ordering``, ``seed``, ``epoch``, ``null_mean``, ``null_std``,
    ``null_std_epoch`` (the epoch's own sample sd, for reference), ``null_cv`` (pooled)
    and ``null_draws`` (the draws it pools).
    """
    rows = with_seed(null_rows)
    keys = ["ordering", "seed", "epoch"]
    per_epoch = rows.groupby(keys)["distance"].agg(null_mean="mean", null_std_epoch="std", n="size").reset_index()
    if "phase" not in rows:
        rows = rows.assign(phase=1)
    phases = rows.groupby(keys)["phase"].first().reset_index()
    per_epoch = per_epoch.merge(phases, on=keys, how="left")
    deviations = rows.merge(per_epoch[[*keys, "null_mean"]], on=keys, how="left")
    deviations["squared"] = (deviations["distance"] / deviations["null_mean"] - 1.0) ** 2
    pooled = deviations.groupby(["ordering", "phase"])["squared"].sum().rename("ss").reset_index()
    freedom = (per_epoch.assign(df=per_epoch["n"] - 1).groupby(["ordering", "phase"])
               .agg(df=("df", "sum"), null_draws=("n", "sum")).reset_index())
    pooled = pooled.merge(freedom, on=["ordering", "phase"])
    pooled["null_cv"] = np.sqrt(pooled["ss"] / pooled["df"].where(pooled["df"] > 0))
    per_epoch = per_epoch.merge(pooled[["ordering", "phase", "null_cv", "null_draws"]], on=["ordering", "phase"],
                                how="left")
    per_epoch["null_std"] = per_epoch["null_mean"] * per_epoch["null_cv"]
    per_epoch["null_draws"] = per_epoch["null_draws"].astype(np.float64)
    return per_epoch[[*keys, "null_mean", "null_std", "null_std_epoch", "null_cv", "null_draws"]]


def noise_unit_distances(
    distances_by_ordering: Mapping[str, pd.DataFrame], null_ordering: str,
    null_by_ordering: Mapping[str, pd.DataFrame] | None = None,
) -> pd.DataFrame:
    """All orderings' distance rows in one table, with their noise units.

    Two nulls, named everywhere they appear:

    * **same-network** (``null_source == "same_network"``): the ordering's own random
      batches (``{ordering}.null_distances``), probed by the same ``net_compare`` at the
      same epoch-start parameters and compared with the same full gradient; the
      primary noise units whenever the ordering has them;
    * **cross-network** (``*_cross`` columns): the null ordering's batches of the same
      epoch, probed at that run's own parameters; kept as a secondary column, and the
      primary one only for an ordering trained without null batches
      (``null_source == "cross_network"``).

    Added columns: ``null_mean`` (mean of the null distances of the same epoch) and
    ``null_std`` (that mean times the coefficient of variation pooled over the phase's
    epochs and seeds: :func:`pooled_null_scale`), ``noise_z = (distance - null_mean) /
    null_std`` and ``noise_ratio = distance / null_mean``, the same three for the
    cross-network null (``null_mean_cross``, ``noise_z_cross``, ``noise_ratio_cross``)
    and ``null_source``. Orderings with zero rows (skipped metrics) contribute nothing.
    Epochs the null lacks get NaN noise units.

    Seeds: every null is taken within one seed (the same-network null of the
    ordering's run with that seed; the cross-network null of the null ordering's run
    with the same seed), so the output has a ``seed`` column and one row per
    (ordering, seed, epoch, batch).
    """
    if null_ordering not in distances_by_ordering:
        raise AnalysisInputError(
            f"distance_analysis.null_ordering is '{null_ordering}', which is not among the orderings "
            f"{list(distances_by_ordering)}; set it to the ordering whose batches are random."
        )
    frames = []
    for ordering, table in distances_by_ordering.items():
        if len(table) == 0:
            continue
        _require_columns(table, DISTANCE_COLUMNS, f"{ordering}.gradient_distances")
        epoch_phases = epoch_phase_table(table, f"{ordering}.gradient_distances")
        frame = with_seed(table).drop(columns=["phase"], errors="ignore").copy()
        frame["ordering"] = ordering
        frame = frame.merge(epoch_phases[["epoch", "phase"]], on="epoch", how="left")
        frames.append(frame)
    if not any(len(f) and f["ordering"].iat[0] == null_ordering for f in frames):
        raise AnalysisInputError(
            f"The null ordering '{null_ordering}' (distance_analysis.null_ordering) has no distance "
            "rows, so distances cannot be put in noise units. Run gradient_training for it."
        )
    combined = pd.concat(frames, ignore_index=True)
    if "batching" not in combined:
        combined["batching"] = 0
    combined["batching"] = combined["batching"].fillna(0).astype(np.int64)
    null_rows = combined[combined["ordering"] == null_ordering]
    cross = null_rows.groupby(["seed", "epoch"])["distance"].agg(null_mean_cross="mean",
                                                                  null_std_cross="std").reset_index()
    combined = combined.merge(cross, on=["seed", "epoch"], how="left")
    combined["noise_z_cross"] = (combined["distance"] - combined["null_mean_cross"]) / combined["null_std_cross"]
    combined["noise_ratio_cross"] = combined["distance"] / combined["null_mean_cross"]
    same = [with_seed(table).assign(ordering=ordering) for ordering, table in (null_by_ordering or {}).items()
            if len(table)]
    if same:
        own = pooled_null_scale(pd.concat(same, ignore_index=True))
        combined = combined.merge(own, on=["ordering", "seed", "epoch"], how="left")
    else:
        for column in ("null_mean", "null_std", "null_std_epoch", "null_cv", "null_draws"):
            combined[column] = np.nan
    has_own = combined.groupby("ordering")["null_mean"].transform(lambda s: s.notna().any())
    combined["null_source"] = np.where(has_own, "same_network", "cross_network")
    combined.loc[~has_own, "null_mean"] = combined.loc[~has_own, "null_mean_cross"]
    combined.loc[~has_own, "null_std"] = combined.loc[~has_own, "null_std_cross"]
    combined.loc[~has_own, "null_std_epoch"] = combined.loc[~has_own, "null_std_cross"]
    combined["noise_z"] = (combined["distance"] - combined["null_mean"]) / combined["null_std"]
    combined["noise_ratio"] = combined["distance"] / combined["null_mean"]
    columns = [
        "ordering", "seed", "batching", "epoch", "phase", "learning_rate", "batch", *DISTANCE_MEASURES,
        "null_mean", "null_std", *NOISE_MEASURES, "null_source", "null_std_epoch", "null_cv", "null_draws",
        "null_mean_cross", "null_std_cross", "noise_z_cross", "noise_ratio_cross",
    ]
    extra = [c for c in combined.columns if c not in columns]
    combined["seed"] = combined["seed"].astype(np.int64)
    return combined[columns + extra].sort_values(["ordering", "seed", "epoch", "batch"], kind="stable").reset_index(
        drop=True
    )


def _phase_statistics(noise_units: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean and sample standard deviation of every measure over the rows of each ``keys`` group."""
    measures = [*DISTANCE_MEASURES, *NOISE_MEASURES]
    grouped = noise_units.groupby(keys, sort=True)
    stats_table = grouped[measures].agg(["mean", "std"])
    stats_table.columns = [f"{measure}_{stat}" for measure, stat in stats_table.columns]
    spans = grouped["epoch"].agg(n_epochs="nunique", first_epoch="min", last_epoch="max")
    rates = grouped["learning_rate"].first()
    return pd.concat([spans, rates, stats_table], axis=1).reset_index()


def batch_facts(batch_summaries: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Every ordering's batches: ``ordering``, ``batching``, ``batch``, ``metric_mean``, ``class_entropy`` and the
    ``class_count_*`` columns (the class composition), from the ``batch_summary`` tables."""
    summaries = []
    for ordering, summary in batch_summaries.items():
        if len(summary) == 0:
            continue
        _require_columns(summary, SUMMARY_COLUMNS, f"{ordering}.batch_summary")
        counts = [c for c in summary.columns if c.startswith("class_count_")]
        part = summary[[*SUMMARY_COLUMNS, *counts]].copy()
        part["batching"] = summary["batching"].astype(np.int64) if "batching" in summary else 0
        part["ordering"] = ordering
        summaries.append(part)
    if not summaries:
        return pd.DataFrame(columns=["ordering", "batching", *SUMMARY_COLUMNS])
    return pd.concat(summaries, ignore_index=True)


def class_count_columns(table: pd.DataFrame) -> list[str]:
    """The ``class_count_*`` columns of ``table`` (the batch's class composition)."""
    return [c for c in table.columns if c.startswith("class_count_")]


def _with_batch_facts(table: pd.DataFrame, facts: pd.DataFrame, batchings: pd.DataFrame) -> pd.DataFrame:
    """Add the batch's quantile position and its facts (metric mean, class entropy, class counts).

    ``batchings`` (``ordering``, ``seed``, ``batching``) says which batching each seed trained;
    a table with a ``seed`` column gets that seed's batching's facts, a pooled table the mean
    over its seeds' batchings (a control's batch ``k`` is another batch in every seed).
    """
    n_batches = table.groupby(["ordering", "phase"])["batch"].transform("nunique")
    table["batch_position"] = (table["batch"] + 0.5) / n_batches
    if facts.empty:
        table["metric_mean"] = np.nan
        table["class_entropy"] = np.nan
        return table
    per_seed = batchings.merge(facts, on=["ordering", "batching"], how="inner")
    if "seed" in table:
        return table.merge(per_seed.drop(columns=["batching"]), on=["ordering", "seed", "batch"], how="left")
    columns = ["metric_mean", "class_entropy", *class_count_columns(facts)]
    pooled = per_seed.groupby(["ordering", "batch"], sort=False)[columns].mean().reset_index()
    return table.merge(pooled, on=["ordering", "batch"], how="left")


def seed_batchings(noise_units: pd.DataFrame) -> pd.DataFrame:
    """``ordering``, ``seed``, ``batching``: the batching each seed's run trained (0 for tables without one)."""
    table = with_seed(noise_units)
    batching = table["batching"] if "batching" in table else pd.Series(0, index=table.index)
    return (table.assign(batching=batching.fillna(0).astype(np.int64))
            .groupby(["ordering", "seed"])["batching"].first().reset_index())


def batch_orders(noise_units: pd.DataFrame) -> pd.DataFrame:
    """``ordering`` and ``batch_order``: ``fixed`` when every epoch trained batch k at step k (the paper's
    order; tables without ``position`` come from such runs), else ``shuffled``."""
    position = noise_units["position"] if "position" in noise_units else noise_units["batch"]
    fixed = (position.fillna(noise_units["batch"]) == noise_units["batch"]).groupby(noise_units["ordering"]).all()
    return pd.DataFrame({"ordering": fixed.index, "batch_order": np.where(fixed.to_numpy(), "fixed", "shuffled")})


def batch_phase_statistics(
    noise_units: pd.DataFrame, batch_summaries: Mapping[str, pd.DataFrame]
) -> pd.DataFrame:
    """Per ordering, phase and batch: mean and spread over the phase's epochs and the seeds of every measure.

    Columns: ``ordering``, ``phase``, ``batch``, ``n_epochs``, ``first_epoch``,
    ``last_epoch``, ``learning_rate``, ``<measure>_mean`` and ``<measure>_std``
    (sample standard deviation over the phase's epochs of every seed, i.e. over
    ``n_epochs x n_seeds`` values; NaN for a one-epoch phase of one seed) for the
    three distance measures and the two noise units, ``batch_position`` (the
    batch's quantile position ``(batch + 0.5) / K`` in ascending metric order), the
    batch's ``metric_mean``, ``class_entropy`` and ``class_count_*`` from its
    ``batch_summary`` (for a control, whose seeds train batchings of their own, the
    mean over the seeds' batchings), ``batch_order``, ``n_seeds`` and
    ``noise_z_seed_sd`` (the sample standard deviation over seeds of each seed's
    phase-mean ``noise_z``; NaN with one seed). Every seed runs the same epochs, so
    the pooled mean is also the mean of the seeds' phase means.
    """
    noise_units = with_seed(noise_units)
    table = _phase_statistics(noise_units, ["ordering", "phase", "batch"])
    per_seed = noise_units.groupby(["ordering", "phase", "batch", "seed"], sort=True)["noise_z"].mean()
    spread = per_seed.groupby(level=["ordering", "phase", "batch"]).agg(n_seeds="size", noise_z_seed_sd="std")
    table = table.merge(spread.reset_index(), on=["ordering", "phase", "batch"], how="left")
    table = _with_batch_facts(table, batch_facts(batch_summaries), seed_batchings(noise_units))
    table = table.merge(batch_orders(noise_units), on="ordering", how="left")
    first = ["ordering", "phase", "batch"]
    last = ["n_seeds", "noise_z_seed_sd"]
    return table[first + [c for c in table.columns if c not in first + last] + last]


def batch_phase_statistics_by_seed(
    noise_units: pd.DataFrame, batch_summaries: Mapping[str, pd.DataFrame]
) -> pd.DataFrame:
    """:func:`batch_phase_statistics` of each seed's run on its own: one row per ordering, seed, phase and batch
    (with the facts of the batching that seed trained)."""
    noise_units = with_seed(noise_units)
    table = _phase_statistics(noise_units, ["ordering", "seed", "phase", "batch"])
    table = _with_batch_facts(table, batch_facts(batch_summaries), seed_batchings(noise_units))
    return table.merge(batch_orders(noise_units), on="ordering", how="left")


# --------------------------------------------------------------------------- group comparisons


def group_mask(batch_position: np.ndarray, comparison: str) -> np.ndarray:
    """Which batches form the group of ``comparison``, from their quantile positions in ``(0, 1)``.

    ``upper_quartile_vs_rest``: position above 0.75. ``extremes_vs_middle80``:
    position below 0.10 or above 0.90 (the outer 10% on each side).
    """
    position = np.asarray(batch_position, dtype=np.float64)
    if comparison == UPPER_QUARTILE:
        return position > 0.75
    if comparison == EXTREMES:
        return (position < 0.10) | (position > 0.90)
    raise AnalysisInputError(f"Unknown comparison '{comparison}'; use one of {COMPARISONS}.")


def minimum_batches() -> int:
    """The fewest batches per ordering for which every claim's comparison has batches on both sides.

    Batch ``k`` of ``K`` sits at position ``(k + 0.5) / K``; the extremes group
    (below 0.10 or above 0.90) is the last to fill: it first holds a batch at K = 6.
    """
    for count in range(2, 10_000):
        positions = (np.arange(count) + 0.5) / count
        if all(0 < group_mask(positions, c).sum() < count for c in COMPARISONS):
            return count
    raise AnalysisInputError("No batch count satisfies the comparisons.")


def cohens_d(group: np.ndarray, rest: np.ndarray) -> float:
    """``(mean(group) - mean(rest)) / pooled sample standard deviation``; NaN when undefined."""
    n1, n2 = len(group), len(rest)
    if n1 < 2 or n2 < 2:
        return float("nan")
    pooled = ((n1 - 1) * np.var(group, ddof=1) + (n2 - 1) * np.var(rest, ddof=1)) / (n1 + n2 - 2)
    if pooled <= 0:
        return float("nan")
    return float((np.mean(group) - np.mean(rest)) / np.sqrt(pooled))


def rank_biserial(group: np.ndarray, rest: np.ndarray) -> float:
    """``P(group > rest) - P(group < rest)`` over all pairs (Mann-Whitney based), in ``[-1, 1]``."""
    difference = np.subtract.outer(np.asarray(group, float), np.asarray(rest, float))
    return float(np.mean(np.sign(difference)))


def holm_adjust(p_values: Iterable[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error), NaN entries left out of the family."""
    p = np.asarray(list(p_values), dtype=np.float64)
    adjusted = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    if len(valid) == 0:
        return adjusted
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    running = 0.0
    for i, index in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[index]))
        adjusted[index] = running
    return adjusted


def residualise(values: np.ndarray, covariate: np.ndarray) -> np.ndarray:
    """``values`` minus their least-squares line on ``covariate``, plus the mean of ``values``.

    Keeping the mean leaves differences between groups on the original scale. A
    constant or missing covariate leaves ``values`` unchanged.
    """
    values = np.asarray(values, dtype=np.float64)
    covariate = np.asarray(covariate, dtype=np.float64)
    if np.any(np.isnan(covariate)) or np.ptp(covariate) == 0:
        return values.copy()
    slope, intercept = np.polyfit(covariate, values, 1)
    return values - (slope * covariate + intercept) + values.mean()


def _stable_seed(seed: int, *names: object) -> np.random.Generator:
    """A generator that depends on ``seed`` and the names only, not on iteration order."""
    return np.random.default_rng([seed, zlib.crc32("/".join(map(str, names)).encode())])


def _composition(part: pd.DataFrame) -> np.ndarray:
    """The batches' class counts (rows in ``part``'s order); an empty matrix when unknown."""
    columns = class_count_columns(part)
    if not columns:
        return np.zeros((len(part), 0))
    counts = part[columns].to_numpy(dtype=np.float64)
    return counts if np.isfinite(counts).all() else np.zeros((len(part), 0))


def seed_group_differences(batch_stats_by_seed: pd.DataFrame, measure: str = "noise_z_mean") -> pd.DataFrame:
    """For every ordering, seed, phase and comparison: that seed's own group difference (no test).

    The same groups and statistics as :func:`compare_batch_groups`, on one seed's
    per-batch phase means (:func:`batch_phase_statistics_by_seed`): ``mean_group``,
    ``mean_rest``, ``difference``, ``cohens_d``, ``rank_biserial`` (the primary
    statistic) and ``adjusted_difference`` (the group's coefficient with the seed's
    batches' class composition held fixed; NaN when the composition does not vary or
    explains the group). A seed whose values are not all finite gets NaN.
    """
    rows = []
    for (ordering, phase, seed), part in batch_stats_by_seed.groupby(["ordering", "phase", "seed"], sort=True):
        part = part.sort_values("batch")
        values = part[measure].to_numpy(dtype=np.float64)
        finite = bool(np.all(np.isfinite(values)))
        composition = _composition(part)
        for comparison in COMPARISONS:
            in_group = group_mask(part["batch_position"].to_numpy(), comparison)
            row = {"ordering": ordering, "phase": int(phase), "comparison": comparison, "seed": int(seed),
                   "measure": measure, "n_group": int(in_group.sum()), "n_rest": int((~in_group).sum())}
            if finite and 0 < in_group.sum() < len(in_group):
                adjusted = (inference.group_coefficient(values, in_group, composition)[0]
                            if inference.composition_varies(composition) else math.nan)
                row.update(mean_group=float(values[in_group].mean()), mean_rest=float(values[~in_group].mean()),
                           difference=float(values[in_group].mean() - values[~in_group].mean()),
                           cohens_d=cohens_d(values[in_group], values[~in_group]),
                           rank_biserial=rank_biserial(values[in_group], values[~in_group]),
                           adjusted_difference=adjusted)
            rows.append(row)
    columns = ["ordering", "phase", "comparison", "seed", "measure", "n_group", "n_rest", "mean_group", "mean_rest",
               "difference", "cohens_d", "rank_biserial", "adjusted_difference"]
    return pd.DataFrame(rows).reindex(columns=columns)


def seeds_agreeing(pooled: float, per_seed: Iterable[float]) -> int:
    """How many seeds' differences have the (non-zero) sign of the pooled difference; NaN never agrees."""
    if not np.isfinite(pooled) or pooled == 0:
        return 0
    return int(sum(1 for d in per_seed if np.isfinite(d) and np.sign(d) == np.sign(pooled)))


def _seed_agreement(table: pd.DataFrame, by_seed: pd.DataFrame) -> pd.DataFrame:
    """Add ``n_seeds``, ``seeds_agreeing`` (on the primary statistic, the rank-biserial correlation),
    ``adjusted_seeds_agreeing`` and ``seed_differences`` to comparisons."""
    keys = ["ordering", "phase", "comparison"]
    grouped = {key: part.sort_values("seed") for key, part in by_seed.groupby(keys, sort=False)}
    n_seeds, agreeing, adjusted_agreeing, texts = [], [], [], []
    for row in table.itertuples(index=False):
        part = grouped.get((row.ordering, row.phase, row.comparison))
        if part is None or not len(part):
            n_seeds.append(0)
            agreeing.append(0)
            adjusted_agreeing.append(0)
            texts.append("")
            continue
        n_seeds.append(len(part))
        agreeing.append(seeds_agreeing(getattr(row, "rank_biserial", np.nan), part["rank_biserial"]))
        adjusted_agreeing.append(seeds_agreeing(getattr(row, "adjusted_difference", np.nan),
                                                part["adjusted_difference"]))
        texts.append("; ".join(f"seed {int(s)}: {d:+.3f}" for s, d in zip(part["seed"], part["rank_biserial"])))
    return table.assign(n_seeds=np.asarray(n_seeds, dtype=np.int64), seeds_agreeing=np.asarray(agreeing, np.int64),
                        adjusted_seeds_agreeing=np.asarray(adjusted_agreeing, np.int64), seed_differences=texts)


#: ``adjusted_test`` when the adjustment is not needed or cannot work.
CLASS_FIXED = "not needed: class held fixed by design"
NOT_SEPARABLE = "not separable from class composition"


def _difference_in(part: pd.DataFrame, column: str, in_group: np.ndarray) -> float:
    if column not in part:
        return math.nan
    values = part[column].to_numpy(dtype=np.float64)
    return float(values[in_group].mean() - values[~in_group].mean())


def compare_batch_groups(
    batch_stats: pd.DataFrame,
    measure: str = "noise_z_mean",
    n_permutations: int = 20000,
    seed: int = 0,
    batch_stats_by_seed: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """For every ordering, phase and comparison: the group difference, effect sizes and p-values.

    The units are batches; each batch contributes its mean of ``measure`` over the
    phase's epochs and the seeds (:func:`batch_phase_statistics`).

    * **Primary** (``rank_biserial``, ``p_value``): the rank permutation test
      (:func:`best_minibatch.analysis.inference.rank_test`); ``rank_biserial < 0``
      means the group's gradients are closer to the full gradient.
    * Beside it: ``difference = mean(group) - mean(rest)`` in noise units with its own
      permutation p (``mean_p_value``), Cohen's d, and the same difference in raw
      distance (``distance_difference``) and in noise ratio (``ratio_difference``),
      which do not depend on the null's scale.
    * **Class composition held fixed** (``adjusted_*``): Freedman-Lane's test of the
      group's coefficient in ``measure ~ group + class counts``
      (:func:`~best_minibatch.analysis.inference.freedman_lane`), with
      ``composition_r2`` (how much of the group the composition predicts) and
      ``adjusted_test`` saying what was done: ``freedman-lane``, :data:`CLASS_FIXED`
      (the batches' class counts differ by at most one: a stratified ordering) or
      :data:`NOT_SEPARABLE` (``composition_r2`` above
      :data:`~best_minibatch.analysis.inference.SEPARABLE_R2`).

    ``p_holm`` / ``adjusted_p_holm`` are Holm-adjusted over all rows of this table
    (every ordering, the controls included: a screening table; the verdicts'
    family is :func:`claim_verdicts`'). With ``batch_stats_by_seed`` each row also gets
    ``n_seeds``, ``seeds_agreeing`` (seeds whose own rank-biserial has the pooled
    sign; ``adjusted_seeds_agreeing`` likewise for the adjusted coefficient) and
    ``seed_differences``; without it the table is one seed that agrees with itself.
    ``batch_order`` is carried from ``batch_stats``.
    """
    rows = []
    for (ordering, phase), part in batch_stats.groupby(["ordering", "phase"], sort=True):
        part = part.sort_values("batch")
        values = part[measure].to_numpy(dtype=np.float64)
        composition = _composition(part)
        order = str(part["batch_order"].iat[0]) if "batch_order" in part else "fixed"
        for comparison in COMPARISONS:
            in_group = group_mask(part["batch_position"].to_numpy(), comparison)
            if not np.all(np.isfinite(values)):
                # e.g. the null batches had no spread at some epoch: no noise units
                rows.append({"ordering": ordering, "phase": int(phase), "comparison": comparison,
                             "measure": measure, "n_group": int(in_group.sum()), "batch_order": order,
                             "n_rest": int((~in_group).sum()), "test": "not computable (non-finite values)"})
                continue
            ranked = inference.rank_test(values, in_group, n_permutations, _stable_seed(seed, ordering, phase,
                                                                                        comparison, "rank"))
            difference, mean_p, method = permutation_test(values, in_group, n_permutations,
                                                          _stable_seed(seed, ordering, phase, comparison))
            row = {
                "ordering": ordering,
                "phase": int(phase),
                "comparison": comparison,
                "batch_order": order,
                "group": COMPARISON_GROUPS[comparison][0],
                "rest": COMPARISON_GROUPS[comparison][1],
                "group_batches": " ".join(map(str, part["batch"].to_numpy()[in_group])),
                "n_group": int(in_group.sum()),
                "n_rest": int((~in_group).sum()),
                "measure": measure,
                "rank_biserial": ranked.rank_biserial,
                "p_value": ranked.p_value,
                "test": f"rank permutation ({ranked.method})",
                "mean_group": float(values[in_group].mean()),
                "mean_rest": float(values[~in_group].mean()),
                "difference": difference,
                "mean_p_value": mean_p,
                "cohens_d": cohens_d(values[in_group], values[~in_group]),
                "distance_difference": _difference_in(part, "distance_mean", in_group),
                "ratio_difference": _difference_in(part, "noise_ratio_mean", in_group),
            }
            if not inference.composition_varies(composition):
                row.update(adjusted_test=CLASS_FIXED, adjusted_difference=math.nan, adjusted_t=math.nan,
                           adjusted_p_value=math.nan, composition_r2=math.nan)
            else:
                fitted = inference.freedman_lane(values, in_group, composition, n_permutations,
                                                 _stable_seed(seed, ordering, phase, comparison, "freedman-lane"))
                separable = np.isfinite(fitted.composition_r2) and fitted.composition_r2 <= inference.SEPARABLE_R2
                row.update(adjusted_test="freedman-lane" if separable and np.isfinite(fitted.p_value)
                           else NOT_SEPARABLE if not separable else "not computable (too few batches)",
                           adjusted_difference=fitted.coefficient, adjusted_t=fitted.t,
                           adjusted_p_value=fitted.p_value if separable else math.nan,
                           composition_r2=fitted.composition_r2)
            rows.append(row)
    table = pd.DataFrame(rows)
    for column in ("rank_biserial", "p_value", "difference", "adjusted_difference", "adjusted_p_value"):
        if column not in table:
            table[column] = np.nan
    if len(table):
        table["p_holm"] = holm_adjust(table["p_value"])
        table["adjusted_p_holm"] = holm_adjust(table["adjusted_p_value"])
    if batch_stats_by_seed is None:
        # One seed: it is the pooled run, so it agrees with itself whenever there is a non-zero difference.
        one = [seeds_agreeing(d, [d]) for d in table["rank_biserial"]]
        adjusted = [seeds_agreeing(d, [d]) for d in table["adjusted_difference"]]
        return table.assign(n_seeds=np.ones(len(table), dtype=np.int64), seeds_agreeing=np.asarray(one, np.int64),
                            adjusted_seeds_agreeing=np.asarray(adjusted, np.int64),
                            seed_differences=[f"{d:+.3f}" if np.isfinite(d) else "" for d in table["rank_biserial"]])
    return _seed_agreement(table, seed_group_differences(batch_stats_by_seed, measure))


# --------------------------------------------------------------------------- the paper's claims


@dataclass(frozen=True)
class Claim:
    """One conclusion of the paper's section 5, as a directional group comparison.

    ``expected_sign`` is the sign of ``mean(group) - mean(rest)`` (in noise units)
    that the claim predicts: -1 when the group should be closer to the full
    gradient, +1 when it should be farther. ``phases`` is ``"first"`` or
    ``"after_first"`` (every phase after the first, each tested on its own).
    """

    claim_id: str
    statement: str
    metrics: tuple[str, ...]
    phases: str
    comparison: str
    expected_sign: int


PAPER_METRICS = ("intensity", "color", "edges", "perceptual")

PAPER_CLAIMS = (
    Claim(
        "first_phase_upper_quartile_closest",
        "First phase: batches in the upper quartile of the metric are closest to the full gradient",
        ("intensity", "perceptual"), "first", UPPER_QUARTILE, -1,
    ),
    Claim(
        "first_phase_color_extremes_better",
        "First phase: batches outside the middle 80% of colour are better than the middle 80%",
        ("color",), "first", EXTREMES, -1,
    ),
    Claim(
        "first_phase_edges_middle_better",
        "First phase: the middle 80% of edge batches is better than the extremes",
        ("edges",), "first", EXTREMES, +1,
    ),
    Claim(
        "later_phases_extremes_worse",
        "After the first phase: batches at the extremes of every metric are worst",
        PAPER_METRICS, "after_first", EXTREMES, +1,
    ),
)


def verdict(difference: float, p_holm: float, expected_sign: int, alpha: float,
            seeds_agreeing: int | None = None, n_seeds: int | None = None) -> str:
    """``supported`` / ``contradicted`` when significant at ``alpha`` in / against the claimed direction.

    With seeds: only when, besides, every one of the ``n_seeds`` seeds' own
    differences has the pooled difference's sign (``seeds_agreeing == n_seeds``);
    otherwise ``undecided``. One seed always agrees with itself, so with one seed
    the rule is the plain pooled test.
    """
    if np.isnan(p_holm) or np.isnan(difference) or p_holm >= alpha or difference == 0:
        return UNDECIDED
    if n_seeds is not None and (seeds_agreeing is None or seeds_agreeing < n_seeds):
        return UNDECIDED
    return SUPPORTED if np.sign(difference) == expected_sign else CONTRADICTED


#: Final readings that are not a test's result.
CONTROL_FAILS = "invalid: control fails"
FIXED_ORDER = "confounded: fixed order"
#: ``attribution`` of a claim from its plain and stratified orderings' verdicts.
ATTRIBUTIONS = {
    "metric": "metric (class held fixed)",
    "class": "class mix (no effect with class held fixed)",
    "none": "none detected",
    "not assessed": "not assessed",
}


def _not_tested_reason(ordering: str, status: pd.DataFrame, n_phases: Mapping[str, int], claim: Claim) -> str:
    if ordering not in status.index:
        return "not tested (ordering not in this run)"
    if status.at[ordering, "status"] == "skipped":
        return f"not tested (metric skipped: {status.at[ordering, 'reason']})"
    if status.at[ordering, "status"] == "off":
        return f"not tested (ordering off: {status.at[ordering, 'reason']})"
    if ordering not in n_phases:
        return f"not tested (no distances: {status.at[ordering, 'reason'] or 'empty table'})"
    if claim.phases != "first" and n_phases[ordering] < 2:
        return "not tested (the run has only one phase)"
    return ""


def _gated(test_result: str, batch_order: str, control_result: str) -> str:
    """The final reading of a test's verdict: the fixed order's confound, then the control's gate."""
    if batch_order == "fixed":
        return FIXED_ORDER
    if control_result in (SUPPORTED, CONTRADICTED):
        return CONTROL_FAILS
    return test_result


def claim_verdicts(
    comparisons: pd.DataFrame,
    ordering_status: pd.DataFrame,
    alpha: float = 0.05,
    claims: Iterable[Claim] = PAPER_CLAIMS,
    null_ordering: str = "random",
) -> pd.DataFrame:
    """Each claim, per metric, ordering kind (plain, stratified) and phase, with the numbers and a verdict.

    **Test** (``test_verdict``): the primary rank test (``rank_biserial``, ``p_value``)
    with Holm's correction and the seed rule (:func:`verdict`); ``adjusted_test_verdict``
    likewise for Freedman-Lane's test with the class composition held fixed (plain
    orderings). **One family**: Holm runs once over every p-value the verdicts read,
    the primary and the adjusted ones of every tested row together (``p_holm``,
    ``adjusted_p_holm``). ``pooled_verdict``: the primary test without the seed rule.

    **Gate** (``control``, ``control_verdict``): the ordering's control (the null
    ordering of the same kind: ``random`` for plain, ``random_stratified`` for
    stratified orderings) gets the same comparison, phase and claimed sign, tested at
    the unadjusted ``alpha`` with the seed rule (the stricter gate). When the control
    itself gets a verdict, the claim's reading is :data:`CONTROL_FAILS`.

    **Final reading** (``verdict``, ``adjusted_verdict``): ``not tested (...)``, else
    :data:`FIXED_ORDER` in a fixed-order run (a batch's rank is its place in the epoch),
    else the gate, else the test's verdict. ``adjusted_verdict`` of a stratified
    ordering reads :data:`CLASS_FIXED`; of an inseparable plain one, :data:`NOT_SEPARABLE`.

    **Attribution** (``attribution``, the same on a claim's plain and stratified rows):
    ``metric (class held fixed)`` when the stratified ordering's verdict is supported or
    contradicted; ``class mix (no effect with class held fixed)`` when only the plain
    ordering's is; ``none detected``; ``not assessed`` when either reading is not a test
    result (not tested, gated, confounded).
    """
    status = ordering_status.set_index("ordering")
    n_phases = comparisons.groupby("ordering")["phase"].max().to_dict() if len(comparisons) else {}
    run_phases = max(n_phases.values(), default=0)
    indexed = comparisons.set_index(["ordering", "phase", "comparison"]) if len(comparisons) else None
    number_columns = (
        "batch_order", "group_batches", "n_group", "n_rest", "rank_biserial", "p_value", "test", "mean_group",
        "mean_rest", "difference", "mean_p_value", "cohens_d", "distance_difference", "ratio_difference",
        "adjusted_test", "adjusted_difference", "adjusted_t", "adjusted_p_value", "composition_r2",
        "n_seeds", "seeds_agreeing", "adjusted_seeds_agreeing", "seed_differences",
    )

    def numbers_of(ordering: str, phase: int, comparison: str) -> dict | None:
        if indexed is None or (ordering, phase, comparison) not in indexed.index:
            return None
        found = indexed.loc[(ordering, phase, comparison)]
        return {key: found[key] for key in number_columns if key in found.index}

    rows = []
    for claim in claims:
        for metric in claim.metrics:
            for stratified in (False, True):
                ordering = ordering_name(metric, stratified)
                base = {
                    "claim_id": claim.claim_id, "claim": claim.statement, "ordering": ordering, "metric": metric,
                    "stratified": stratified, "comparison": claim.comparison,
                    "group": COMPARISON_GROUPS[claim.comparison][0], "rest": COMPARISON_GROUPS[claim.comparison][1],
                    "expected": "group closer" if claim.expected_sign < 0 else "group farther",
                    "expected_sign": claim.expected_sign, "control": control_for(ordering, null_ordering),
                }
                reason = _not_tested_reason(ordering, status, n_phases, claim)
                if reason:
                    if stratified and (ordering not in status.index or status.at[ordering, "status"] == "off"):
                        continue  # a run without stratified orderings: no rows for them
                    phases = ([1] if claim.phases == "first" else list(range(2, run_phases + 1))) or [
                        1 if claim.phases == "first" else 2]
                    rows.extend({**base, "phase": phase, "not_tested": reason} for phase in phases)
                    continue
                phases = [1] if claim.phases == "first" else list(range(2, n_phases[ordering] + 1))
                for phase in phases:
                    rows.append({**base, "phase": phase, "not_tested": "",
                                 **(numbers_of(ordering, phase, claim.comparison) or {})})
    table = pd.DataFrame(rows)
    for column in number_columns:
        if column not in table:
            table[column] = np.nan
    tested = (table["not_tested"] == "").to_numpy()
    # One Holm family: every primary and adjusted p-value that a verdict reads.
    primary = np.where(tested, table["p_value"].astype(float), np.nan)
    adjusted = np.where(tested, table["adjusted_p_value"].astype(float), np.nan)
    family = holm_adjust(np.concatenate([primary, adjusted]))
    table["p_holm"] = family[: len(table)]
    table["adjusted_p_holm"] = family[len(table):]
    results: dict[str, list] = {name: [] for name in (
        "test_verdict", "adjusted_test_verdict", "pooled_verdict", "control_verdict", "adjusted_control_verdict",
        "verdict", "adjusted_verdict")}
    for row in table.itertuples():
        if row.not_tested:
            for values in results.values():
                values.append(row.not_tested)
            continue
        n_seeds = int(row.n_seeds)
        test_result = verdict(row.rank_biserial, row.p_holm, row.expected_sign, alpha, int(row.seeds_agreeing),
                              n_seeds)
        adjusted_result = verdict(row.adjusted_difference, row.adjusted_p_holm, row.expected_sign, alpha,
                                  int(row.adjusted_seeds_agreeing), n_seeds)
        control = numbers_of(row.control, row.phase, row.comparison)
        if control is None:
            control_result = adjusted_control = "no control in this run"
        else:
            control_result = verdict(control["rank_biserial"], control["p_value"], row.expected_sign, alpha,
                                     int(control["seeds_agreeing"]), int(control["n_seeds"]))
            adjusted_control = verdict(control["adjusted_difference"], control["adjusted_p_value"],
                                       row.expected_sign, alpha, int(control["adjusted_seeds_agreeing"]),
                                       int(control["n_seeds"]))
        results["test_verdict"].append(test_result)
        results["adjusted_test_verdict"].append(adjusted_result)
        results["pooled_verdict"].append(verdict(row.rank_biserial, row.p_holm, row.expected_sign, alpha))
        results["control_verdict"].append(control_result)
        results["adjusted_control_verdict"].append(adjusted_control)
        results["verdict"].append(_gated(test_result, row.batch_order, control_result))
        if row.adjusted_test == CLASS_FIXED:
            results["adjusted_verdict"].append(CLASS_FIXED)
        elif row.adjusted_test != "freedman-lane":
            r2 = row.composition_r2
            results["adjusted_verdict"].append(f"{row.adjusted_test} (R^2 = {r2:.2f})" if np.isfinite(r2)
                                               else str(row.adjusted_test))
        else:
            results["adjusted_verdict"].append(_gated(adjusted_result, row.batch_order, adjusted_control))
    for name, values in results.items():
        table[name] = values
    table["attribution"] = _attributions(table)
    table["alpha"] = alpha
    table["phase"] = table["phase"].astype(np.int64)
    return table.drop(columns=["not_tested"])


def claim_answers(claims: pd.DataFrame) -> pd.DataFrame:
    """One row per claim, metric and phase that has both orderings: the plain ordering's verdict and
    rank-biserial, its verdict with the composition held fixed, the stratified ordering's verdict and
    rank-biserial, and the attribution (what the report's and the results page's answer tables show)."""
    rows = []
    if "stratified" not in claims or not claims["stratified"].any():
        return pd.DataFrame(rows)
    for (claim_id, metric, phase), part in claims.groupby(["claim_id", "metric", "phase"], sort=False):
        plain, stratified = part[~part["stratified"]], part[part["stratified"]]
        if plain.empty or stratified.empty:
            continue
        p, q = plain.iloc[0], stratified.iloc[0]
        rows.append({"claim_id": claim_id, "claim": p["claim"], "metric": metric, "phase": int(phase),
                     "plain": p["verdict"], "plain_rank_biserial": p["rank_biserial"],
                     "adjusted": p["adjusted_verdict"], "stratified": q["verdict"],
                     "stratified_rank_biserial": q["rank_biserial"], "attribution": p["attribution"]})
    return pd.DataFrame(rows)


def _attributions(table: pd.DataFrame) -> list[str]:
    """:data:`ATTRIBUTIONS` of every row from its claim's plain and stratified final readings."""
    readings = {(r.claim_id, r.metric, r.phase, r.stratified): r.verdict for r in table.itertuples()}
    decided = (SUPPORTED, CONTRADICTED)
    out = []
    for row in table.itertuples():
        plain = readings.get((row.claim_id, row.metric, row.phase, False))
        stratified = readings.get((row.claim_id, row.metric, row.phase, True))
        if plain not in (*decided, UNDECIDED) or stratified not in (*decided, UNDECIDED):
            out.append(ATTRIBUTIONS["not assessed"])
        elif stratified in decided:
            out.append(ATTRIBUTIONS["metric"])
        elif plain in decided:
            out.append(ATTRIBUTIONS["class"])
        else:
            out.append(ATTRIBUTIONS["none"])
    return out


# --------------------------------------------------------------------------- confounds


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``x`` with the same row of ``y`` (NaN when a row is constant)."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((xc**2).sum(axis=-1) * (yc**2).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (xc * yc).sum(axis=-1) / denominator, np.nan)


def _spearman_rows(x: np.ndarray, y: np.ndarray, z: np.ndarray | None = None) -> np.ndarray:
    """Spearman (or, with ``z``, partial Spearman given ``z``) correlation per row."""
    rx, ry = stats.rankdata(x, axis=-1), stats.rankdata(y, axis=-1)
    r_xy = _pearson_rows(rx, ry)
    if z is None:
        return r_xy
    rz = stats.rankdata(z, axis=-1)
    r_xz, r_yz = _pearson_rows(rx, rz), _pearson_rows(ry, rz)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (r_xy - r_xz * r_yz) / np.sqrt((1 - r_xz**2) * (1 - r_yz**2))


def spearman_with_ci(
    x: np.ndarray,
    y: np.ndarray,
    n_bootstrap: int,
    rng: np.random.Generator,
    confidence: float = 0.95,
    given: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """Spearman's rho of ``x`` with ``y`` (partial, given ``given``) and a percentile bootstrap interval.

    Batches are resampled with replacement; resamples where a variable is constant
    are dropped. Returns ``(rho, low, high)``; NaN when undefined.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    z = None if given is None else np.asarray(given, float)
    rho = float(_spearman_rows(x[None], y[None], None if z is None else z[None])[0])
    if np.isnan(rho):
        return rho, float("nan"), float("nan")
    index = rng.integers(0, len(x), size=(n_bootstrap, len(x)))
    boot = _spearman_rows(x[index], y[index], None if z is None else z[index])
    boot = boot[np.isfinite(boot)]
    if len(boot) == 0:
        return rho, float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail])
    return rho, float(low), float(high)


def confound_correlations(
    batch_stats: pd.DataFrame,
    measure: str = "noise_z_mean",
    n_bootstrap: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Per ordering and phase: rank correlations of the batch's distance with its metric and class mix.

    Three rows per ordering and phase: ``metric_mean`` vs distance, ``class_entropy``
    vs distance, and ``metric_mean`` vs distance given ``class_entropy`` (partial
    Spearman), each with a bootstrap confidence interval. A metric effect that is
    really a class-mix effect shows as a partial correlation near zero.
    """
    pairs = (
        ("metric_mean", None, "Spearman(batch metric mean, distance)"),
        ("class_entropy", None, "Spearman(batch class entropy, distance)"),
        ("metric_mean", "class_entropy", "partial Spearman(batch metric mean, distance | class entropy)"),
    )
    rows = []
    for (ordering, phase), part in batch_stats.groupby(["ordering", "phase"], sort=True):
        y = part[measure].to_numpy(float)
        for variable, given, description in pairs:
            x = part[variable].to_numpy(float)
            z = None if given is None else part[given].to_numpy(float)
            rng = _stable_seed(seed, ordering, phase, variable, given)
            if np.any(np.isnan(x)) or (z is not None and np.any(np.isnan(z))):
                rho = low = high = float("nan")
            else:
                rho, low, high = spearman_with_ci(x, y, n_bootstrap, rng, confidence, given=z)
            rows.append(
                {
                    "ordering": ordering,
                    "phase": int(phase),
                    "variable": variable,
                    "given": given or "",
                    "description": description,
                    "measure": measure,
                    "n_batches": len(part),
                    "spearman": rho,
                    "ci_low": low,
                    "ci_high": high,
                    "confidence": confidence,
                    "ci_excludes_zero": bool(np.isfinite(low) and (low > 0 or high < 0)),
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- place in the epoch


def position_effects(noise_units: pd.DataFrame) -> pd.DataFrame:
    """Per ordering and phase: a batch's distance against its rank in the sorted order and its place in training.

    The probe measures every batch at the epoch-start parameters θ_e, which the
    previous epoch's steps produced, the last of them most recently. So for each
    (ordering, seed, epoch e > first) three within-epoch Spearman correlations over
    the batches: distance with the batch's rank (its number: its place in the sorted
    order), with its ``position`` in epoch e-1 (0 = trained first, so largest = most
    recently trained before θ_e), and with the rank given that position (partial).
    In the paper's fixed order the rank *is* the position, the first two coincide and
    the partial is undefined (NaN); with ``gradient_training.batch_order: shuffled``
    they separate. Distances are compared within an epoch only, so raw distance and
    noise units give the same ranks.

    One row per ordering and phase: ``batch_order`` (fixed / shuffled / mixed),
    ``n_units`` (seed-epochs), ``n_batchings`` and, for each correlation, the mean over
    units, its standard error and the number of units with a negative correlation.
    The standard error takes the *batching* as the unit (the mean of each batching's
    seed-epochs, then their spread over batchings): seed-epochs that share one batching
    share its batches and are not independent. A metric ordering has one batching, so its
    standard error is NaN (no replication of the batching to estimate it from); a
    control has one per seed. Tables from before ``position`` existed are fixed-order runs.
    """
    columns = ["ordering", "phase", "batch_order", "n_units", "n_batchings", "n_batches",
               *(f"{name}_{part}" for name in ("rank", "previous_position", "rank_given_position")
                 for part in ("spearman", "se", "negative"))]
    table = with_seed(noise_units)
    positions = table["position"] if "position" in table else pd.Series(np.nan, index=table.index)
    table = table.assign(position=positions.fillna(table["batch"]))
    if "batching" not in table:
        table = table.assign(batching=0)
    units = []
    for (ordering, seed), run in table.groupby(["ordering", "seed"], sort=True):
        batching = int(run["batching"].iat[0])
        epochs = {int(e): part.sort_values("batch") for e, part in run.groupby("epoch", sort=True)}
        for epoch, current in epochs.items():
            previous = epochs.get(epoch - 1)
            if previous is None or not np.array_equal(previous["batch"].to_numpy(), current["batch"].to_numpy()):
                continue
            rank = current["batch"].to_numpy(float)
            distance = current["distance"].to_numpy(float)
            place = previous["position"].to_numpy(float)
            shuffled = not np.array_equal(place, rank)  # else the partial correlation is undefined
            units.append({
                "ordering": ordering, "phase": int(current["phase"].iat[0]), "n_batches": len(current),
                "batching": batching,
                "shuffled": shuffled,
                "rank": float(_spearman_rows(rank[None], distance[None])[0]),
                "previous_position": float(_spearman_rows(place[None], distance[None])[0]),
                "rank_given_position": (float(_spearman_rows(rank[None], distance[None], place[None])[0])
                                        if shuffled else math.nan),
            })
    if not units:
        return pd.DataFrame(columns=columns)
    rows = []
    for (ordering, phase), part in pd.DataFrame(units).groupby(["ordering", "phase"], sort=True):
        row = {"ordering": ordering, "phase": int(phase),
               "batch_order": ("shuffled" if part["shuffled"].all() else "fixed" if not part["shuffled"].any()
                               else "mixed"),
               "n_units": len(part), "n_batchings": int(part["batching"].nunique()),
               "n_batches": int(part["n_batches"].max())}
        for name in ("rank", "previous_position", "rank_given_position"):
            finite = part[np.isfinite(part[name].to_numpy(float))]
            values = finite[name].to_numpy(float)
            per_batching = finite.groupby("batching")[name].mean().to_numpy(float)
            row[f"{name}_spearman"] = float(per_batching.mean()) if len(per_batching) else math.nan
            row[f"{name}_se"] = (float(per_batching.std(ddof=1) / math.sqrt(len(per_batching)))
                                 if len(per_batching) > 1 else math.nan)
            row[f"{name}_negative"] = int((values < 0).sum())
        rows.append(row)
    return pd.DataFrame(rows)[columns]


# --------------------------------------------------------------------------- best and worst batches


def best_and_worst_batches(batch_stats: pd.DataFrame, n_per_side: int = 3) -> pd.DataFrame:
    """The ``n_per_side`` batches with the lowest and the highest mean noise-unit distance per ordering and phase."""
    if n_per_side < 1:
        raise AnalysisInputError(f"distance_analysis.n_best_worst must be at least 1, got {n_per_side}.")
    rows = []
    keep = ["batch", "noise_z_mean", "noise_ratio_mean", "distance_mean", "cosine_similarity_mean",
            "metric_mean", "class_entropy", "first_epoch", "last_epoch", "learning_rate"]
    for (ordering, phase), part in batch_stats.groupby(["ordering", "phase"], sort=True):
        ranked = part.sort_values(["noise_z_mean", "batch"], kind="stable")
        n = min(n_per_side, len(ranked))
        for kind, chosen in (("best", ranked.head(n)), ("worst", ranked.iloc[::-1].head(n))):
            for rank, (_, row) in enumerate(chosen.iterrows(), start=1):
                rows.append({"ordering": ordering, "phase": int(phase), "kind": kind, "rank": rank,
                             **{k: row[k] for k in keep}})
    table = pd.DataFrame(rows)
    if len(table):
        table["batch"] = table["batch"].astype(np.int64)
    return table


# --------------------------------------------------------------------------- gradient noise trace


def per_example_gradient_trace(per_example_gradients: np.ndarray) -> float:
    """``tr(Sigma)`` of per-example gradients (rows), with the population normalisation ``1/N``.

    That is the mean over examples of ``||g_i - g_mean||^2``; it is the
    normalisation for which :func:`expected_batch_distance_sq` is exact.
    """
    g = np.asarray(per_example_gradients, dtype=np.float64)
    return float(((g - g.mean(axis=0)) ** 2).sum(axis=1).mean())


def expected_batch_distance_sq(trace: float, n_examples: int, batch_size: int) -> float:
    """``E ||g_batch - g_full||^2`` for a batch drawn without replacement: ``tr(Sigma)/m * (N-m)/(N-1)``.

    ``trace`` must use the ``1/N`` normalisation (:func:`per_example_gradient_trace`);
    with the ``1/(N-1)`` sample covariance the factor would be ``(N-m)/N``.
    Exact when the batch gradient is the mean of the per-example gradients (no
    BatchNorm in training mode) and ``g_full`` is the mean over all ``N``.
    """
    if not 1 <= batch_size <= n_examples:
        raise AnalysisInputError(f"batch size {batch_size} must lie in [1, N={n_examples}].")
    if n_examples == 1:
        return 0.0
    return trace / batch_size * (n_examples - batch_size) / (n_examples - 1)


TRACE_COLUMNS = ("gradient_variance_trace", "n_train", "batch_size")


def gradient_noise_trace_check(null_noise_units: pd.DataFrame, null_history: pd.DataFrame) -> pd.DataFrame:
    """Per epoch of the null ordering: observed ``mean ||g_k - g_full||^2`` against the sampling formula.

    ``null_history`` is the null ordering's ``training_history``; when it carries
    ``gradient_variance_trace`` (``tr Sigma`` at the epoch start), ``n_train`` and
    ``batch_size``, ``expected`` is :func:`expected_batch_distance_sq` and
    ``ratio = observed / expected``; otherwise ``status`` is ``not measured``.
    One row per seed and epoch (each seed's run has its own trace).
    """
    null_noise_units, null_history = with_seed(null_noise_units), with_seed(null_history)
    observed = (
        null_noise_units.assign(distance_sq=null_noise_units["distance"] ** 2)
        .groupby(["seed", "epoch"])
        .agg(phase=("phase", "first"), learning_rate=("learning_rate", "first"),
             n_batches=("batch", "size"), observed_mean_sq_distance=("distance_sq", "mean"))
        .reset_index()
    )
    has_columns = all(c in null_history.columns for c in TRACE_COLUMNS)
    if has_columns:
        history = null_history[["seed", "epoch", *TRACE_COLUMNS]]
        table = observed.merge(history, on=["seed", "epoch"], how="left")
    else:
        table = observed.assign(**{c: np.nan for c in TRACE_COLUMNS})
    expected = []
    for _, row in table.iterrows():
        values = [row[c] for c in TRACE_COLUMNS]
        if any(pd.isna(v) for v in values):
            expected.append(np.nan)
        else:
            expected.append(expected_batch_distance_sq(float(values[0]), int(values[1]), int(values[2])))
    table["expected_mean_sq_distance"] = expected
    table["ratio"] = table["observed_mean_sq_distance"] / table["expected_mean_sq_distance"]
    table["status"] = np.where(table["expected_mean_sq_distance"].notna(), "measured", "not measured")
    return table


def summarise_trace_check(trace_check: pd.DataFrame) -> pd.DataFrame:
    """Per phase (and ``all``): epochs measured and the median, min and max of the observed/expected ratio."""
    measured = trace_check[trace_check["status"] == "measured"]
    rows = []
    for phase, part in [*measured.groupby("phase"), ("all", measured)]:
        if len(part) == 0:
            continue
        rows.append({"phase": str(phase), "n_epochs": len(part), "median_ratio": part["ratio"].median(),
                     "min_ratio": part["ratio"].min(), "max_ratio": part["ratio"].max()})
    return pd.DataFrame(rows, columns=["phase", "n_epochs", "median_ratio", "min_ratio", "max_ratio"])


# --------------------------------------------------------------------------- orderings


def ordering_status_table(
    statuses: Mapping[str, Mapping], distances_by_ordering: Mapping[str, pd.DataFrame]
) -> pd.DataFrame:
    """One row per ordering: ``status`` (``ok`` / ``skipped`` / ``off`` (a stratified ordering with
    ``sort_batches.stratify: false``) / ``no data``), ``reason``, epochs, batches, phases,
    seeds (``n_seeds``: the runs of the ordering) and ``provenance``: what the metric's scores rest on, as its
    status records it (e.g. the perceptual metric's weights: source and sha256), ``""`` when it records nothing."""
    rows = []
    for ordering, distances in distances_by_ordering.items():
        status = dict(statuses.get(ordering) or {})
        state = status.get("status", "ok")
        reason = status.get("reason")
        provenance = status.get("provenance") or {}
        if state != "skipped" and len(distances) == 0:
            if ordering_of(ordering).stratified:
                state, reason = "off", "sort_batches.stratify is false"
            else:
                state, reason = "no data", reason or "the gradient_distances table has no rows"
        if len(distances):
            phases = epoch_phase_table(distances, f"{ordering}.gradient_distances")
            n_epochs, n_phases, n_batches = len(phases), int(phases["phase"].max()), distances["batch"].nunique()
            n_seeds = int(with_seed(distances)["seed"].nunique())
        else:
            n_epochs = n_phases = n_batches = n_seeds = 0
        rows.append({"ordering": ordering, "status": state, "reason": reason or "", "n_epochs": n_epochs,
                     "n_phases": n_phases, "n_batches": int(n_batches), "n_seeds": n_seeds,
                     "provenance": str(provenance.get("description", "")) if isinstance(provenance, dict)
                     else str(provenance)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- parameters

class AnalysisConfigError(ConfigError, AnalysisInputError):
    """A ``distance_analysis`` parameter that cannot work; names it (``distance_analysis.<key>``) and the fix."""


@dataclass(frozen=True)
class AnalysisConfig:
    """The ``distance_analysis`` section, every key checked (conf/<env>/parameters_distance_analysis.yml)."""

    null_ordering: str = "random"
    alpha: float = 0.05
    n_permutations: int = 20000
    n_bootstrap: int = 2000
    confidence: float = 0.95
    seed: int = 0
    n_best_worst: int = 3

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> AnalysisConfig:
        section = Section(params, "distance_analysis", DEFAULT_PARAMETERS, AnalysisConfigError,
                          "conf/<env>/parameters_distance_analysis.yml")
        return cls(
            null_ordering=section.text("null_ordering", cls.null_ordering,
                                       "Name the ordering whose batches are random (the null control), e.g. random."),
            alpha=section.number("alpha", cls.alpha, "Use e.g. 0.05.", low=0, high=0.5, low_open=True,
                                 high_open=True),
            n_permutations=section.integer("n_permutations", cls.n_permutations, 100, "Use e.g. 20000."),
            n_bootstrap=section.integer("n_bootstrap", cls.n_bootstrap, 100, "Use e.g. 2000."),
            confidence=section.number("confidence", cls.confidence, "Use e.g. 0.95.", low=0.5, high=1,
                                      low_open=True, high_open=True),
            seed=section.integer("seed", cls.seed, 0, "Use e.g. 0."),
            n_best_worst=section.integer("n_best_worst", cls.n_best_worst, 1, "Use e.g. 3."),
        )


#: Every ``distance_analysis`` key with its default.
DEFAULT_PARAMETERS = {field.name: field.default for field in dataclasses.fields(AnalysisConfig)}
