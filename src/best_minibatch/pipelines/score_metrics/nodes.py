"""Nodes of ``score_metrics``."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import torch

from best_minibatch.metrics.scoring import METRICS, combine_scores, score_images

logger = logging.getLogger(__name__)


def training_image_ids(image_index: pd.DataFrame, n_images: int) -> np.ndarray:
    """``image_id`` of each row of the training tensor, checked against its length."""
    train = image_index[image_index["split"] == "train"].sort_values("row")
    if len(train) != n_images or not np.array_equal(train["row"].to_numpy(), np.arange(n_images)):
        raise ValueError(
            f"image_index lists {len(train)} training rows but train_images holds {n_images} images; "
            "both must come from the same ingest_cifar run - rerun ingest_cifar."
        )
    return train["image_id"].to_numpy(dtype=np.int64)


def score_training_images(
    metric: str,
    earlier_metrics: tuple[str, ...],
    train_images: torch.Tensor,
    image_index: pd.DataFrame,
    params: dict[str, Any],
    *earlier_scores: pd.DataFrame,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score every training image with ``metric``; return its score table and its status (ok or skipped).

    ``earlier_scores`` are the score tables of ``earlier_metrics`` (the metrics registered
    before this one): a metric that orders the images exactly like one of them, or
    gives every image the same score, is skipped as carrying no information of its own.
    """
    image_ids = training_image_ids(image_index, len(train_images))
    earlier = dict(zip(earlier_metrics, earlier_scores, strict=True))
    return score_images(metric, train_images.numpy(), image_ids, params, compare_with=earlier)


def combine_metric_scores(image_index: pd.DataFrame, *score_tables: pd.DataFrame) -> pd.DataFrame:
    """One row per training image, one or more columns per metric (NaN for a skipped metric).

    ``score_tables`` come in the order of ``METRICS``.
    """
    train = image_index[image_index["split"] == "train"].sort_values("row")
    tables = dict(zip(METRICS, score_tables, strict=True))
    combined = combine_scores(train["image_id"].to_numpy(), tables)
    skipped = [name for name, table in tables.items() if len(table) == 0]
    if skipped:
        logger.info("metric_scores: no scores for %s (skipped; see their metric_status)", ", ".join(skipped))
    return combined
