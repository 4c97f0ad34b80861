"""Nodes of ``gradient_training``: thin wrappers around ``best_minibatch.gradient_training``."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
import torch

from best_minibatch.gradient_training import (
    GradientProbeRun,
    OrderingResults,
    ProbeResults,
    TrainingConfig,
    TrainingData,
    TrainingDataError,
    flat_model_states,
    named_model_factory,
)
from best_minibatch.services import parallel

logger = logging.getLogger(__name__)


def prepare_seed_runs(
    batch_assignments: pd.DataFrame,
    image_index: pd.DataFrame,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    training: dict[str, Any],
    params: dict[str, Any],
    ordering: str,
) -> list[GradientProbeRun]:
    """One :class:`GradientProbeRun` per seed of ``gradient_training.seeds``, every check done, nothing written.

    Seed ``i`` of the list trains batching ``i`` of an ordering that has several (a control:
    each seed replicates the batching, not only the weights); an ordering with one batching
    trains it with every seed. Empty for an ordering whose metric was skipped upstream or that
    is switched off (zero-row ``batch_assignments``).
    """
    config = TrainingConfig.from_params(params, training)
    if batch_assignments.empty:
        # INFO, not WARNING: score_metrics already gave the one loud warning about a skip.
        logger.info("%s: no batch assignments (metric skipped upstream, or ordering switched off); writing empty "
                    "tables", ordering)
        return []
    column = "ordering" if "ordering" in batch_assignments else "metric"
    if set(batch_assignments[column].unique()) != {ordering}:
        raise TrainingDataError(
            f"batch_assignments of '{ordering}' holds orderings {sorted(batch_assignments[column].unique())}; "
            "rerun sort_batches."
        )
    batchings = (sorted(int(b) for b in batch_assignments["batching"].unique())
                 if "batching" in batch_assignments else [0])
    if len(batchings) > 1 and len(batchings) < len(config.seeds):
        raise TrainingDataError(
            f"'{ordering}' has {len(batchings)} batchings for {len(config.seeds)} seeds (each seed trains its own "
            f"batching of a control); set sort_batches.control_batchings to at least {len(config.seeds)}."
        )
    factory = named_model_factory(config)
    runs = []
    for index, seed in enumerate(config.seeds):
        batching = batchings[index] if len(batchings) > 1 else batchings[0]
        rows = (batch_assignments[batch_assignments["batching"] == batching]
                if "batching" in batch_assignments else batch_assignments)
        data = TrainingData.from_tables(rows, image_index, train_images, test_images)
        runs.append(GradientProbeRun(config, data, factory, ordering, seed=seed, batching=batching))
    return runs


def train_seed(run: GradientProbeRun) -> ProbeResults:
    """One (ordering, seed) run to its end, resuming from its last checkpoint (or reusing a finished run).

    The unit of work a scheduler can hand out: it needs nothing but the run, and the run
    writes its own kept gradients (the one writer under every runner).
    """
    _log_start(run)
    return run.run()


@parallel.hands_out_work
def train_with_gradient_probe(
    batch_assignments: pd.DataFrame,
    image_index: pd.DataFrame,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    training: dict[str, Any],
    params: dict[str, Any],
    *,
    ordering: str,
) -> tuple[dict[str, str], pd.DataFrame, torch.Tensor, pd.DataFrame, dict[str, torch.Tensor], pd.DataFrame]:
    """Train one ordering with the gradient probe (Algorithm 1) once per seed; its published outputs.

    Every check of every seed's run runs before the first trains. Under the Dask runner each
    seed is a task of its own (on its own GPU); otherwise the seeds train one after another.
    Returns the spilled gradients written (``{partition_id: path}``, checked by
    ``{ordering}.batch_gradients``), then distances, distance matrix (S x E x K), history,
    models (one flat dict keyed ``seed=<S>/<state-dict key>``) and null distances; the
    tables have a ``seed`` column.
    """
    runs = prepare_seed_runs(batch_assignments, image_index, train_images, test_images, training, params, ordering)
    if parallel.is_handing_out():
        finished = parallel.map_tasks(train_seed, runs, label=f"gradient_training-{ordering}")
    else:
        finished = [train_seed(run) for run in runs]
    results = OrderingResults.from_runs(ordering, finished)
    written = {run.partition_id(epoch, batch): str(run.gradient_path(epoch, batch))
               for run in runs for epoch in sorted(run.kept_epochs) for batch in range(run.data.num_batches)}
    return (written, results.distances, results.distance_matrix, results.history,
            flat_model_states(results.model_states), results.null_distances)


def _log_start(run: GradientProbeRun) -> None:
    config = run.config
    logger.info(
        "%s, seed %d: run '%s', %s (%s parameters), %d epochs of %d batches of %d on %s; gradients of epochs %s "
        "kept in %s", run.ordering, run.seed, run.run_name, config.model, f"{run.num_params:,}", config.num_epochs,
        run.data.num_batches, run.data.batch_size, run.device, _epoch_list(run.kept_epochs) or "none",
        run.gradients_dir,
    )


def _epoch_list(epochs: set[int]) -> str:
    return ", ".join(map(str, sorted(epochs)))
