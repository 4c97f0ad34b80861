"""Nodes of ``gradient_training``: thin wrappers around ``best_minibatch.training.gradient_training``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pandas as pd
import torch

from best_minibatch import parallel
from best_minibatch.training.gradient_training import (
    GradientProbeRun,
    OrderingResults,
    ProbeResults,
    TrainingConfig,
    TrainingData,
    TrainingDataError,
    flat_model_states,
    named_model_factory,
)

logger = logging.getLogger(__name__)

#: What ``probe_results`` holds while training runs; Kedro keeps only the last chunk, the results.
PENDING = "training in progress"


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


def train_seed(run: GradientProbeRun) -> Iterator[tuple[dict[str, torch.Tensor], ProbeResults | str]]:
    """One (ordering, seed) run to its end, resuming from its last checkpoint (or reusing a finished run).

    Yields ``({partition_id: gradient}, PENDING)`` for every kept mini-batch gradient as
    it is computed, then ``({}, ProbeResults)`` once. The unit of work a scheduler can
    hand out: it needs nothing but the run.
    """
    _log_start(run)
    for spilled in run.run():
        yield {run.partition_id(spilled.epoch, spilled.batch): spilled.gradient}, PENDING
    yield {}, run.results


def _train_seed_writing_gradients(run: GradientProbeRun) -> ProbeResults:
    """One (ordering, seed) run as a task of the cluster: :func:`train_seed`'s log line, then the training."""
    _log_start(run)
    return run.run_writing_gradients()


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
) -> Iterator[tuple[dict[str, torch.Tensor], OrderingResults | str]]:
    """Train one ordering with the gradient probe (Algorithm 1) once per seed, one seed after another.

    Yields ``({partition_id: gradient}, PENDING)`` for every kept mini-batch gradient
    as it is computed (Kedro writes it to ``batch_gradients`` before training goes
    on), then ``({}, OrderingResults)`` once. Every check of every seed's run runs
    before the first yield.
    """
    runs = prepare_seed_runs(batch_assignments, image_index, train_images, test_images, training, params, ordering)
    if parallel.is_handing_out():
        # Under the Dask runner every seed is a task of its own (on its own GPU); each writes its kept
        # gradients to the files this node's partitioned dataset would write (GradientProbeRun.run_writing_gradients).
        finished = parallel.map_tasks(_train_seed_writing_gradients, runs, label=f"gradient_training-{ordering}")
        yield {}, OrderingResults.from_runs(ordering, finished)
        return
    finished: list[ProbeResults] = []
    for run in runs:
        for chunk, result in train_seed(run):
            if isinstance(result, ProbeResults):
                finished.append(result)
            else:
                yield chunk, result
    yield {}, OrderingResults.from_runs(ordering, finished)


def publish_probe_results(
    probe_results: OrderingResults | str,
) -> tuple[pd.DataFrame, torch.Tensor, pd.DataFrame, dict[str, torch.Tensor], pd.DataFrame]:
    """Split an ordering's finished runs into its versioned outputs: distances, distance matrix (S x E x K),
    history, models (one flat dict keyed ``seed=<S>/<state-dict key>``), null distances; the tables have a
    ``seed`` column."""
    if not isinstance(probe_results, OrderingResults):
        raise RuntimeError("train_with_gradient_probe ended without results; see the error it raised above.")
    return (probe_results.distances, probe_results.distance_matrix, probe_results.history,
            flat_model_states(probe_results.model_states), probe_results.null_distances)


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
