"""``gradient_training``'s checks: before any work (settings, disk, memory, time) and before each epoch (free space).

Knows nothing of Kedro. The run checks (``best_minibatch.run_checks``... see the
pre-run hooks) call the first group for every ordering before anything is written;
a :class:`~best_minibatch.gradient_training.run.GradientProbeRun` calls
:func:`check_free_space` before each epoch, so a full disk stops a run between
epochs, where it resumes.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch

from best_minibatch.data.tensor_io import GIB, format_bytes
from best_minibatch.gradient_training.config import (
    SPILL_DTYPES,
    TrainingConfig,
    config_error,
    run_identity,
    seed_run_name,
)
from best_minibatch.gradient_training.store import RunStore
from best_minibatch.training.algorithm1 import GradientProbe
from best_minibatch.training.loop import train_epochs
from best_minibatch.training.probing import EpochGradients
from best_minibatch.training.recipe import TrainingRecipe, training_environment
from best_minibatch.training.runtime import available_memory

logger = logging.getLogger(__name__)


class DiskSpaceError(OSError):
    """Too little free space for an epoch's files; the message names the folder and the size needed."""


def check_disk_cap(config: TrainingConfig, num_params: int, num_batches: int) -> None:
    """Raise :class:`TrainingConfigError` if the kept epochs' gradients would exceed ``disk_cap_gb``."""
    kept = len(config.kept_epochs)
    needed = kept * num_batches * num_params * SPILL_DTYPES[config.spill_dtype].itemsize
    if needed > config.disk_cap_gb * GIB:
        raise config_error(
            "disk_cap_gb",
            f"the kept gradients need {needed / GIB:.3g} GiB ({kept} epochs x {num_batches} batches x "
            f"{num_params:,} parameters in {config.spill_dtype}), more than the cap of {config.disk_cap_gb:.3g} GiB",
            "Keep fewer epochs (keep_gradients), use a smaller spill_dtype, or raise disk_cap_gb.")


def check_null_batches(config: TrainingConfig, num_batches: int) -> None:
    """Refuse more null batches per epoch than the epoch has fixed batches (the upper bound of ``null_batches``).

    Each null batch costs one more gradient at the epoch-start parameters, so R null batches add up to
    R/K to a probed epoch of K batches; the bound keeps the null at most as costly as the probe itself.
    """
    if config.null_batches > num_batches:
        raise config_error(
            "null_batches",
            f"{config.null_batches} random batches per epoch, but the epoch has only {num_batches} fixed batches: "
            f"the null would cost {config.null_batches / num_batches:.3g}x the probe's own work",
            f"Use at most {num_batches} (one pass of the fixed batches); e.g. 10 (base) or 20 (paper).")


def check_run_folder(config: TrainingConfig, ordering: str, num_params: int, param_dtype: torch.dtype) -> None:
    """Before the data is loaded: refuse an explicit ``run_name`` whose folders hold another run.

    Compares every setting but the data (whose digest needs the images); a run
    that differs only in its data is refused when training starts, still before
    it writes anything. ``run_name: auto`` names runs by all of it, so it never mixes.
    """
    if config.run_name == "auto" or config.checkpoint_dir is None:
        return
    for seed in config.seeds:
        name = seed_run_name(config.run_name, seed)
        store = RunStore(config.checkpoint_dir, name, ordering, Path(config.gradients_dir) / name / ordering,
                         config.keep_checkpoints)
        store.check_compatible(run_identity(config, ordering, num_params, param_dtype, None, seed=seed), None,
                               unknown=("data",))


def check_buffer_memory(config: TrainingConfig, num_params: int, param_dtype: torch.dtype, num_batches: int,
                        available: int | None = None) -> None:
    """Refuse an in-memory gradient buffer larger than its device's memory (``memory_cap_gb`` is only a cap)."""
    nbytes = num_batches * num_params * param_dtype.itemsize
    if nbytes > config.buffer_memory_cap_gb * GIB:
        return  # the epoch's gradients go to scratch files (the disk checks cover them)
    device = config.resolved_device()
    on = device if (device.type == "cuda" and config.buffer_on_model_device) else torch.device("cpu")
    available = available_memory(on) if available is None else available
    if nbytes > available:
        raise config_error(
            "gradient_buffer.memory_cap_gb",
            f"an epoch's gradients ({num_batches} batches x {num_params:,} parameters in {param_dtype} = "
            f"{nbytes / GIB:.3g} GiB) fit under the cap of {config.buffer_memory_cap_gb:g} GiB and would be held in "
            f"{on.type} memory, which has only {available / GIB:.3g} GiB available",
            f"Lower gradient_training.gradient_buffer.memory_cap_gb below {available / GIB:.3g} (the gradients then "
            "go to scratch files on disk) or run on a machine with more memory.")


def estimate_hours(config: TrainingConfig, num_batches: int, batch_size: int, orderings: int,
                   image_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10,
                   timed_images: int = 16) -> tuple[float, float, int, int]:
    """Hours the run's trainings will take, measured: ``(hours, seconds per probed step, steps timed, images per step)``.

    A probed step is net_normal's training step plus net_compare's forward and
    backward. It is first timed (one warm-up, one timed step) on
    ``min(batch_size, timed_images)`` random images and scaled linearly to the batch
    size; a warm-up that alone takes over 5 s is the measurement (a model that slow
    needs no second look). When that scaled step is cheap (under 2 s), the step is
    timed again at the real batch size: a small model's step is mostly fixed cost,
    which linear scaling from a few images overstates (5x for the small CNN at batch
    256). The step time is multiplied by the run's steps, each epoch's ``null_batches``
    draws counted as probed steps too (a draw is one more gradient at the epoch-start
    parameters, without the training step: an upper estimate); evaluation and spilling
    are left out.
    """
    recipe = dataclasses.replace(config.recipe, progress_bar=False)
    device = recipe.resolved_device()
    images = min(batch_size, timed_images)
    per_step, steps = _time_probed_step(recipe, device, images, image_shape, num_classes)
    per_step *= batch_size / images
    if images < batch_size and per_step < 2:
        images = batch_size
        per_step, steps = _time_probed_step(recipe, device, images, image_shape, num_classes)
    steps_per_epoch = num_batches + config.null_batches
    return per_step * steps_per_epoch * recipe.num_epochs * orderings / 3600, per_step, steps, images


def _time_probed_step(recipe: TrainingRecipe, device: torch.device, images: int, image_shape: tuple[int, int, int],
                      num_classes: int) -> tuple[float, int]:
    """Seconds of one probed step on ``images`` random images, after a warm-up, and the steps run."""
    with training_environment(recipe), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net_normal = recipe.model_factory(num_classes)().to(device)
        optimizer = recipe.optimizer(net_normal)
        num_params = sum(p.numel() for p in net_normal.parameters())
        dtype = next(net_normal.parameters()).dtype
        probe = GradientProbe(net_normal, 1, lambda count: EpochGradients(count, num_params, dtype, device),
                              recipe.autocast, chunk=recipe.probe_chunk)
        batch = (torch.randn(images, *image_shape, device=device), torch.randint(0, num_classes, (images,),
                                                                                   device=device))
        seconds, steps = math.inf, 0
        while steps < 2 and not (steps == 1 and seconds > 5):
            steps += 1
            started = time.perf_counter()
            for _ in train_epochs(net_normal, optimizer, recipe, recipe.schedule[:1], lambda plan: [batch],
                                  lambda plan: 1, hook=probe):
                pass
            probe.measures()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
    return seconds, steps


def check_expected_time(config: TrainingConfig, num_batches: int, batch_size: int, orderings: int) -> None:
    """Refuse a run measured to take far longer than the environment expects, unless the user confirms.

    Every ordering trains once per seed, so the runs are ``orderings x len(config.seeds)``.
    """
    seeds = len(config.seeds)
    hours, per_step, steps, images = estimate_hours(config, num_batches, batch_size, orderings * seeds)
    device = config.resolved_device()
    logger.info("gradient_training: %d orderings x %d seeds x %d epochs x (%d batches of %d + %d null batches) at %.3g "
                "s per probed step of %s on %s: about %.2f hours of training (expected_hours: %g)", orderings, seeds,
                config.num_epochs, num_batches, batch_size, config.null_batches, per_step, config.model, device.type,
                hours,
                config.expected_hours)
    if hours > config.expected_hours:
        null = f" + {config.null_batches} null batches" if config.null_batches else ""
        measured = (f"measured on {steps} step{'s' if steps > 1 else ''} of {images} images"
                    + (" and scaled" if images < batch_size else ""))
        raise config_error(
            "expected_hours",
            f"the run would take about {hours:,.1f} hours ({orderings} orderings x {seeds} "
            f"seed{'s' if seeds > 1 else ''} x {config.num_epochs} epochs x "
            f"{num_batches} batches of {batch_size}{null} at {per_step:.3g} s per probed step of {config.model} on "
            f"{device.type}, {measured}), more than the {config.expected_hours:g} hours this environment "
            "expects",
            f"Confirm with --params gradient_training.expected_hours={math.ceil(hours)}, or choose a smaller model "
            "(training.model.name), fewer epochs (training.phases), fewer seeds (gradient_training.seeds), "
            "or a GPU.")


def torch_save_overhead(dtype: torch.dtype) -> int:
    """Bytes ``torch.save`` adds around a 1-D tensor (its zip container; 64 bytes of alignment slack)."""
    buffer = io.BytesIO()
    torch.save(torch.zeros(1, dtype=dtype), buffer)
    return len(buffer.getvalue()) - dtype.itemsize + 64


def existing_ancestor(folder: Path) -> Path:
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_free_space(needs: list[tuple[Path, str, int, int]], epoch: int, ordering: str, resumable: bool) -> None:
    """Stop before an epoch whose files would not fit: ``needs`` is ``(folder, what, bytes, files)``.

    Needs are added up per file system, with each file rounded up to whole blocks.
    """
    by_device: dict[int, list[tuple[Path, str, int, Path]]] = {}
    for folder, what, nbytes, files in needs:
        existing = existing_ancestor(folder)
        block = os.statvfs(existing).f_frsize or 4096
        on_disk = files * -(-(nbytes // files) // block) * block
        by_device.setdefault(os.stat(existing).st_dev, []).append((folder, what, on_disk, existing))
    for entries in by_device.values():
        need = sum(e[2] for e in entries)
        free = shutil.disk_usage(entries[0][3]).free
        if free < need:
            folders = " and ".join(f"'{folder}'" for folder, *_ in entries)
            parts = ", ".join(f"{what} {format_bytes(n)}" for _, what, n, _ in entries)
            last = (f"the checkpoint of epoch {epoch - 1} is kept, so the run resumes after it"
                    if epoch > 1 and resumable else "nothing was trained yet")
            raise DiskSpaceError(
                f"Epoch {epoch} of '{ordering}' needs {format_bytes(need)} in {folders} ({parts}), but "
                f"only {format_bytes(free)} are free. Free space there and run the same command again ({last}), "
                "or keep fewer epochs' gradients (gradient_training.keep_gradients), or move them "
                "(runtime parameter gradients_dir).",
            )
