"""Fixed mini-batches: sort the training set by a metric and cut it into equal batches (plain or class-stratified).

Knows nothing of Kedro. Images sort ascending by the metric's ``sort_columns``
(registered in :mod:`best_minibatch.metrics.scoring`), ties broken by a seeded random
key of each image (:func:`tie_keys`; not by ``image_id``, which follows class order in
an image-folder source and would group tied images by class), and the sorted sequence
is cut into ``K = floor(N / m)`` batches of exactly ``m``
images; the ``N - K m`` images with the largest sort keys are dropped (as in the
paper: 50,000 / 256 gives 195 batches and drops 80).

*Stratified* (``<metric>_stratified``, :func:`stratified_batches`): every batch holds
``b = floor(m / C)`` images of each of the ``C`` classes, batch ``k`` taking the
``k``-th slice of each class's own ascending order; the ``r = m - C b`` remaining
slots of batch ``k`` go one each to classes ``(k r + j) mod C``, ``j < r`` (a rotation,
so every class gets the same number of extra images up to one and no batch holds more
than one extra image of a class). ``K`` is ``floor(N / m)`` unless a class runs out
first; each class's dropped images are its largest-metric ones.

A *control* metric (``random``) is cut into ``batchings`` independent batchings
(column ``batching``): batching 0 from its scores, batching ``j > 0`` from fresh
uniform keys seeded by ``(tie_seed, j)`` and the image ids. Training seed ``i`` of
``gradient_training.seeds`` trains batching ``i``. A metric has one batching (0).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from best_minibatch.batches.orderings import ordering_name
from best_minibatch.config import ConfigError, Section
from best_minibatch.metrics.scoring import METRICS

logger = logging.getLogger(__name__)

ASSIGNMENT_COLUMNS = ("metric", "ordering", "batching", "batch", "position", "image_id", "metric_value")


class BatchingError(ValueError):
    """Scores or parameters that cannot be cut into batches; the message names the problem and the fix."""


class BatchingConfigError(ConfigError, BatchingError):
    """A ``sort_batches`` parameter that cannot work; names it and the fix."""


#: Every key of the ``sort_batches`` section.
SORT_BATCHES_KEYS = ("batch_size", "tie_seed", "stratify", "control_batchings")
WHERE = "conf/<env>/parameters_sort_batches.yml"


@dataclass(frozen=True)
class SortBatchesConfig:
    """The ``sort_batches`` section, every key checked (conf/<env>/parameters_sort_batches.yml)."""

    batch_size: int
    tie_seed: int = 0
    stratify: bool = True
    control_batchings: int = 1

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> SortBatchesConfig:
        section = Section(params, "sort_batches", SORT_BATCHES_KEYS, BatchingConfigError, WHERE)
        tie_seed = section.integer("tie_seed", cls.tie_seed, 0, "Use e.g. 0.")
        stratify = section.boolean("stratify", cls.stratify)
        control_batchings = section.integer(
            "control_batchings", cls.control_batchings, 1,
            "Use at least the number of gradient_training.seeds (each seed trains its own random batching).")
        # The required key last: config.every_problem takes a bad key out and reads the rest again.
        section.required("batch_size", "Set it, e.g. 256 (the paper's) or 100 (the base run's).")
        return cls(batch_size=section.integer("batch_size", None, 1, "Use e.g. 256 (the paper's) or 100 (the "
                                              "base run's)."),
                   tie_seed=tie_seed, stratify=stratify, control_batchings=control_batchings)


def tie_keys(image_ids: np.ndarray, seed: int) -> np.ndarray:
    """A random-looking ``uint64`` per image, fixed by ``(seed, image_id)`` alone (not by the table's row order).

    SplitMix64's finaliser of ``image_id`` mixed with the seed: distinct ids give
    distinct keys, and a tie is broken the same way on every rerun.
    """
    with np.errstate(over="ignore"):
        z = np.asarray(image_ids, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(int(seed) + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sort_order(scores: pd.DataFrame, sort_columns: tuple[str, ...], tie_seed: int = 0) -> np.ndarray:
    """Row positions of ``scores`` in ascending order of ``sort_columns`` (most significant first).

    Ties are broken by :func:`tie_keys` of ``tie_seed``, then by ``image_id``.
    """
    ids = scores["image_id"].to_numpy()
    # np.lexsort sorts by its last key first, so the keys go in reverse significance.
    keys = [ids, tie_keys(ids, tie_seed)] + [scores[column].to_numpy() for column in reversed(sort_columns)]
    return np.lexsort(keys)


def tied_images(scores: pd.DataFrame, sort_columns: tuple[str, ...]) -> int:
    """How many images share all their sort values with at least one other image."""
    if len(scores) == 0:
        return 0
    return int(scores.duplicated(subset=list(sort_columns), keep=False).sum())


def training_classes(image_index: pd.DataFrame) -> pd.DataFrame:
    """``label`` and ``class_name`` of every training image, indexed by ``image_id``."""
    train = image_index[image_index["split"] == "train"]
    return train.set_index("image_id")[["label", "class_name"]]


def class_names_in_label_order(image_index: pd.DataFrame) -> list[str]:
    """Class names ordered by label (the column order of the ``class_count_*`` columns)."""
    pairs = image_index[["label", "class_name"]].drop_duplicates().sort_values("label")
    return [str(name) for name in pairs["class_name"]]


def _check_scores(scores: pd.DataFrame, metric: str, sort_columns: tuple[str, ...], train_ids: pd.Index) -> None:
    missing = [column for column in ("image_id", "score", *sort_columns) if column not in scores.columns]
    if missing:
        raise BatchingError(
            f"The '{metric}' score table lacks column(s) {missing}; rerun score_metrics for this metric."
        )
    ids = scores["image_id"]
    if ids.duplicated().any():
        raise BatchingError(
            f"The '{metric}' score table lists image_id {int(ids[ids.duplicated()].iloc[0])} more than once; "
            "rerun score_metrics."
        )
    unknown = ~ids.isin(train_ids)
    if unknown.any():
        raise BatchingError(
            f"The '{metric}' score table has image_id {int(ids[unknown].iloc[0])}, which is not a training "
            "image of image_index; score and index come from different ingest runs - rerun score_metrics."
        )
    values = scores[list(dict.fromkeys(("score", *sort_columns)))].to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise BatchingError(f"The '{metric}' score table holds NaN or infinite scores; rerun score_metrics.")


def stratified_batches(order: np.ndarray, labels: np.ndarray, batch_size: int) -> np.ndarray:
    """Row positions of a class-stratified batching, ``K x batch_size`` (see the module docstring).

    ``order``: row positions in ascending metric order; ``labels``: each row's class.
    Within a batch the rows keep their ascending metric order.
    """
    classes = np.unique(labels)
    n_classes = len(classes)
    base, remainder = divmod(batch_size, n_classes)
    by_class = [order[labels[order] == c] for c in classes]
    available = np.array([len(rows) for rows in by_class])

    def extra_slots(n_batches: int) -> np.ndarray:
        """Class index of every remainder slot, one row per batch."""
        return (np.arange(n_batches)[:, None] * remainder + np.arange(remainder)[None, :]) % n_classes

    n_batches = len(order) // batch_size
    while n_batches > 0:
        needed = n_batches * base + np.bincount(extra_slots(n_batches).ravel(), minlength=n_classes)
        if (needed <= available).all():
            break
        n_batches -= 1
    if n_batches == 0:
        raise BatchingError(
            f"A class-stratified batch of {batch_size} needs {base} or {base + 1} images of each of the "
            f"{n_classes} classes, and class {classes[int(np.argmin(available))]} has only {available.min()}; "
            "lower sort_batches.batch_size or set sort_batches.stratify: false."
        )
    extras = extra_slots(n_batches)
    taken = np.zeros(n_classes, dtype=np.int64)
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(order))
    batches = np.empty((n_batches, batch_size), dtype=np.int64)
    for k in range(n_batches):
        counts = np.full(n_classes, base, dtype=np.int64)
        np.add.at(counts, extras[k], 1)
        rows = np.concatenate([by_class[c][taken[c]: taken[c] + counts[c]] for c in range(n_classes)])
        taken += counts
        batches[k] = rows[np.argsort(rank[rows], kind="stable")]
    return batches


def control_scores(scores: pd.DataFrame, metric: str, batching: int, tie_seed: int) -> pd.DataFrame:
    """Scores of a control metric's batching ``batching``: its own for 0, else fresh uniform keys.

    The keys of batching ``j > 0`` depend on ``(tie_seed, j)`` and the image ids only (not on the row order).
    """
    if batching == 0:
        return scores
    rng = np.random.default_rng([int(tie_seed), int(batching), zlib.crc32(b"control_batching")])
    ids = scores["image_id"].to_numpy(dtype=np.int64)
    keys = rng.random(len(ids))[np.argsort(np.argsort(ids, kind="stable"), kind="stable")]
    fresh = scores.copy()
    for column in dict.fromkeys(("score", *METRICS[metric].sort_columns)):
        fresh[column] = keys
    return fresh


def assign_batches(scores: pd.DataFrame, metric: str, batch_size: int, tie_seed: int = 0, *,
                   labels: np.ndarray | None = None, ordering: str | None = None, batching: int = 0) -> pd.DataFrame:
    """Sort ``scores`` by ``metric``'s sort columns and cut them into full batches.

    Plain (``labels`` None): ``floor(N / batch_size)`` consecutive batches. Stratified
    (``labels``: each score row's class): :func:`stratified_batches`.
    """
    sort_columns = METRICS[metric].sort_columns
    order = sort_order(scores, sort_columns, tie_seed)
    if labels is None:
        n_batches = len(scores) // batch_size
        kept = order[: n_batches * batch_size]
    else:
        kept = stratified_batches(order, np.asarray(labels), batch_size).ravel()
        n_batches = len(kept) // batch_size
    return pd.DataFrame(
        {
            "metric": pd.Series([metric] * len(kept), dtype="str"),
            "ordering": pd.Series([ordering or metric] * len(kept), dtype="str"),
            "batching": np.full(len(kept), batching, dtype=np.int64),
            "batch": np.repeat(np.arange(n_batches, dtype=np.int64), batch_size),
            "position": np.tile(np.arange(batch_size, dtype=np.int64), n_batches),
            "image_id": scores["image_id"].to_numpy(dtype=np.int64)[kept],
            "metric_value": scores["score"].to_numpy(dtype=np.float64)[kept],
        }
    )


def class_entropy(counts: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats of each row of class counts (0 log 0 = 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    p = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    logs = np.log(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logs).sum(axis=1)


def summarize_batches(assignments: pd.DataFrame, image_index: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per batching and batch: min / mean / max metric value, class entropy (nats) and one ``class_count_<name>``
    per class."""
    class_names = class_names_in_label_order(image_index)
    classes = training_classes(image_index)["label"]
    parts = []
    for batching, part in (assignments.groupby("batching", sort=True) if len(assignments) else [(0, assignments)]):
        labels = part["image_id"].map(classes).to_numpy(dtype=np.int64)
        batches = part["batch"].to_numpy(dtype=np.int64)
        n_batches = int(batches.max()) + 1 if len(batches) else 0
        counts = np.zeros((n_batches, len(class_names)), dtype=np.int64)
        np.add.at(counts, (batches, labels), 1)
        stats = part.groupby("batch", sort=True)["metric_value"].agg(["min", "mean", "max"])
        ordering = str(part["ordering"].iat[0]) if len(part) else metric
        summary = pd.DataFrame(
            {
                "metric": pd.Series([metric] * n_batches, dtype="str"),
                "ordering": pd.Series([ordering] * n_batches, dtype="str"),
                "batching": np.full(n_batches, int(batching), dtype=np.int64),
                "batch": np.arange(n_batches, dtype=np.int64),
                "metric_min": stats["min"].to_numpy(dtype=np.float64),
                "metric_mean": stats["mean"].to_numpy(dtype=np.float64),
                "metric_max": stats["max"].to_numpy(dtype=np.float64),
                "class_entropy": class_entropy(counts),
            }
        )
        for label, name in enumerate(class_names):
            summary[f"class_count_{name}"] = counts[:, label]
        parts.append(summary)
    return pd.concat(parts, ignore_index=True)


def sort_into_batches(
    scores: pd.DataFrame, image_index: pd.DataFrame, metric: str, batch_size: int, tie_seed: int = 0, *,
    stratified: bool = False, batchings: int = 1,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Batch assignments and per-batch summary of ``metric``'s ordering (see the module docstring).

    ``stratified``: the class-stratified ordering (``<metric>_stratified``). ``batchings``:
    how many independent batchings a control metric gets (a metric that is not a control
    always has one). A zero-row score table (a skipped metric) gives zero-row outputs with
    the same columns. Every check happens before anything is returned. The summary's
    ``tied_images`` counts the metric's images that share their sort values with another.
    """
    if metric not in METRICS:
        raise BatchingError(f"Unknown metric '{metric}'; registered metrics: {', '.join(METRICS)}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise BatchingError(f"sort_batches.batch_size must be a positive integer, got {batch_size!r}.")
    train_ids = pd.Index(image_index.loc[image_index["split"] == "train", "image_id"])
    _check_scores(scores, metric, METRICS[metric].sort_columns, train_ids)
    ordering = ordering_name(metric, stratified)
    if len(scores) == 0:
        # INFO, not WARNING: score_metrics already gave the one loud warning with the fix.
        logger.info(
            "Metric '%s' has no scores (it was skipped in score_metrics; see its metric_status): "
            "the batch tables of '%s' are empty.", metric, ordering,
        )
    elif len(scores) < batch_size:
        raise BatchingError(
            f"sort_batches.batch_size={batch_size} exceeds the {len(scores)} images scored by '{metric}', "
            "so not one full batch fits; lower sort_batches.batch_size."
        )
    labels = scores["image_id"].map(training_classes(image_index)["label"]).to_numpy(dtype=np.int64)
    count = batchings if METRICS[metric].control and len(scores) else 1
    assignments = pd.concat(
        [assign_batches(control_scores(scores, metric, j, tie_seed), metric, int(batch_size), tie_seed,
                        labels=labels if stratified and len(scores) else None, ordering=ordering, batching=j)
         for j in range(count)],
        ignore_index=True,
    )
    summary = summarize_batches(assignments, image_index, metric)
    tied = tied_images(scores, METRICS[metric].sort_columns)
    summary["tied_images"] = np.int64(tied)
    if len(scores):
        n_batches = int((summary["batching"] == 0).sum())
        logger.info(
            "'%s': %d images -> %d batches of %d (%d dropped)%s%s; %d images tied on the metric (order among them "
            "random, seed %d)", ordering, len(scores), n_batches, batch_size, len(scores) - n_batches * batch_size,
            ", the same number of each class in every batch" if stratified else "",
            f", {count} independent batchings" if count > 1 else "", tied, tie_seed,
        )
    return assignments, summary


def empty_batch_tables(image_index: pd.DataFrame, metric: str, ordering: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Zero-row assignments and summary with the usual columns (an ordering switched off)."""
    assignments = assign_batches(METRICS[metric].empty_scores(), metric, 1, ordering=ordering)
    return assignments, summarize_batches(assignments, image_index, metric).assign(tied_images=np.int64(0))
