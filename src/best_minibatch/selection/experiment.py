"""Batch selection: does training on the "best" mini-batches converge faster than shuffling?

Knows nothing of Kedro. The ``batch_selection`` pipeline (the paper's open
question, section 5, future work 2) trains every (seed, policy) run through the
project's one training loop (``training.loop.train_epochs``), each policy
supplying the batches of every epoch (``policies.py``); the oracle probes through
Algorithm 1's probe (``training.algorithm1.GradientProbe``). ``config.py`` holds
the parameters, ``pools.py`` the static policies' batches, ``statistics.py`` the
statistics and the report. ``docs/batch_selection.md`` states every policy
precisely.

Every policy answers one question per epoch: which ``K`` mini-batches (arrays of
``m`` image ids) to take the epoch's ``K`` optimizer steps on, where ``K =
floor(N / m)`` for the ``N`` training images (the training images minus a held-out
validation split). All policies therefore take exactly the same number of steps
per epoch and in total; a policy that trains on a subset of batches cycles
through that subset. Only training image ids are ever returned (the runner
checks this on every epoch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from best_minibatch.data.images import augment, batch_generator, to_model_input
from best_minibatch.data.tensor_io import GIB
from best_minibatch.selection.config import (
    CLASS_BALANCED,
    CONTROL,
    CURVE_COLUMNS,
    RESULT_COLUMNS,
    SelectionConfig,
    SelectionDataError,
    kept_count,
)
from best_minibatch.selection.policies import BatchPolicy, build_policy
from best_minibatch.selection.pools import subset_ids
from best_minibatch.services import parallel
from best_minibatch.training.algorithm1 import GradientProbe
from best_minibatch.training.loop import (
    DivergenceError,
    Evaluation,
    LoopState,
    evaluate,
    progress_bar,
    train_epochs,
)
from best_minibatch.training.probing import EpochGradients
from best_minibatch.training.recipe import EpochPlan, TrainingRecipe, training_environment

logger = logging.getLogger(__name__)

__all__ = ["DivergenceError"]


def probe_distances(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_batches: int,
    memory_cap_bytes: float = float("inf"),
    probe: GradientProbe | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
) -> np.ndarray:
    """Distances ``||g_k - g_mean||`` of each batch's gradient at ``model``'s current parameters.

    Through Algorithm 1's probe (``net_compare``): a separate copy of the model
    (parameters and BatchNorm buffers), in training mode, takes one forward and
    backward pass per batch and no update, so ``model`` is left untouched. The mean
    over the batches stands for the full gradient; the distances are exact float64.
    Pass ``probe`` to reuse one probe (its copy of the model) across epochs.
    """
    if probe is None:
        probe = oracle_probe(model, memory_cap_bytes, loss_fn)
    probe.begin(model, num_batches)
    count = 0
    for inputs, targets in batches:
        probe.gradient(inputs, targets)
        count += 1
    if count != num_batches:
        probe.close()
        raise ValueError(f"Probed {count} batches, expected {num_batches}.")
    return np.asarray(probe.measures()["distance"], dtype=np.float64)


def oracle_probe(model: nn.Module, memory_cap_bytes: float = float("inf"),
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy
                 ) -> GradientProbe:
    """Algorithm 1's probe for ``model``, buffering gradients on its device up to ``memory_cap_bytes``."""
    params = [p for p in model.parameters() if p.requires_grad]
    num_params = sum(p.numel() for p in params)
    dtype, device = params[0].dtype, params[0].device
    return GradientProbe(model, 0, lambda count: EpochGradients(count, num_params, dtype, device, memory_cap_bytes),
                         contextlib.nullcontext, loss_fn)


@dataclass
class ImageData:
    """Model-ready tensors: every training-split image (train and validation subsets), and the test split."""

    inputs: torch.Tensor  # N x 3 x H x W floats (normalised), rows = image_index rows of the train split
    labels: torch.Tensor  # N int64
    row_of_id: Mapping[int, int] | np.ndarray  # image_id -> row (an array when ids are 0..N-1)
    train_ids: np.ndarray
    validation_ids: np.ndarray
    test_inputs: torch.Tensor
    test_labels: torch.Tensor

    def to(self, device: torch.device | str) -> ImageData:
        """The same data with its tensors on ``device`` (itself when they are there already)."""
        device = torch.device(device)
        if self.inputs.device == device or (device.index is None and self.inputs.device.type == device.type):
            return self
        return dataclasses.replace(self, inputs=self.inputs.to(device), labels=self.labels.to(device),
                                   test_inputs=self.test_inputs.to(device), test_labels=self.test_labels.to(device))

    def rows(self, image_ids: np.ndarray) -> torch.Tensor:
        ids = np.asarray(image_ids, dtype=np.int64)
        if isinstance(self.row_of_id, np.ndarray):
            return torch.from_numpy(self.row_of_id[ids])
        return torch.tensor([self.row_of_id[int(i)] for i in ids.ravel()], dtype=torch.int64).view(ids.shape)

    @classmethod
    def from_tables(cls, image_index: pd.DataFrame, split: pd.DataFrame, train_images: torch.Tensor,
                    test_images: torch.Tensor, device: torch.device | str = "cpu") -> ImageData:
        """Convert the uint8 NHWC tensors once (``images.to_model_input``) and map ids to rows."""
        train_index = image_index.loc[image_index["split"] == "train"]
        test_index = image_index.loc[image_index["split"] == "test"].sort_values("row")
        if len(train_index) != train_images.shape[0] or len(test_index) != test_images.shape[0]:
            raise SelectionDataError(
                f"image_index lists {len(train_index)} train / {len(test_index)} test images but the tensors hold "
                f"{train_images.shape[0]} / {test_images.shape[0]}; use one ingest_cifar run's outputs."
            )
        ids = train_index["image_id"].to_numpy(np.int64)
        rows = train_index["row"].to_numpy(np.int64)
        row_of_id = np.full(int(ids.max()) + 1, -1, dtype=np.int64)
        row_of_id[ids] = rows
        labels = np.full(train_images.shape[0], -1, dtype=np.int64)
        labels[rows] = train_index["label"].to_numpy(np.int64)
        split_ids = split["image_id"].to_numpy(np.int64)
        if not np.isin(split_ids, ids).all():
            raise SelectionDataError("The validation split names images that are not training images of image_index.")
        device = torch.device(device)
        return cls(
            inputs=to_model_input(train_images).to(device),
            labels=torch.from_numpy(labels).to(device),
            row_of_id=row_of_id,
            train_ids=subset_ids(split, "train"),
            validation_ids=subset_ids(split, "validation"),
            test_inputs=to_model_input(test_images).to(device),
            test_labels=torch.from_numpy(test_index["label"].to_numpy(np.int64).copy()).to(device),
        )


def train_with_policy(
    policy: BatchPolicy,
    model: nn.Module,
    data: ImageData,
    recipe: TrainingRecipe,
    seed: int,
    memory_cap_bytes: float = float("inf"),
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    upfront_seconds: float = 0.0,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Train ``model`` (already initialised, on its device) for the recipe's epochs on the policy's batches.

    Through the shared loop: SGD with momentum and weight decay, the learning rate
    set per phase. Before the first step and ``evaluations_per_epoch`` times per
    epoch the model is evaluated on the validation images; the clock (``seconds``)
    counts training steps and gradient probing only, not evaluations. ``passes``
    counts forward + backward passes of one batch: optimizer steps plus the
    oracle's probes. ``upfront_seconds`` is the policy's selection cost paid before
    training (``learned``'s distances): ``total_seconds`` = ``seconds`` + it, in the
    curve and the results. Returns the curve (one row per evaluation,
    :data:`CURVE_COLUMNS`) and the run's results (:data:`RESULT_COLUMNS`; test
    accuracy is measured once, at the end).
    """
    device = data.inputs.device
    optimizer = recipe.optimizer(model)
    validation_rows = data.rows(data.validation_ids).to(device)
    validation = (data.inputs[validation_rows], data.labels[validation_rows])
    probe = oracle_probe(model, memory_cap_bytes) if policy.probes else None
    counters = {"probe_passes": 0, "probe_seconds": 0.0}
    curve: list[dict[str, Any]] = []
    trained = np.zeros(0, dtype=np.int64)

    def in_batches(inputs: torch.Tensor, labels: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        size = recipe.eval_batch_size
        return ((inputs[start:start + size], labels[start:start + size]) for start in range(0, len(labels), size))

    def evaluate_validation(net: nn.Module) -> tuple[float, float]:
        return evaluate(net, in_batches(*validation))

    def record(plan: EpochPlan, step: int, seconds: float, train_loss: float, val_loss: float,
               val_accuracy: float) -> None:
        curve.append({"seed": seed, "policy": policy.name, "epoch": plan.epoch, "phase": plan.phase,
                      "learning_rate": plan.learning_rate, "step": step,
                      "passes": step + counters["probe_passes"], "probe_passes": counters["probe_passes"],
                      "seconds": seconds, "probe_seconds": counters["probe_seconds"],
                      "total_seconds": seconds + upfront_seconds, "train_loss": train_loss,
                      "val_loss": val_loss, "val_accuracy": val_accuracy})

    def probe_candidates(candidates: np.ndarray) -> np.ndarray:
        def tensors():
            for ids in candidates:
                rows = data.rows(ids).to(device)
                yield data.inputs[rows], data.labels[rows]
        return probe_distances(model, tensors(), len(candidates), memory_cap_bytes, probe)

    def batches_of(plan: EpochPlan) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        nonlocal trained
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        batches = policy.epoch_batches(plan.epoch, plan.phase, probe_candidates if policy.probes else None)
        if policy.probes:  # the oracle's probing is part of its wall-clock (the loop's clock counts it too)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            counters["probe_seconds"] += time.perf_counter() - started
            counters["probe_passes"] += getattr(policy, "num_candidates", 0)
        _check_schedule(policy, batches, data.train_ids, plan.epoch)
        trained = np.union1d(trained, np.unique(batches))
        for k, ids in enumerate(batches):
            rows = data.rows(ids).to(device)
            inputs = data.inputs[rows]
            if recipe.augment:
                inputs = augment(inputs.cpu(), batch_generator(seed, plan.epoch, k)).to(device)
            yield inputs, data.labels[rows]

    def on_evaluation(evaluation: Evaluation, state: LoopState) -> None:
        record(evaluation.plan, state.step, state.seconds, evaluation.train_loss, evaluation.loss,
               evaluation.accuracy)

    def divergence(plan: EpochPlan, k: int, what: str) -> str:
        return (f"Policy '{policy.name}', seed {seed}, epoch {plan.epoch}, batch {k}: the {what} is not finite. "
                "Lower the learning rates in batch_selection.training.phases.")

    first = recipe.schedule[0]
    record(EpochPlan(0, 1, first.learning_rate), 0, 0.0, float("nan"), *evaluate_validation(model))
    model.train()
    state = LoopState()
    try:
        for _ in train_epochs(model, optimizer, recipe, recipe.schedule, batches_of,
                              lambda plan: policy.steps_per_epoch, evaluate=evaluate_validation,
                              on_evaluation=on_evaluation, divergence=divergence,
                              on_epoch_end=(lambda result, _: on_epoch(curve[-1])) if on_epoch else None,
                              label=f"{policy.name} seed {seed}", state=state):
            pass
    finally:
        if probe is not None:
            probe.close()
    test_loss, test_accuracy = evaluate(model, in_batches(data.test_inputs, data.test_labels))
    results = {"seed": seed, "policy": policy.name, "steps": state.step,
               "passes": state.step + counters["probe_passes"], "probe_passes": counters["probe_passes"],
               "seconds": state.seconds, "probe_seconds": counters["probe_seconds"],
               "upfront_seconds": upfront_seconds, "selection_seconds": counters["probe_seconds"] + upfront_seconds,
               "total_seconds": state.seconds + upfront_seconds, "final_val_accuracy": curve[-1]["val_accuracy"],
               "test_loss": test_loss,
               "test_accuracy": test_accuracy, "distinct_images_trained": len(trained)}
    return pd.DataFrame(curve, columns=CURVE_COLUMNS), results


def _check_schedule(policy: BatchPolicy, batches: np.ndarray, allowed: np.ndarray, epoch: int) -> None:
    """Every policy takes exactly the baseline's steps, on training (never validation or test) images."""
    expected = (policy.steps_per_epoch, policy.batch_size)
    if batches.shape != expected:
        raise RuntimeError(f"Policy '{policy.name}' gave {batches.shape} batches in epoch {epoch}; expected {expected}.")
    foreign = ~np.isin(batches, allowed)
    if foreign.any():
        raise RuntimeError(
            f"Policy '{policy.name}' picked image {int(batches[foreign][0])} in epoch {epoch}, which is not a "
            "training image of the split (validation and test images must never be trained on)."
        )


def describe_setup(config: SelectionConfig, split: pd.DataFrame, results: pd.DataFrame | None = None) -> dict[str, str]:
    """The experiment's setup in words, for the report."""
    n_train = int((split["subset"] == "train").sum())
    n_validation = int((split["subset"] == "validation").sum())
    m = config.recipe.batch_size
    k = n_train // m
    candidates = k if config.oracle_candidates is None else min(config.oracle_candidates, k)
    phases = ", ".join(f"{epochs} x lr {lr:g}" for epochs, lr in config.recipe.phases)
    options = "".join(f", {key}={value}" for key, value in config.recipe.model_options)
    setup = {
        "model": f"{config.recipe.model}{options}",
        "images": f"{n_train} training, {n_validation} validation (stratified, held out from the training split)",
        "batches": f"{m} images, {k} optimizer steps per epoch for every policy "
                   f"({n_train - k * m} images left out of each epoch)",
        "schedule": f"{config.recipe.num_epochs} epochs in phases {phases}; SGD momentum {config.recipe.momentum:g}, "
                    f"weight decay {config.recipe.weight_decay:g}; augmentation {'on' if config.recipe.augment else 'off'}",
        "seeds": f"{len(config.seeds)} per policy ({', '.join(map(str, config.seeds))})",
        "target": f"validation accuracy {config.target_validation_accuracy:.3f}",
        "policies": ", ".join(config.policies),
        "learned": f"per phase the {kept_count(config.learned_keep_fraction, k)} of {config.learned_ordering}'s "
                   f"{k} batches ({config.learned_keep_fraction:.0%}) with the lowest {config.learned_measure}",
        "oracle": f"keeps the {config.oracle_keep_fraction:.0%} closest of "
                  f"{'all' if config.oracle_candidates is None else config.oracle_candidates} probed candidates "
                  f"({kept_count(config.oracle_keep_fraction, candidates)} of {candidates} per epoch)",
        "device": str(config.recipe.resolved_device()),
    }
    if balanced := [p for p in CLASS_BALANCED if p in config.policies]:
        classes = int(split["label"].nunique())
        extra = m - classes * (m // classes)
        setup[" and ".join(balanced)] = (
            f"{m // classes} images of each of the {classes} classes in every batch"
            + (f", the other {extra} from {extra} different classes in turn" if extra else "")
            + " (class_balanced: a fresh partition each epoch; class_balanced_fixed: one per seed, reordered)")
    if CONTROL in config.policies:
        setup[CONTROL] = (f"per phase a random {kept_count(config.learned_keep_fraction, k)} of "
                          f"{config.fixed_ordering}'s {k} batches (learned's count), drawn per seed and phase")
        setup["device"] = setup.pop("device")
    if results is not None and len(results):
        setup["total training time"] = f"{results['seconds'].sum() / 60:.1f} min over {len(results)} runs"
    return setup


@dataclass
class ExperimentResults:
    curves: pd.DataFrame
    results: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def run_experiment(
    config: SelectionConfig,
    data: ImageData,
    pools: pd.DataFrame,
    model_factory: Callable[[], nn.Module],
    upfront_seconds: Mapping[str, float] | None = None,
) -> ExperimentResults:
    """Every seed x policy run. Seeds are the outer loop so that a change in machine load hits all policies.

    For a seed every policy starts from the same initial weights
    (``torch.manual_seed(seed)`` before ``model_factory()``), so results pair by seed.
    Each run is a pure function of its :class:`SelectionRun`; under the Dask runner
    every run is a task of its own (``best_minibatch.services.parallel``), elsewhere they run
    here one after another. The tables are assembled in run order either way.
    ``data`` may live on the CPU: each run moves it to the recipe's device.
    ``upfront_seconds`` maps a policy to its selection cost paid before training
    (:func:`upfront_selection_seconds`), added to every run's ``total_seconds``.
    """
    recipe = config.recipe
    device = recipe.resolved_device()
    quiet = dataclasses.replace(recipe, progress_bar=False)  # one bar over runs, not per epoch
    if not parallel.is_handing_out():
        data = data.to(device)  # once here; a task on another worker moves its own copy
    upfront = dict(upfront_seconds or {})
    runs = [SelectionRun(config, quiet, pools, model_factory, seed, name, float(upfront.get(name, 0.0)))
            for seed in config.seeds for name in config.policies]
    with progress_bar(recipe.progress_bar, "batch_selection runs", len(runs)) as advance:
        def done(index: int, outcome: tuple[pd.DataFrame, dict[str, Any]]) -> None:
            result = outcome[1]
            logger.info(
                "batch_selection run %d/%d: seed %d, %s: %d steps (+%d probe passes) in %.1f s (probing %.1f s) | "
                "final val acc %.3f | test acc %.3f",
                index + 1, len(runs), result["seed"], result["policy"], result["steps"], result["probe_passes"],
                result["seconds"], result["probe_seconds"], result["final_val_accuracy"], result["test_accuracy"],
            )
            advance()

        # The images go to each worker once (shared), not once per run: at the full geometry they are
        # 60,000 model-ready images, about 0.7 GB, against 40 runs.
        outcomes = parallel.map_tasks(train_one_run, runs, label="batch_selection", on_result=done, shared=data)
    return ExperimentResults(pd.concat([curve for curve, _ in outcomes], ignore_index=True),
                             pd.DataFrame([result for _, result in outcomes], columns=RESULT_COLUMNS))


@dataclass
class SelectionRun:
    """One (seed, policy) run of the experiment: everything it needs but the images, so it can run in another
    process (the images, the same for every run, travel beside it once per worker)."""

    config: SelectionConfig
    recipe: TrainingRecipe  # the experiment's recipe without the per-epoch progress bar
    pools: pd.DataFrame
    model_factory: Callable[[], nn.Module]
    seed: int
    policy: str
    upfront_seconds: float = 0.0


def train_one_run(run: SelectionRun, data: ImageData) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Train one (seed, policy) run on ``data`` from its seed's initial weights; its curve and results."""
    with training_environment(run.recipe):
        device = run.recipe.resolved_device()
        data = data.to(device)
        torch.manual_seed(run.seed)
        model = run.model_factory().to(device)
        labels = data.labels[data.rows(data.train_ids).to(data.labels.device)].cpu().numpy()
        policy = build_policy(run.policy, run.config, run.seed, data.train_ids, run.pools, labels=labels)
        return train_with_policy(policy, model, data, run.recipe, run.seed, run.config.oracle_memory_cap_gb * GIB,
                                 upfront_seconds=run.upfront_seconds)


def upfront_selection_seconds(config: SelectionConfig, histories: Mapping[str, pd.DataFrame]) -> dict[str, float]:
    """Each policy's selection cost paid before training, in measured seconds: ``{policy: seconds}``.

    ``learned`` picks its batches from ``distance_analysis``' distances, which exist
    only because ``gradient_training`` trained ``learned.ordering`` with Algorithm 1's
    probe for every seed: its cost is the sum of that ordering's ``training_history``
    ``seconds`` (every epoch of every seed: training pass, probe of every batch, null
    batches, test evaluation), charged in full to each ``learned`` run
    (``learned.charge_distance_seconds: false`` charges nothing). The oracle's cost
    is paid during training and is already in its ``seconds`` (``probe_seconds``).
    Other policies have none.
    """
    if "learned" not in config.policies or not config.learned_charge_distance_seconds:
        return {}
    history = histories.get(config.learned_ordering)
    if history is None or len(history) == 0 or "seconds" not in history.columns:
        raise SelectionDataError(
            f"learned's up-front cost is the seconds of gradient_training's '{config.learned_ordering}' run, but "
            f"{config.learned_ordering}.training_history is {'empty' if history is not None else 'missing'}; run "
            "gradient_training first, or set batch_selection.learned.charge_distance_seconds: false."
        )
    seconds = history["seconds"].to_numpy(np.float64)
    if not np.isfinite(seconds).all() or (seconds < 0).any():
        raise SelectionDataError(f"{config.learned_ordering}.training_history has seconds that are not finite and "
                                 "non-negative; rerun gradient_training.")
    return {"learned": float(seconds.sum())}
