"""``gradient_training``: the paper's experiment, Algorithm 1 run per ordering and seed.

Knows nothing of Kedro; one owner per concern:

* :mod:`.config`: the parameters (:class:`TrainingConfig`), a run's identity and its epoch order;
* :mod:`.data`: one ordering's fixed batches and the test split (:class:`TrainingData`);
* :mod:`.checks`: what is refused before any work (disk, memory, time) and before each epoch (free space);
* :mod:`.store`: a run's folders: checkpoints, spilled gradients (the one writer), the resume decision;
* :mod:`.tables`: the rows a run accumulates and the tables it publishes;
* :mod:`.run`: the run itself (:class:`GradientProbeRun`).

The shared engine (loop, recipe, models, the probe of Algorithm 1) is ``best_minibatch.training``.
"""

from best_minibatch.gradient_training.checks import (
    DiskSpaceError,
    check_buffer_memory,
    check_disk_cap,
    check_expected_time,
    check_null_batches,
    check_run_folder,
    estimate_hours,
)
from best_minibatch.gradient_training.config import (
    BATCH_ORDERS,
    SPILL_DTYPES,
    TrainingConfig,
    TrainingConfigError,
    epoch_order,
    named_model_factory,
    run_identity,
    seed_run_name,
)
from best_minibatch.gradient_training.data import TrainingData, TrainingDataError
from best_minibatch.gradient_training.run import GradientProbeRun
from best_minibatch.gradient_training.store import CheckpointError, GradientFiles, RunConflictError, RunStore
from best_minibatch.gradient_training.tables import (
    DISTANCE_COLUMNS,
    HISTORY_COLUMNS,
    NULL_COLUMNS,
    OrderingResults,
    ProbeResults,
    flat_model_states,
    seed_model_states,
)

__all__ = [
    "BATCH_ORDERS", "DISTANCE_COLUMNS", "HISTORY_COLUMNS", "NULL_COLUMNS", "SPILL_DTYPES", "CheckpointError",
    "DiskSpaceError", "GradientFiles", "GradientProbeRun", "OrderingResults", "ProbeResults", "RunConflictError",
    "RunStore", "TrainingConfig", "TrainingConfigError", "TrainingData", "TrainingDataError", "check_buffer_memory",
    "check_disk_cap", "check_expected_time", "check_null_batches", "check_run_folder", "epoch_order",
    "estimate_hours", "flat_model_states", "named_model_factory", "run_identity", "seed_model_states", "seed_run_name",
]
