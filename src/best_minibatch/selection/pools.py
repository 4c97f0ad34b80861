"""The static policies' batches: the validation split, each ordering's batches, and the pools per phase.

Knows nothing of Kedro. ``fixed_random`` takes the null ordering's batches,
``paper_advice`` the union of the batches section 5 of the paper recommends,
``learned`` the batches ``distance_analysis`` found closest to the full gradient,
``random_subset`` a random subset of ``fixed_random``'s as many as ``learned``
keeps. ``docs/batch_selection.md`` states each precisely.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd

from best_minibatch.analysis.statistics import EXTREMES, UPPER_QUARTILE, group_mask
from best_minibatch.batches.batching import assign_batches
from best_minibatch.selection.config import (
    ADVICE_GROUPS,
    CONTROL,
    POOL_COLUMNS,
    SelectionDataError,
    kept_count,
    policy_rng,
)

logger = logging.getLogger(__name__)


def stratified_validation_split(image_index: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Hold out ``round(fraction * n_c)`` training images of every class ``c`` for validation.

    Returns one row per training image of ``image_index``: ``image_id``, ``label``
    and ``subset`` (``train`` or ``validation``), sorted by ``image_id``. The draw
    depends on ``seed`` and the class only. Every class keeps at least one image
    on each side; a class with fewer than two images is an error.
    """
    missing = [c for c in ("image_id", "split", "label") if c not in image_index.columns]
    if missing:
        raise SelectionDataError(f"image_index lacks columns {missing}; see docs/data_flow.md (ingest_cifar).")
    train = image_index.loc[image_index["split"] == "train", ["image_id", "label"]].sort_values("image_id")
    if len(train) == 0:
        raise SelectionDataError("image_index has no training images (split == 'train'); run ingest_cifar first.")
    subset = np.full(len(train), "train", dtype=object)
    labels = train["label"].to_numpy()
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            raise SelectionDataError(
                f"Class {label} has {len(members)} training image(s); a stratified validation split needs at "
                "least 2 per class. Use a larger sample (ingest_cifar.source)."
            )
        n_validation = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        chosen = policy_rng(seed, "validation", int(label)).permutation(members)[:n_validation]
        subset[chosen] = "validation"
    return pd.DataFrame({"image_id": train["image_id"].to_numpy(np.int64), "label": labels.astype(np.int64),
                         "subset": subset.astype(str)})


def subset_ids(split: pd.DataFrame, subset: str) -> np.ndarray:
    """Sorted image ids of ``subset`` (``train`` or ``validation``) in a split table."""
    return np.sort(split.loc[split["subset"] == subset, "image_id"].to_numpy(np.int64))


# --------------------------------------------------------------------------- fixed orderings


def ordering_batches(scores: pd.DataFrame, ordering: str, train_ids: np.ndarray, batch_size: int,
                     tie_seed: int = 0) -> np.ndarray:
    """One metric's fixed batching of the training images: ``K x m`` image ids, batch 0 = lowest metric.

    ``scores`` (``{ordering}.image_scores``) restricted to ``train_ids`` go through
    ``batching.assign_batches``, the same sort-and-cut as ``sort_batches``: sorted
    by the metric's ``sort_columns``, ties by ``sort_batches.tie_seed``'s random key, cut into ``K = floor(N / m)``
    batches, the ``N - K m`` images with the largest keys dropped. A table with a
    ``batching`` column (the ``random`` ordering's several batchings, one per training
    seed of ``gradient_training``) contributes its rows of ``batching == 0`` only: the
    single batching ``fixed_random`` has always trained on.
    """
    scores = first_batching(scores)
    if len(scores) == 0:
        raise SelectionDataError(f"Ordering '{ordering}' has no scores (its metric was skipped).")
    present = np.isin(train_ids, scores["image_id"].to_numpy(np.int64))
    if not present.all():
        raise SelectionDataError(
            f"{ordering}.image_scores lacks {int((~present).sum())} training images (e.g. id "
            f"{int(train_ids[~present][0])}); rerun score_metrics on the same ingest_cifar output."
        )
    restricted = scores.loc[scores["image_id"].isin(train_ids)].reset_index(drop=True)
    if len(restricted) < batch_size:
        raise SelectionDataError(f"{len(restricted)} training images cannot fill one batch of {batch_size}.")
    assignments = assign_batches(restricted, ordering, batch_size, tie_seed)
    k = int(assignments["batch"].max()) + 1
    return assignments.sort_values(["batch", "position"])["image_id"].to_numpy(np.int64).reshape(k, batch_size)


def first_batching(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``batching == 0`` when ``table`` has a ``batching`` column, else ``table`` itself."""
    if "batching" not in table.columns:
        return table
    return table.loc[table["batching"] == 0].drop(columns="batching").reset_index(drop=True)


def rank_positions(num_batches: int) -> np.ndarray:
    """Position of batch ``k`` along its sorted order: ``(k + 0.5) / K`` (the analysis' ``batch_position``)."""
    return (np.arange(num_batches) + 0.5) / num_batches


def advice_mask(num_batches: int, group: str) -> np.ndarray:
    """Which of an ordering's ``K`` batches belong to ``group`` (see :data:`ADVICE_GROUPS`).

    ``upper_quartile`` and ``extremes`` are exactly ``distance_analysis``'s groups
    (position > 0.75; position < 0.10 or > 0.90); ``middle_80`` is the complement
    of ``extremes`` and ``lower_quartile`` mirrors ``upper_quartile``.
    """
    positions = rank_positions(num_batches)
    if group == "upper_quartile":
        return group_mask(positions, UPPER_QUARTILE)
    if group == "lower_quartile":
        return group_mask(1.0 - positions, UPPER_QUARTILE)
    if group == "extremes":
        return group_mask(positions, EXTREMES)
    if group == "middle_80":
        return ~group_mask(positions, EXTREMES)
    if group == "all":
        return np.ones(num_batches, dtype=bool)
    raise SelectionDataError(f"Unknown batch group {group!r}; use one of {', '.join(ADVICE_GROUPS)}.")


# --------------------------------------------------------------------------- pools of the static policies


def _pool_rows(policy: str, phase: int, ordering: str, batches: np.ndarray, chosen: np.ndarray) -> list[dict]:
    positions = rank_positions(len(batches))
    return [
        {"policy": policy, "phase": phase, "source_ordering": ordering, "source_batch": int(k),
         "position": float(positions[k]), "image_ids": batches[k].astype(np.int64)}
        for k in np.flatnonzero(chosen)
    ]


def _pool_table(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=[c for c in POOL_COLUMNS if c != "pool_batch"])
    table.insert(2, "pool_batch", table.groupby(["policy", "phase"]).cumcount().astype(np.int64))
    return table[POOL_COLUMNS]


def fixed_order_pool(orderings: Mapping[str, np.ndarray], ordering: str, num_phases: int) -> pd.DataFrame:
    """The ``fixed_random`` policy's batches: all of ``ordering``'s batches in their order, every phase."""
    if ordering not in orderings:
        raise SelectionDataError(
            f"fixed_random needs ordering '{ordering}' (batch_selection.fixed_random.ordering), which has no "
            f"scores here; available: {sorted(orderings)}."
        )
    batches = orderings[ordering]
    rows = []
    for phase in range(1, num_phases + 1):
        rows += _pool_rows("fixed_random", phase, ordering, batches, np.ones(len(batches), dtype=bool))
    return _pool_table(rows)


def paper_advice_pool(
    orderings: Mapping[str, np.ndarray],
    first_phase: Mapping[str, str],
    later_phases: Mapping[str, str],
    num_phases: int,
    skipped: Mapping[str, str] | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """The ``paper_advice`` policy's batches per phase, and notes on metrics that could not be used.

    Phase 1 keeps, from each ordering named in ``first_phase``, the batches of its
    group (default: the upper quartile of intensity and of perceptual distance);
    later phases do the same with ``later_phases`` (default: the middle 80% of
    every metric, i.e. the extremes dropped). The phase's pool is the union of
    the kept batches of all orderings. An ordering without scores (a skipped
    metric, ``skipped`` gives the reason) is left out and noted; a phase whose
    pool ends up empty is an error.
    """
    skipped = dict(skipped or {})
    missing: dict[str, list[str]] = {}
    rows: list[dict] = []
    for phase in range(1, num_phases + 1):
        advice = first_phase if phase == 1 else later_phases
        phase_rows: list[dict] = []
        for ordering, group in advice.items():
            if ordering not in orderings:
                where = "phase 1" if phase == 1 else "later phases"
                if where not in missing.setdefault(ordering, []):
                    missing[ordering].append(where)
                continue
            batches = orderings[ordering]
            phase_rows += _pool_rows("paper_advice", phase, ordering, batches, advice_mask(len(batches), group))
        if not phase_rows:
            raise SelectionDataError(
                f"paper_advice has no batches in phase {phase}: none of {sorted(advice)} is available. Fix "
                "batch_selection.paper_advice or provide those metrics' scores."
            )
        rows += phase_rows
    notes = [
        f"paper_advice: ordering '{ordering}' is not available ({skipped.get(ordering, 'no scores')}); its "
        f"{' and '.join(where)} pool is built from the other metrics' batches."
        for ordering, where in missing.items()
    ]
    return _pool_table(rows), notes


def learned_pool(
    batches: np.ndarray,
    batch_statistics: pd.DataFrame,
    ordering: str,
    measure: str,
    keep_fraction: float,
    num_phases: int,
) -> tuple[pd.DataFrame, list[str]]:
    """The ``learned`` policy's batches per phase: the re-cut batches whose rank position was closest.

    ``batch_statistics`` is ``distance_analysis``'s per ordering/phase/batch table
    (``ordering``, ``phase``, ``batch``, ``measure``, optionally ``batch_position``).
    It was computed on batches of all training images, whereas ``batches`` are
    re-cut from the non-validation images, so batches are matched by rank
    position along the sorted order: each re-cut batch gets the measure linearly
    interpolated at its position ``(k + 0.5) / K`` from the analysed batches'
    positions. The ``round(keep_fraction * K)`` (at least 1) re-cut batches with
    the smallest value are kept (ties by rank). Phase ``p`` uses the analysis'
    phase ``p``; phases beyond the analysis' last use its last phase (noted).
    """
    missing = [c for c in ("ordering", "phase", "batch", measure) if c not in batch_statistics.columns]
    if missing:
        raise SelectionDataError(
            f"The distance_analysis batch table lacks columns {missing} (has {list(batch_statistics.columns)}); "
            "rerun distance_analysis or change batch_selection.learned.measure."
        )
    table = batch_statistics.loc[batch_statistics["ordering"] == ordering]
    if len(table) == 0:
        available = sorted(batch_statistics["ordering"].unique())
        raise SelectionDataError(
            f"distance_analysis has no batches of ordering '{ordering}' (batch_selection.learned.ordering); "
            f"it has {available}. Choose one of them (a skipped metric has no distances)."
        )
    notes: list[str] = []
    analysed_phases = sorted(int(p) for p in table["phase"].unique())
    k = len(batches)
    positions = rank_positions(k)
    n_keep = kept_count(keep_fraction, k)
    rows: list[dict] = []
    for phase in range(1, num_phases + 1):
        source_phase = phase if phase in analysed_phases else analysed_phases[-1]
        if source_phase != phase:
            notes.append(f"learned: phase {phase} has no distance_analysis phase; it uses phase {source_phase}.")
        part = table.loc[table["phase"] == source_phase].sort_values("batch")
        if "batch_position" in part.columns:
            analysed_positions = part["batch_position"].to_numpy(np.float64)
        else:
            analysed_positions = rank_positions(len(part))
        values = part[measure].to_numpy(np.float64)
        finite = np.isfinite(values)
        if not finite.any():
            raise SelectionDataError(f"distance_analysis' {measure} of '{ordering}' phase {source_phase} is all NaN.")
        estimated = np.interp(positions, analysed_positions[finite], values[finite])
        chosen_order = np.lexsort((np.arange(k), estimated))[:n_keep]
        chosen = np.zeros(k, dtype=bool)
        chosen[chosen_order] = True
        rows += _pool_rows("learned", phase, ordering, batches, chosen)
    return _pool_table(rows), notes


def random_subset_pools(batches: np.ndarray, keep_fraction: float, num_phases: int, seed: int) -> dict[int, np.ndarray]:
    """The ``random_subset`` control's batches: ``{phase: P x m}``, a random ``P``-subset of ``batches`` per phase.

    ``P = kept_count(keep_fraction, K)`` of the ``K`` batches (in the pipeline:
    the fixed-random ordering's batches and ``learned.keep_fraction``, so ``P``
    is exactly the count ``learned`` keeps). The subset of each phase is drawn
    independently, uniformly without replacement, from a generator of the seed
    and the phase only: the same for a seed on every rerun, different between
    seeds (so the control averages over random subsets rather than testing one).
    """
    batches = np.asarray(batches, dtype=np.int64)
    n_keep = kept_count(keep_fraction, len(batches))
    pools = {}
    for phase in range(1, num_phases + 1):
        chosen = policy_rng(seed, CONTROL, "subset", phase).choice(len(batches), size=n_keep, replace=False)
        pools[phase] = batches[np.sort(chosen)]
    return pools


def pools_by_phase(pools: pd.DataFrame, policy: str) -> dict[int, np.ndarray]:
    """``{phase: P x m image ids}`` of one policy from the pool table (rows in ``pool_batch`` order)."""
    part = pools.loc[pools["policy"] == policy].sort_values(["phase", "pool_batch"])
    if len(part) == 0:
        raise SelectionDataError(f"The batch pool table has no rows for policy '{policy}'.")
    return {int(phase): np.stack([np.asarray(ids, dtype=np.int64) for ids in group["image_ids"]])
            for phase, group in part.groupby("phase", sort=True)}


