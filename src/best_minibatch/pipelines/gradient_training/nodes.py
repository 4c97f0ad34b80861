"""Nodes of ``gradient_training``: thin wrappers around ``best_minibatch.training.gradient_training``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pandas as pd
import torch

from best_minibatch.training.gradient_training import (
    GradientProbeRun,
    ProbeResults,
    TrainingConfig,
    TrainingData,
    TrainingDataError,
    named_model_factory,
)

logger = logging.getLogger(__name__)

#: What ``probe_results`` holds while training runs; Kedro keeps only the last chunk, the results.
PENDING = "training in progress"


def train_with_gradient_probe(
    batch_assignments: pd.DataFrame,
    image_index: pd.DataFrame,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    training: dict[str, Any],
    params: dict[str, Any],
    *,
    ordering: str,
) -> Iterator[tuple[dict[str, torch.Tensor], ProbeResults | str]]:
    """Train one ordering with the gradient probe (Algorithm 1), resuming from its last checkpoint.

    Yields ``({partition_id: gradient}, PENDING)`` for every kept mini-batch gradient
    as it is computed (Kedro writes it to ``batch_gradients`` before training goes
    on), then ``({}, ProbeResults)`` once. Every check runs before the first yield.
    """
    config = TrainingConfig.from_params(params, training)
    if batch_assignments.empty:
        # INFO, not WARNING: score_metrics already gave the one loud warning about the skip.
        logger.info("%s: no batch assignments (the metric was skipped upstream); writing empty tables", ordering)
        yield {}, ProbeResults.empty(ordering)
        return
    if "metric" in batch_assignments and set(batch_assignments["metric"].unique()) != {ordering}:
        raise TrainingDataError(
            f"batch_assignments of '{ordering}' holds metrics {sorted(batch_assignments['metric'].unique())}; "
            "rerun sort_batches."
        )
    data = TrainingData.from_tables(batch_assignments, image_index, train_images, test_images)
    run = GradientProbeRun(config, data, named_model_factory(config), ordering)
    logger.info(
        "%s: run '%s', %s (%s parameters), %d epochs of %d batches of %d on %s; gradients of epochs %s kept in %s",
        ordering, run.run_name, config.model, f"{run.num_params:,}", config.num_epochs, data.num_batches,
        data.batch_size, run.device, _epoch_list(run.kept_epochs) or "none", run.gradients_dir,
    )
    for spilled in run.run():
        yield {run.partition_id(spilled.epoch, spilled.batch): spilled.gradient}, PENDING
    yield {}, run.results


def publish_probe_results(
    probe_results: ProbeResults | str,
) -> tuple[pd.DataFrame, torch.Tensor, pd.DataFrame, dict[str, torch.Tensor], pd.DataFrame]:
    """Split a finished run into its versioned outputs: distances, distance matrix, history, model, null distances."""
    if not isinstance(probe_results, ProbeResults):
        raise RuntimeError("train_with_gradient_probe ended without results; see the error it raised above.")
    return (probe_results.distances, probe_results.distance_matrix, probe_results.history,
            probe_results.model_state, probe_results.null_distances)


def _epoch_list(epochs: set[int]) -> str:
    return ", ".join(map(str, sorted(epochs)))
