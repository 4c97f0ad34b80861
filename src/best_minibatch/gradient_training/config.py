"""``gradient_training``'s configuration: the shared recipe plus seeds, run folders, spilling and caps.

Knows nothing of Kedro. :class:`TrainingConfig` reads the ``gradient_training``
section (and the shared ``training`` recipe) once, every problem reported together;
:func:`run_identity` is what names a run's folders; :func:`epoch_order` is the order
in which an epoch trains its fixed batches.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from best_minibatch.config import ConfigError, Section
from best_minibatch.training.recipe import EpochPlan, TrainingRecipe

PARAMS_NAME = "gradient_training"
SPILL_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}
RUN_KEYS = ("training", "seeds", "run_name", "checkpoint_dir", "gradients_dir", "keep_checkpoints", "keep_gradients",
            "spill_dtype", "disk_cap_gb", "gradient_buffer", "trace_check", "expected_hours", "null_batches",
            "batch_order")
#: ``fixed``: the paper's order, batch 0 to K-1 every epoch. ``shuffled``: the same fixed batches in a fresh seeded
#: order every epoch, the control that separates a batch's place in the sorted order from its place in the epoch.
BATCH_ORDERS = ("fixed", "shuffled")


class TrainingConfigError(ConfigError):
    """A ``gradient_training`` (or ``training``) parameter that cannot work; names it and the fix."""


def config_error(key: str, problem: str, fix: str) -> TrainingConfigError:
    return TrainingConfigError(f"{PARAMS_NAME}.{key}", problem, fix)


@dataclass(frozen=True)
class TrainingConfig:
    """The shared recipe plus what only ``gradient_training`` has: seeds, run folders, spilling, caps.

    ``seeds``: each ordering trains once per seed (its own :class:`GradientProbeRun`,
    run name and folders); a seed sets the initial weights, the augmentation and the
    null batches' draws, never the fixed batches.
    """

    recipe: TrainingRecipe = TrainingRecipe()
    seeds: tuple[int, ...] = (0,)
    run_name: str = "auto"
    checkpoint_dir: str | None = "data/06_models/checkpoints"
    gradients_dir: str = "data/07_model_output/gradients"
    keep_checkpoints: int = 2
    keep_gradients: Any = "all"
    spill_dtype: str = "float32"
    disk_cap_gb: float = 2.0
    buffer_memory_cap_gb: float = 1.0
    buffer_on_model_device: bool = True
    scratch_dir: str | None = None
    trace_check: Any = False
    expected_hours: float = 1.0
    null_batches: int = 0
    batch_order: str = "shuffled"

    @classmethod
    def from_params(cls, params: Mapping[str, Any], training: Mapping[str, Any] | None = None) -> TrainingConfig:
        """Build from the ``gradient_training`` section and the shared ``training`` recipe; all checked."""
        if isinstance(params, Mapping) and "seed" in params:
            # The single seed became a list: name the replacement, not just an unknown key.
            raise config_error("seed", "was replaced by seeds (a list: each ordering trains once per seed)",
                                f"Write seeds: [{params['seed']}] (or e.g. seeds: [0, 1, 2]).")
        section = Section(params, PARAMS_NAME, RUN_KEYS, TrainingConfigError)
        recipe = TrainingRecipe.from_params(training, section.get("training"), override_path=f"{PARAMS_NAME}.training",
                                            error_type=TrainingConfigError)
        buffer = section.section("gradient_buffer", ("memory_cap_gb", "on_model_device", "scratch_dir"))
        run_name = section.get("run_name", cls.run_name)
        if not isinstance(run_name, str) or not run_name or "/" in run_name or run_name in (".", ".."):
            raise section.error("run_name", f"must be a folder name, got {run_name!r}",
                                "Use auto (a hash of the configuration) or a plain name without '/'.")
        keep = section.get("keep_gradients", cls.keep_gradients)
        trace = section.get("trace_check", cls.trace_check)
        if not isinstance(trace, bool) and not (
                isinstance(trace, (list, tuple)) and all(isinstance(o, str) and o for o in trace)):
            raise section.error("trace_check", f"expected true, false or a list of orderings, got {trace!r}",
                                "Use e.g. [random] (the null ordering, which the analysis's trace check reads).")
        config = cls(
            recipe=recipe,
            seeds=section.seeds("seeds", list(cls.seeds), "Use e.g. [0] or [0, 1, 2]; each ordering trains once per seed."),
            run_name=run_name,
            checkpoint_dir=section.get("checkpoint_dir", cls.checkpoint_dir),
            gradients_dir=section.get("gradients_dir", cls.gradients_dir),
            keep_checkpoints=section.integer("keep_checkpoints", cls.keep_checkpoints, 1, "Use e.g. 2."),
            keep_gradients=tuple(keep) if isinstance(keep, list) else keep,
            spill_dtype=section.choice("spill_dtype", cls.spill_dtype, SPILL_DTYPES),
            disk_cap_gb=section.number("disk_cap_gb", cls.disk_cap_gb, "Use e.g. 2.", low=0),
            buffer_memory_cap_gb=buffer.number("memory_cap_gb", cls.buffer_memory_cap_gb, "Use e.g. 1.", low=0),
            buffer_on_model_device=buffer.boolean("on_model_device", cls.buffer_on_model_device),
            scratch_dir=buffer.get("scratch_dir", cls.scratch_dir),
            trace_check=tuple(trace) if isinstance(trace, list) else trace,
            null_batches=section.integer("null_batches", cls.null_batches, 0, "Use e.g. 10 (0 switches the "
                                         "same-parameter null off)."),
            expected_hours=section.number("expected_hours", cls.expected_hours, "Use e.g. 1 (base) or 400 (paper).",
                                          low=0, low_open=True),
            batch_order=section.choice("batch_order", cls.batch_order, BATCH_ORDERS),
        )
        config.kept_epochs  # checks keep_gradients against the schedule
        return config

    @property
    def model(self) -> str:
        return self.recipe.model

    @property
    def num_epochs(self) -> int:
        return self.recipe.num_epochs

    @property
    def schedule(self) -> list[EpochPlan]:
        return self.recipe.schedule

    def resolved_device(self) -> torch.device:
        return self.recipe.resolved_device()

    @property
    def kept_epochs(self) -> tuple[int, ...]:
        """The 1-based epochs whose gradients are spilled, from ``keep_gradients``.

        ``all``, ``none``, a list of epochs, or ``{every_n: N}`` (epochs N, 2N, ...).
        """
        keep, total = self.keep_gradients, self.num_epochs
        fix = "Use all, none, a list of epochs such as [1, 5, 9], or {every_n: 3}."
        if keep in ("all", "none", None):
            return tuple(range(1, total + 1)) if keep == "all" else ()
        if isinstance(keep, Mapping):
            n = keep.get("every_n")
            if set(keep) != {"every_n"} or not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise config_error("keep_gradients", f"expected {{every_n: N}} with N >= 1, got {dict(keep)!r}", fix)
            return tuple(range(n, total + 1, n))
        if isinstance(keep, (list, tuple)):
            bad = [e for e in keep if not isinstance(e, int) or isinstance(e, bool) or not 1 <= e <= total]
            if bad:
                raise config_error("keep_gradients", f"epochs {bad} are outside the run's epochs 1..{total}", fix)
            return tuple(sorted(set(keep)))
        raise config_error("keep_gradients", f"cannot read {keep!r}", fix)

    def traces(self, ordering: str) -> bool:
        """Whether ``trace_check`` asks for the per-example gradient variance of ``ordering``."""
        return self.trace_check is True or (not isinstance(self.trace_check, bool) and ordering in self.trace_check)

    def identity(self) -> dict[str, Any]:
        """The settings shared by every seed's run that determine its results and files (``run_identity`` adds
        the seed, the ordering and the data)."""
        recipe, device = self.recipe, self.resolved_device()
        return {
            "model": recipe.model,
            "model_options": {k: v for k, v in recipe.model_options},
            "phases": [[epochs, float(lr)] for epochs, lr in recipe.phases],
            "momentum": float(recipe.momentum),
            "weight_decay": float(recipe.weight_decay),
            "augment": bool(recipe.augment),
            "device": device.type,
            "bf16_autocast": bool(recipe.bf16_autocast and device.type == "cuda"),
            "deterministic": bool(recipe.deterministic),
            "cpu_threads": recipe.cpu_threads if device.type == "cpu" else None,
            "kept_epochs": list(self.kept_epochs),
            "spill_dtype": self.spill_dtype,
        }


def seed_run_name(run_name: str, seed: int) -> str:
    """An explicit ``run_name``'s folder name for one seed: the name itself for seed 0, ``<name>-seed<S>`` else.

    A seed's run name never depends on the other seeds in the list, so adding a seed
    leaves the existing runs where they are. (``auto`` names hash the seed instead.)
    """
    return run_name if seed == 0 else f"{run_name}-seed{seed}"


def run_identity(config: TrainingConfig, ordering: str, num_params: int, param_dtype: torch.dtype,
                 data_fingerprint: str | None, probe: bool = True, seed: int | None = None) -> dict[str, Any]:
    """Everything that determines a run's results and files (``run.json``; ``run_name: auto`` hashes it).

    ``seed`` is the run's seed (default: the first of ``config.seeds``). The
    identity holds that one seed, never the list, so a seed's run keeps its name
    whatever other seeds are configured (and seed 0's names are those of the
    single-seed runs before ``seeds`` existed).
    """
    seed = config.seeds[0] if seed is None else seed
    identity = {**config.identity(), "seed": seed, "ordering": ordering, "probe": probe, "num_params": num_params,
                "param_dtype": str(param_dtype), "data": data_fingerprint}
    if probe and config.traces(ordering):
        identity["trace_check"] = True  # only when on, so that runs without it keep their names
    if probe and config.null_batches:
        identity["null_batches"] = config.null_batches  # likewise
    if config.batch_order != "fixed":
        identity["batch_order"] = config.batch_order  # likewise
    if probe and config.recipe.probe_chunk:
        identity["probe_batched"] = True  # likewise (vmap's kernels round differently from the sequential probe's)
    return identity


def epoch_order(batch_order: str, seed: int, epoch: int, num_batches: int) -> np.ndarray:
    """The batches of ``epoch`` in the order they are trained: ``order[k]`` is step ``k``'s batch.

    ``fixed``: 0 .. K-1 every epoch (the paper). ``shuffled``: a permutation drawn from
    (seed, epoch, K) alone, so a resumed run and every ordering of the same seed train
    their batches in the same places.
    """
    if batch_order == "fixed":
        return np.arange(num_batches)
    rng = np.random.default_rng([seed, zlib.crc32(b"batch_order"), epoch, num_batches])
    return rng.permutation(num_batches)


def named_model_factory(config: TrainingConfig | TrainingRecipe, num_classes: int = 10) -> Callable[[], nn.Module]:
    """A builder of the configured model; builds it once so a bad option fails here."""
    recipe = config.recipe if isinstance(config, TrainingConfig) else config
    factory = recipe.model_factory(num_classes)
    try:
        factory()
    except (ValueError, TypeError) as error:
        raise config_error("training.model", str(error), "Fix model.name or its options.") from error
    return factory
