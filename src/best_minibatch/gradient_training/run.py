"""``gradient_training``'s run: Algorithm 1 for one ordering and one seed, resumable, its gradients spilled.

Knows nothing of Kedro. :class:`GradientProbeRun` trains ``net_normal`` on one
ordering's fixed mini-batches through the shared loop (``training.loop.train_epochs``)
with the paper's probe as its hook (``training.algorithm1.GradientProbe``:
``net_compare`` takes ``net_normal``'s full state at every epoch start and computes
each batch's gradient on exactly the inputs ``net_normal`` gets). Once an epoch
ends, every distance to the full gradient is computed exactly in float64, kept
epochs' gradients are on disk (``store.GradientFiles``) and a checkpoint (model,
optimizer, RNG states, the rows so far) is written atomically, so a rerun after an
interruption resumes from the last complete epoch and produces the same tables bit
for bit on a CPU (``store.RunStore``). See ``docs/gradient_training.md``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from best_minibatch.data.images import augment, batch_generator, to_model_input
from best_minibatch.data.tensor_io import GIB
from best_minibatch.gradient_training.checks import check_disk_cap, check_free_space, torch_save_overhead
from best_minibatch.gradient_training.config import SPILL_DTYPES, TrainingConfig, epoch_order, run_identity, seed_run_name
from best_minibatch.gradient_training.data import TrainingData
from best_minibatch.gradient_training.store import GradientFiles, RunStore, config_hash
from best_minibatch.gradient_training.tables import (
    DISTANCE_COLUMNS,
    ProbeResults,
    Progress,
    distance_frame,
    history_frame,
    null_frame,
)
from best_minibatch.services.parallel import exclusive
from best_minibatch.training.algorithm1 import GradientProbe
from best_minibatch.training.loop import DivergenceError, EpochResult, LoopState, evaluate, train_epochs
from best_minibatch.training.probing import (
    GRADIENT_MEASURES,
    EpochGradients,
    GradientVarianceTrace,
    NonFiniteGradientError,
)
from best_minibatch.training.recipe import EpochPlan, training_environment

logger = logging.getLogger(__name__)
#: One line per epoch: in the log file (and in a terminal's progress bar), not in the terminal's log lines.
epoch_logger = logging.getLogger(f"{__name__}.epochs")


class _SpillingProbe(GradientProbe):
    """Algorithm 1's probe, plus what this experiment keeps of each gradient: spills and the variance trace."""

    def __init__(self, run: GradientProbeRun, net_normal: nn.Module) -> None:
        config = run.config
        on_device = config.buffer_on_model_device and run.device.type == "cuda"
        scratch = config.scratch_dir or (run.store.scratch_dir if run.store is not None else None)
        super().__init__(
            net_normal, run.data.num_batches,
            lambda count: EpochGradients(count, run.num_params, run.param_dtype, run.device if on_device else "cpu",
                                         config.buffer_memory_cap_gb * GIB, scratch),
            config.recipe.autocast, chunk=config.recipe.probe_chunk)
        self.run = run
        self.spill_dtype = run.gradients.dtype
        self.variance: GradientVarianceTrace | None = None
        self.order = np.arange(run.data.num_batches)
        self.checksums: list[int] = []  # by batch, not by step

    def start_epoch(self, plan: EpochPlan, model: nn.Module) -> None:
        super().start_epoch(plan, model)
        # Per-example gradients at the epoch-start parameters, BatchNorm on the epoch-start running statistics.
        self.variance = GradientVarianceTrace(self.net_compare) if self.run.trace else None
        self.order = self.run.epoch_order(plan.epoch)
        self.checksums = [0] * len(self.order)

    def after_step(self, plan: EpochPlan, k: int, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        computed = self.step_gradients(k, inputs, targets)  # the batched probe: the queued steps' gradients, or none
        if self.variance is not None:
            self.variance.add(inputs, targets)
        if plan.epoch in self.run.kept_epochs:
            for step, gradient in computed:
                batch = int(self.order[step])
                spilled = gradient.to("cpu", self.spill_dtype, copy=True)
                self.checksums[batch] = self.run.gradients.write(plan.epoch, batch, spilled)

    def measures(self) -> dict[str, Any]:
        """The epoch's measures by batch (the buffer holds them by step) and each batch's ``position`` (its step)."""
        measures = super().measures()
        position = np.empty_like(self.order)
        position[self.order] = np.arange(len(self.order))
        for c in GRADIENT_MEASURES:
            by_batch = np.empty_like(measures[c])
            by_batch[self.order] = measures[c]
            measures[c] = by_batch
        measures["position"] = position
        return measures


class GradientProbeRun:
    """One ordering's training run with the gradient probe, for one seed.

    Construction checks everything (parameters, data, the disk cap, the run
    folder) and writes nothing; :meth:`run` then trains to the end, writing each
    kept gradient (:class:`~best_minibatch.gradient_training.store.GradientFiles`, the
    one writer under every runner), a checkpoint after every epoch, and returns the
    :class:`ProbeResults`.

    ``probe=False`` trains ``net_normal`` alone (no compare pass, no distances):
    the plain-training baseline of the benchmark and of the test showing that the
    compare pass does not disturb training. ``checkpoint_dir: null`` in the config
    runs without checkpoints. ``seed`` (default: the first of ``config.seeds``) sets
    the initial weights, the augmentation and the null batches' draws; the fixed
    batches are the data's: batching ``batching`` of the ordering (a metric's one
    batching for every seed; a control's own batching per seed).
    """

    def __init__(self, config: TrainingConfig, data: TrainingData, model_factory: Callable[[], nn.Module],
                 ordering: str, *, probe: bool = True, seed: int | None = None, batching: int = 0) -> None:
        self.config = config
        self.data = data
        self.ordering = ordering
        self.batching = int(batching)  # which of the ordering's batchings ``data`` holds (a control has one per seed)
        self.probe = probe
        self.seed = config.seeds[0] if seed is None else int(seed)
        # How the log names this run: the ordering, and the seed when several are configured.
        self.label = ordering if len(config.seeds) == 1 and self.seed == config.seeds[0] else f"{ordering} seed {self.seed}"
        self.device = config.resolved_device()
        self.schedule = config.schedule
        self.kept_epochs = set(config.kept_epochs) if probe else set()
        self.trace = probe and config.traces(ordering)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            probe_model = model_factory()
        self.model_factory = model_factory
        self.num_params = sum(p.numel() for p in probe_model.parameters() if p.requires_grad)
        self.param_dtype = next(probe_model.parameters()).dtype
        # A checkpoint holds the model's state and one momentum buffer per parameter.
        self.checkpoint_bytes = (sum(t.numel() * t.element_size() for t in probe_model.state_dict().values())
                                 + self.num_params * self.param_dtype.itemsize)
        del probe_model
        spill_bytes = self.num_params * SPILL_DTYPES[config.spill_dtype].itemsize
        self.spill_file_bytes = spill_bytes + torch_save_overhead(SPILL_DTYPES[config.spill_dtype])
        if probe:
            check_disk_cap(config, self.num_params, data.num_batches)
        identity = run_identity(config, ordering, self.num_params, self.param_dtype, data.fingerprint(), probe,
                                seed=self.seed)
        self.identity = identity
        self.digest = config_hash(identity)
        self.run_name = (f"{config.model}-{self.digest[:12]}" if config.run_name == "auto"
                         else seed_run_name(config.run_name, self.seed))
        self.gradients_dir = Path(config.gradients_dir) / self.run_name / ordering
        self.gradients = GradientFiles(self.gradients_dir, self.num_params, SPILL_DTYPES[config.spill_dtype])
        self.store = None
        if config.checkpoint_dir is not None:
            self.store = RunStore(config.checkpoint_dir, self.run_name, ordering, self.gradients_dir,
                                  config.keep_checkpoints)
            self.store.check_compatible(identity, self.digest)
        self.results: ProbeResults | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """``order[k]``: the batch trained at step ``k`` of ``epoch`` (:func:`epoch_order`)."""
        return epoch_order(self.config.batch_order, self.seed, epoch, self.data.num_batches)

    def partition_id(self, epoch: int, batch: int) -> str:
        """The spilled gradient's id under the gradients root: ``<run_name>/<ordering>/epoch=EEE/batch=KKKK``."""
        return f"{self.run_name}/{self.ordering}/epoch={epoch:03d}/batch={batch:04d}"

    def gradient_path(self, epoch: int, batch: int) -> Path:
        return self.gradients.path(epoch, batch)

    # ------------------------------------------------------------------ main loop

    def run(self) -> ProbeResults:
        """Train every remaining epoch (resuming from the last checkpoint); return the results.

        One run at a time trains in a run folder (:func:`best_minibatch.services.parallel.exclusive`),
        whichever runner or process starts it.
        """
        recipe = self.config.recipe
        folder_lock = exclusive(self.store.folder) if self.store is not None else contextlib.nullcontext()
        with folder_lock, training_environment(recipe):
            if self.store is not None:
                self.store.claim(self.identity, self.digest)
            torch.manual_seed(self.seed)
            net_normal = self.model_factory().to(self.device)
            optimizer = recipe.optimizer(net_normal)
            progress = Progress()
            start = self._resume(net_normal, optimizer, progress)
            probe = _SpillingProbe(self, net_normal) if self.probe else None
            started: dict[int, float] = {}

            def batches_of(plan: EpochPlan) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
                return (self._batch_inputs(plan.epoch, int(batch)) for batch in self.epoch_order(plan.epoch))

            def before_epoch(plan: EpochPlan) -> None:
                started[plan.epoch] = time.perf_counter()
                self._check_free_space(plan.epoch, plan.epoch in self.kept_epochs)

            def epoch_end(result: EpochResult, state: LoopState) -> None:
                self._finish_epoch(result, net_normal, optimizer, probe, progress,
                                   time.perf_counter() - started[result.plan.epoch])

            try:
                for _ in train_epochs(
                    net_normal, optimizer, recipe, self.schedule[start:], batches_of, lambda _: self.data.num_batches,
                    evaluate=self._evaluate, hook=probe, on_epoch_start=before_epoch, on_epoch_end=epoch_end,
                    divergence=self._divergence_message, label=self.label,
                ):
                    pass  # the probe writes what it keeps; the loop yields nothing here
            finally:
                if probe is not None:
                    probe.close()
            self.results = self._assemble(net_normal, progress)
        return self.results

    def _finish_epoch(self, result: EpochResult, net_normal: nn.Module, optimizer: torch.optim.Optimizer,
                      probe: _SpillingProbe | None, progress: Progress, seconds: float) -> None:
        plan = result.plan
        measures = None
        if probe is not None:
            # The same-parameter null: R random batches through the same net_compare, still at θ_e.
            null = (probe.null_measures(self._null_batch(plan.epoch, r) for r in range(self.config.null_batches))
                    if self.config.null_batches else None)
            try:
                measures = probe.measures()
            except NonFiniteGradientError as error:
                raise DivergenceError(self._divergence_message(plan, None, str(error))) from error
            if null is not None:
                self._record_null(plan, {**measures, "null": null}, progress)
        kept = plan.epoch in self.kept_epochs
        if kept:
            progress.gradient_checksums[plan.epoch] = probe.checksums
        test_loss, test_accuracy = result.evaluations[-1].loss, result.evaluations[-1].accuracy
        self._record(plan, measures, result.train_loss, result.train_accuracy, test_loss, test_accuracy, seconds,
                     kept, progress, probe.variance.trace() if probe is not None and probe.variance is not None
                     else math.nan)
        if self.store is not None:
            state = {
                "model": net_normal.state_dict(),
                "optimizer": optimizer.state_dict(),
                **progress.to_state(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            }
            self.store.save_checkpoint(plan.epoch, state, self.digest)

    def _resume(self, net_normal: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress) -> int:
        """Load the newest usable checkpoint (:meth:`RunStore.resume_point`), if any; the epochs done."""
        if self.store is None:
            return 0
        done, state = self.store.resume_point(self.digest, self.gradients, self.kept_epochs, self.data.num_batches,
                                              self.label)
        if state is None:
            return 0
        net_normal.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        progress.__dict__.update(Progress.from_state(state).__dict__)
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and state.get("rng_cuda"):
            torch.cuda.set_rng_state_all(list(state["rng_cuda"]))
        verb = "complete; reusing its results" if done == len(self.schedule) else f"resuming after epoch {done}"
        logger.info("%s: run '%s' found in %s, %s", self.label, self.run_name, self.store.folder, verb)
        return done

    def _batch_inputs(self, epoch: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.data.batches[batch]
        inputs = to_model_input(self.data.train_images[rows], dtype=self.param_dtype)
        if self.config.recipe.augment:
            inputs = augment(inputs, batch_generator(self.seed, epoch, batch))
        non_blocking = self.device.type == "cuda"
        return (inputs.to(self.device, non_blocking=non_blocking),
                self.data.train_labels[rows].to(self.device, non_blocking=non_blocking))

    def _null_batch(self, epoch: int, draw: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random batch ``draw`` of ``epoch``: ``m`` training images without replacement, seeded per
        (seed, ordering, epoch, draw), augmented (when on) with a stream apart from the fixed batches'."""
        data = self.data
        rng = np.random.default_rng([self.seed, zlib.crc32(self.ordering.encode()), epoch, draw])
        rows = torch.from_numpy(rng.choice(data.train_images.shape[0], size=data.batch_size, replace=False))
        inputs = to_model_input(data.train_images[rows], dtype=self.param_dtype)
        if self.config.recipe.augment:
            inputs = augment(inputs, batch_generator(self.seed, epoch, data.num_batches + draw))
        return inputs.to(self.device), data.train_labels[rows].to(self.device)

    def _record_null(self, plan: EpochPlan, measures: Mapping[str, Any], progress: Progress) -> None:
        progress.append_epoch(progress.null, plan, "draw", measures["null"], measures["full_grad_norm"])

    def _divergence_message(self, plan: EpochPlan, step: int | None, what: str) -> str:
        batch = None if step is None else int(self.epoch_order(plan.epoch)[step])
        where = f"epoch {plan.epoch}" + (f", batch {batch}" if batch is not None else "")
        kept = (f"the last good checkpoint (epoch {plan.epoch - 1}) is kept in '{self.store.folder}'"
                if self.store is not None and plan.epoch > 1 else "no checkpoint of this epoch was written")
        seed = f" (seed {self.seed})" if self.label != self.ordering else ""
        return (f"Ordering '{self.ordering}'{seed}, {where}: {what} is not finite; the run stopped and {kept}. "
                "Lower the learning rate of that phase (training.phases) or enable training.augment, then rerun.")

    def _check_free_space(self, epoch: int, kept: bool) -> None:
        """Stop before an epoch whose files (kept gradients, scratch buffer, checkpoint) would not fit."""
        needs: list[tuple[Path, str, int, int]] = []
        if kept:
            needs.append((self.gradients_dir, "kept gradients", self.data.num_batches * self.spill_file_bytes,
                          self.data.num_batches))
        buffer_bytes = self.data.num_batches * self.num_params * self.param_dtype.itemsize
        if self.probe and buffer_bytes > self.config.buffer_memory_cap_gb * GIB:
            scratch = self.config.scratch_dir or (self.store.scratch_dir if self.store is not None else None)
            needs.append((Path(scratch) if scratch else Path(tempfile.gettempdir()), "scratch buffer",
                          buffer_bytes, 1))
        if self.store is not None:
            distance_rows = len(self.schedule) * self.data.num_batches * len(DISTANCE_COLUMNS) * 8
            needs.append((self.store.folder, "checkpoint", self.checkpoint_bytes + distance_rows + 2**16, 1))
        check_free_space(needs, epoch, self.ordering, self.store is not None)

    def _evaluate(self, model: nn.Module) -> tuple[float, float]:
        test_images = self.data.test_images
        if test_images is None or test_images.shape[0] == 0:
            return float("nan"), float("nan")
        size = self.config.recipe.eval_batch_size
        batches = ((to_model_input(test_images[start:start + size], dtype=self.param_dtype).to(self.device),
                    self.data.test_labels[start:start + size].to(self.device))
                   for start in range(0, test_images.shape[0], size))
        return evaluate(model, batches, self.config.recipe.autocast)

    def _record(self, plan: EpochPlan, measures: dict | None, train_loss: float, train_accuracy: float,
                test_loss: float, test_accuracy: float, seconds: float, kept: bool, progress: Progress,
                gradient_variance_trace: float = math.nan) -> None:
        mean_distance = full_norm = float("nan")
        if measures is not None:
            progress.append_epoch(progress.distances, plan, "batch", measures, measures["full_grad_norm"])
            progress.distances["position"] += measures["position"].tolist()
            mean_distance = float(np.mean(measures["distance"]))
            full_norm = measures["full_grad_norm"]
        history = progress.history
        for key, value in (("epoch", plan.epoch), ("phase", plan.phase), ("learning_rate", plan.learning_rate),
                           ("train_loss", train_loss), ("train_accuracy", train_accuracy),
                           ("test_loss", test_loss), ("test_accuracy", test_accuracy),
                           ("mean_distance", mean_distance), ("seconds", seconds),
                           ("full_grad_norm", full_norm), ("gradients_kept", float(kept)),
                           ("gradient_variance_trace", gradient_variance_trace),
                           ("n_train", self.data.num_batches * self.data.batch_size),
                           ("batch_size", self.data.batch_size)):
            history[key].append(float(value))
        epoch_logger.info(
            "%s epoch %d/%d (phase %d, lr %g): train loss %.4f acc %.3f | test loss %.4f acc %.3f | "
            "mean distance %.5g | %.1f s%s",
            self.label, plan.epoch, len(self.schedule), plan.phase, plan.learning_rate, train_loss,
            train_accuracy, test_loss, test_accuracy, mean_distance, seconds, " | gradients kept" if kept else "",
        )

    def _assemble(self, net_normal: nn.Module, progress: Progress) -> ProbeResults:
        distances = distance_frame(self.ordering, self.seed, progress.distances, self.batching)
        epochs = len(progress.history["epoch"])
        if epochs:
            logger.info("%s: %d epochs done, test accuracy %.3f, %.0f s of training (every epoch in logs/info.log)",
                        self.label, epochs, progress.history["test_accuracy"][-1], sum(progress.history["seconds"]))
        if self.probe and epochs:
            matrix = torch.tensor(progress.distances["distance"], dtype=torch.float64).view(epochs,
                                                                                             self.data.num_batches)
        else:
            matrix = torch.zeros(0, 0, dtype=torch.float64)
        model_state = {k: v.detach().cpu().clone() for k, v in net_normal.state_dict().items()}
        return ProbeResults(self.ordering, self.run_name, distances, matrix,
                            history_frame(self.ordering, self.seed, self.run_name, progress.history), model_state,
                            null_frame(self.ordering, self.seed, progress.null), self.seed)
