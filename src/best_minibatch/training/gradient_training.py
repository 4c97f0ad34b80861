"""``gradient_training``: Algorithm 1 run per ordering, resumable, with its gradients spilled.

Knows nothing of Kedro. :class:`GradientProbeRun` trains ``net_normal`` on one
ordering's fixed mini-batches through the shared loop (``loop.train_epochs``)
with the paper's probe as its hook (``algorithm1.GradientProbe``: ``net_compare``
takes ``net_normal``'s full state at every epoch start and computes each batch's
gradient on exactly the inputs ``net_normal`` gets). Once an epoch ends, every
distance to the full gradient is computed exactly in float64. Kept epochs'
gradients are handed to the caller one batch at a time (the Kedro node spills
them to a partitioned dataset).

After every epoch a checkpoint (model, optimizer, RNG states, the distance rows
and history so far) is written atomically, so a rerun after an interruption
resumes from the last complete epoch and produces the same distance table bit
for bit on a CPU (``resume.py`` checks the files; ``checkpoints.RunStore`` holds
them). See ``docs/gradient_training.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from best_minibatch.config import ConfigError, Section, is_int
from best_minibatch.data.images import augment, batch_generator, to_model_input
from best_minibatch.training.algorithm1 import GradientProbe
from best_minibatch.training.checkpoints import CheckpointError, RunStore, config_hash, tensor_checksum
from best_minibatch.training.loop import DivergenceError, EpochResult, LoopState, evaluate, train_epochs
from best_minibatch.training.probing import (
    GRADIENT_MEASURES,
    EpochGradients,
    GradientVarianceTrace,
    NonFiniteGradientError,
)
from best_minibatch.training.recipe import EpochPlan, TrainingRecipe
from best_minibatch.training.resume import (
    HISTORY_NUMERIC,
    DiskSpaceError,
    Progress,
    check_free_space,
    gradient_file_problem,
    torch_save_overhead,
)
from best_minibatch.training.runtime import available_memory, training_environment

logger = logging.getLogger(__name__)
#: One line per epoch: in the log file (and in a terminal's progress bar), not in the terminal's log lines.
epoch_logger = logging.getLogger(f"{__name__}.epochs")

__all__ = ["DiskSpaceError", "DivergenceError", "EpochPlan"]  # re-exported for callers of this module

PARAMS_NAME = "gradient_training"
SPILL_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}
GIB = 2**30

DISTANCE_COLUMNS = ["ordering", "seed", "batching", "epoch", "phase", "learning_rate", "batch", "distance", "cosine_similarity",
                    "relative_distance", "grad_norm", "full_grad_norm", "position"]
#: The same-parameter null: random batches probed at the same epoch-start parameters, against the same ∇_e.
NULL_COLUMNS = ["ordering", "seed", "epoch", "phase", "learning_rate", "draw", "distance", "cosine_similarity",
                "relative_distance", "grad_norm", "full_grad_norm"]
HISTORY_COLUMNS = ["ordering", "seed", "epoch", "phase", "learning_rate", "train_loss", "train_accuracy", "test_loss",
                   "test_accuracy", "mean_distance", "seconds", "full_grad_norm", "run_name", "gradients_kept",
                   "gradient_variance_trace", "n_train", "batch_size"]
_HISTORY_NUMERIC = HISTORY_NUMERIC
RUN_KEYS = ("training", "seeds", "run_name", "checkpoint_dir", "gradients_dir", "keep_checkpoints", "keep_gradients",
            "spill_dtype", "disk_cap_gb", "gradient_buffer", "trace_check", "expected_hours", "null_batches",
            "batch_order")
#: ``fixed``: the paper's order, batch 0 to K-1 every epoch. ``shuffled``: the same fixed batches in a fresh seeded
#: order every epoch, the control that separates a batch's place in the sorted order from its place in the epoch.
BATCH_ORDERS = ("fixed", "shuffled")


class TrainingConfigError(ConfigError):
    """A ``gradient_training`` (or ``training``) parameter that cannot work; names it and the fix."""


class TrainingDataError(ValueError):
    """Inputs (batch assignments, index, images) that do not fit together."""


def _config_error(key: str, problem: str, fix: str) -> TrainingConfigError:
    return TrainingConfigError(f"{PARAMS_NAME}.{key}", problem, fix)


# --------------------------------------------------------------------------- configuration


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
            raise _config_error("seed", "was replaced by seeds (a list: each ordering trains once per seed)",
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
            seeds=_seeds(section),
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
                raise _config_error("keep_gradients", f"expected {{every_n: N}} with N >= 1, got {dict(keep)!r}", fix)
            return tuple(range(n, total + 1, n))
        if isinstance(keep, (list, tuple)):
            bad = [e for e in keep if not isinstance(e, int) or isinstance(e, bool) or not 1 <= e <= total]
            if bad:
                raise _config_error("keep_gradients", f"epochs {bad} are outside the run's epochs 1..{total}", fix)
            return tuple(sorted(set(keep)))
        raise _config_error("keep_gradients", f"cannot read {keep!r}", fix)

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


def _seeds(section: Section) -> tuple[int, ...]:
    seeds = section.get("seeds", list(TrainingConfig.seeds))
    if (not isinstance(seeds, (list, tuple)) or not seeds
            or any(not is_int(s) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds)):
        raise section.error("seeds", f"expected a non-empty list of distinct non-negative integers, got {seeds!r}",
                            "Use e.g. [0] or [0, 1, 2]; each ordering trains once per seed.")
    return tuple(int(s) for s in seeds)


def seed_run_name(run_name: str, seed: int) -> str:
    """An explicit ``run_name``'s folder name for one seed: the name itself for seed 0, ``<name>-seed<S>`` else.

    A seed's run name never depends on the other seeds in the list, so adding a seed
    leaves the existing runs where they are. (``auto`` names hash the seed instead.)
    """
    return run_name if seed == 0 else f"{run_name}-seed{seed}"


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class TrainingData:
    """One ordering's fixed mini-batches over the training images, and the test split.

    ``batches[k]`` holds the rows (in ``train_images``) of batch k's images in
    position order. Images are uint8 ``N x H x W x 3``.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    batches: torch.Tensor
    test_images: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None

    @property
    def num_batches(self) -> int:
        return int(self.batches.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.batches.shape[1])

    @classmethod
    def from_tables(cls, batch_assignments: pd.DataFrame, image_index: pd.DataFrame,
                    train_images: torch.Tensor, test_images: torch.Tensor | None) -> TrainingData:
        """Check the tables against each other (see ``docs/data_flow.md``) and gather the tensors."""
        for name, table, columns in (
            ("batch_assignments", batch_assignments, ("batch", "position", "image_id")),
            ("image_index", image_index, ("image_id", "split", "row", "label")),
        ):
            if missing := [c for c in columns if c not in table.columns]:
                raise TrainingDataError(f"{name} lacks the columns {missing}; rerun the pipeline that writes it.")
        for name, images in (("train_images", train_images), ("test_images", test_images)):
            if images is not None and (images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3):
                raise TrainingDataError(f"{name} must be uint8 N x H x W x 3, got {images.dtype} {tuple(images.shape)}.")
        if batch_assignments.empty:
            raise TrainingDataError("batch_assignments has no rows.")
        table = batch_assignments.sort_values(["batch", "position"])
        sizes = table.groupby("batch").size()
        num_batches = len(sizes)
        if sizes.index.tolist() != list(range(num_batches)) or sizes.nunique() != 1:
            raise TrainingDataError(
                "batch_assignments must hold batches 0..K-1 of equal size (equation 3 of the paper needs "
                f"equal batches); got batches {sizes.index.min()}..{sizes.index.max()} with sizes "
                f"{sorted(sizes.unique().tolist())}. Rerun sort_batches."
            )
        batch_size = int(sizes.iloc[0])
        train = image_index[image_index["split"] == "train"].set_index("image_id")
        ids = table["image_id"].to_numpy()
        if not np.isin(ids, train.index.to_numpy()).all():
            unknown = ids[~np.isin(ids, train.index.to_numpy())][:5].tolist()
            raise TrainingDataError(f"batch_assignments names image_ids {unknown} that are not training images "
                                    "in image_index. Rerun sort_batches on the current ingest.")
        rows = train.loc[ids, "row"].to_numpy(np.int64)
        if rows.max() >= train_images.shape[0] or len(np.unique(ids)) != len(ids):
            raise TrainingDataError("batch_assignments repeats images or points past train_images. Rerun sort_batches.")
        labels = torch.zeros(train_images.shape[0], dtype=torch.int64)
        labels[torch.tensor(train["row"].to_numpy(np.int64))] = torch.tensor(train["label"].to_numpy(np.int64))
        test_labels = None
        if test_images is not None:
            test = image_index[image_index["split"] == "test"].sort_values("row")
            if len(test) != test_images.shape[0]:
                raise TrainingDataError(f"image_index lists {len(test)} test images, test_images holds "
                                        f"{test_images.shape[0]}. Rerun ingest_cifar.")
            test_labels = torch.tensor(test["label"].to_numpy(np.int64))
        return cls(train_images, labels, torch.tensor(rows).view(num_batches, batch_size),
                   test_images, test_labels)

    def fingerprint(self) -> str:
        """A digest of every tensor that determines the results."""
        digest = hashlib.blake2b(digest_size=16)
        for tensor in (self.batches, self.train_labels, self.train_images, self.test_images, self.test_labels):
            if tensor is None:
                digest.update(b"none")
                continue
            tensor = tensor.contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(memoryview(tensor.numpy()).cast("B"))
        return digest.hexdigest()


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SpilledGradient:
    """One kept mini-batch gradient, on the CPU in the spill dtype, flattened in ``model.parameters()`` order."""

    epoch: int
    batch: int
    gradient: torch.Tensor


@dataclass
class ProbeResults:
    """Everything a finished run (one ordering, one seed) publishes; every table has a ``seed`` column."""

    ordering: str
    run_name: str
    distances: pd.DataFrame
    distance_matrix: torch.Tensor
    history: pd.DataFrame
    model_state: dict[str, torch.Tensor]
    null_distances: pd.DataFrame = dataclasses.field(default_factory=lambda: _null_frame("", 0, {}))
    seed: int = 0

    @classmethod
    def empty(cls, ordering: str, run_name: str = "") -> ProbeResults:
        return cls(ordering, run_name, empty_distance_table(), torch.zeros(0, 0, dtype=torch.float64),
                   empty_history_table(), {}, _null_frame("", 0, {}))


@dataclass
class OrderingResults:
    """One ordering's runs over every seed, as the pipeline publishes them.

    The tables are the seeds' tables one after another (in the order of
    ``gradient_training.seeds``; the ``seed`` column tells them apart);
    ``distance_matrix`` stacks the seeds' ``E x K`` matrices into ``S x E x K``
    (float64, ``0 x 0 x 0`` for a skipped ordering); ``model_states`` maps each seed
    to its final ``net_normal`` state dict (``{}`` for a skipped ordering;
    :func:`flat_model_states` is how it is saved).
    """

    ordering: str
    seeds: tuple[int, ...]
    distances: pd.DataFrame
    distance_matrix: torch.Tensor
    history: pd.DataFrame
    model_states: dict[int, dict[str, torch.Tensor]]
    null_distances: pd.DataFrame

    @classmethod
    def from_runs(cls, ordering: str, results: list[ProbeResults]) -> OrderingResults:
        if not results:
            empty = ProbeResults.empty(ordering)
            return cls(ordering, (), empty.distances, torch.zeros(0, 0, 0, dtype=torch.float64), empty.history, {},
                       empty.null_distances)
        return cls(
            ordering, tuple(r.seed for r in results),
            pd.concat([r.distances for r in results], ignore_index=True),
            torch.stack([r.distance_matrix for r in results]),
            pd.concat([r.history for r in results], ignore_index=True),
            {r.seed: r.model_state for r in results},
            pd.concat([r.null_distances for r in results], ignore_index=True),
        )


def flat_model_states(states: Mapping[int, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every seed's state dict in one flat dict of tensors (the project's tensor format), keyed
    ``seed=<S>/<state-dict key>``; :func:`seed_model_states` reverses it."""
    return {f"seed={seed}/{key}": tensor for seed, state in states.items() for key, tensor in state.items()}


def seed_model_states(flat: Mapping[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """``{seed: state_dict}`` from a saved ``{ordering}.trained_model`` (:func:`flat_model_states`)."""
    states: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in flat.items():
        prefix, _, key = name.partition("/")
        if not prefix.startswith("seed=") or not key:
            raise ValueError(f"'{name}' is not a key of a trained_model of seeds ('seed=<S>/<state-dict key>'); "
                             "rerun gradient_training to rewrite the file.")
        states.setdefault(int(prefix.removeprefix("seed=")), {})[key] = tensor
    return states


def empty_distance_table() -> pd.DataFrame:
    return _distance_frame("", 0, {c: [] for c in ("epoch", "phase", "learning_rate", "batch", *GRADIENT_MEASURES,
                                                   "full_grad_norm", "position")})


def empty_history_table() -> pd.DataFrame:
    return _history_frame("", 0, "", {c: [] for c in _HISTORY_NUMERIC})


def _distance_frame(ordering: str, seed: int, rows: Mapping[str, Any], batching: int = 0) -> pd.DataFrame:
    frame = pd.DataFrame({
        "ordering": pd.Series([ordering] * len(rows["epoch"]), dtype=object),
        "seed": np.full(len(rows["epoch"]), seed, dtype=np.int64),
        "batching": np.full(len(rows["epoch"]), batching, dtype=np.int64),
        "epoch": np.asarray(rows["epoch"], dtype=np.int64),
        "phase": np.asarray(rows["phase"], dtype=np.int64),
        "learning_rate": np.asarray(rows["learning_rate"], dtype=np.float64),
        "batch": np.asarray(rows["batch"], dtype=np.int64),
        **{c: np.asarray(rows[c], dtype=np.float64) for c in (*GRADIENT_MEASURES, "full_grad_norm")},
        "position": np.asarray(rows["position"], dtype=np.int64),
    })
    return frame[DISTANCE_COLUMNS]


def _null_frame(ordering: str, seed: int, rows: Mapping[str, Any]) -> pd.DataFrame:
    n = len(rows.get("epoch", []))
    frame = pd.DataFrame({
        "ordering": pd.Series([ordering] * n, dtype=object),
        "seed": np.full(n, seed, dtype=np.int64),
        **{c: np.asarray(rows.get(c, []), dtype=np.int64) for c in ("epoch", "phase", "draw")},
        **{c: np.asarray(rows.get(c, []), dtype=np.float64)
           for c in ("learning_rate", *GRADIENT_MEASURES, "full_grad_norm")},
    })
    return frame[NULL_COLUMNS]


def _history_frame(ordering: str, seed: int, run_name: str, rows: Mapping[str, Any]) -> pd.DataFrame:
    n = len(rows["epoch"])
    frame = pd.DataFrame({c: np.asarray(rows[c], dtype=np.float64) for c in _HISTORY_NUMERIC})
    for c in ("epoch", "phase"):
        frame[c] = frame[c].astype(np.int64)
    for c in ("n_train", "batch_size"):  # NaN only in epochs resumed from checkpoints that predate them
        if frame[c].notna().all():
            frame[c] = frame[c].astype(np.int64)
    frame["gradients_kept"] = frame["gradients_kept"].astype(bool)
    frame["ordering"] = pd.Series([ordering] * n, dtype=object)
    frame["seed"] = np.full(n, seed, dtype=np.int64)
    frame["run_name"] = pd.Series([run_name] * n, dtype=object)
    return frame[HISTORY_COLUMNS]


# --------------------------------------------------------------------------- checks before a run


def check_disk_cap(config: TrainingConfig, num_params: int, num_batches: int) -> None:
    """Raise :class:`TrainingConfigError` if the kept epochs' gradients would exceed ``disk_cap_gb``."""
    kept = len(config.kept_epochs)
    needed = kept * num_batches * num_params * SPILL_DTYPES[config.spill_dtype].itemsize
    if needed > config.disk_cap_gb * GIB:
        raise _config_error(
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
        raise _config_error(
            "null_batches",
            f"{config.null_batches} random batches per epoch, but the epoch has only {num_batches} fixed batches: "
            f"the null would cost {config.null_batches / num_batches:.3g}x the probe's own work",
            f"Use at most {num_batches} (one pass of the fixed batches); e.g. 10 (base) or 20 (paper).")


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
        raise _config_error(
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
        raise _config_error(
            "expected_hours",
            f"the run would take about {hours:,.1f} hours ({orderings} orderings x {seeds} "
            f"seed{'s' if seeds > 1 else ''} x {config.num_epochs} epochs x "
            f"{num_batches} batches of {batch_size}{null} at {per_step:.3g} s per probed step of {config.model} on "
            f"{device.type}, {measured}), more than the {config.expected_hours:g} hours this environment "
            "expects",
            f"Confirm with --params gradient_training.expected_hours={math.ceil(hours)}, or choose a smaller model "
            "(training.model.name), fewer epochs (training.phases), fewer seeds (gradient_training.seeds), "
            "or a GPU.")


def named_model_factory(config: TrainingConfig | TrainingRecipe, num_classes: int = 10) -> Callable[[], nn.Module]:
    """A builder of the configured model; builds it once so a bad option fails here."""
    recipe = config.recipe if isinstance(config, TrainingConfig) else config
    factory = recipe.model_factory(num_classes)
    try:
        factory()
    except (ValueError, TypeError) as error:
        raise _config_error("training.model", str(error), "Fix model.name or its options.") from error
    return factory


# --------------------------------------------------------------------------- the run


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
        self.spill_dtype = SPILL_DTYPES[config.spill_dtype]
        self.variance: GradientVarianceTrace | None = None
        self.order = np.arange(run.data.num_batches)
        self.checksums: list[int] = []  # by batch, not by step

    def start_epoch(self, plan: EpochPlan, model: nn.Module) -> None:
        super().start_epoch(plan, model)
        # Per-example gradients at the epoch-start parameters, BatchNorm on the epoch-start running statistics.
        self.variance = GradientVarianceTrace(self.net_compare) if self.run.trace else None
        self.order = self.run.epoch_order(plan.epoch)
        self.checksums = [0] * len(self.order)

    def after_step(self, plan: EpochPlan, k: int, inputs: torch.Tensor, targets: torch.Tensor) -> Any:
        computed = self.step_gradients(k, inputs, targets)  # the batched probe: queued steps' gradients, or none
        if self.variance is not None:
            self.variance.add(inputs, targets)
        if plan.epoch not in self.run.kept_epochs:
            return None
        spills = []
        for step, gradient in computed:
            batch = int(self.order[step])
            spilled = gradient.to("cpu", self.spill_dtype, copy=True)
            self.checksums[batch] = tensor_checksum(spilled)
            spills.append(SpilledGradient(plan.epoch, batch, spilled))
        return spills

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
    folder) and writes nothing; :meth:`run` then trains, yielding each kept
    gradient as a :class:`SpilledGradient`, and leaves the outputs in
    :attr:`results`.

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
        return self.gradients_dir / f"epoch={epoch:03d}" / f"batch={batch:04d}.pt"

    # ------------------------------------------------------------------ main loop

    def run_writing_gradients(self) -> ProbeResults:
        """Train to the end as :meth:`run` does, writing each kept gradient itself; return the results.

        The unit of work a scheduler hands to another process (``best_minibatch.parallel``):
        each gradient goes to :meth:`gradient_path`, the file the Kedro node's partitioned
        dataset writes for it (``gradients_dir`` and that dataset's path are the same
        folder), in the same format, so the files are identical whichever wrote them. One
        task at a time trains in a run folder (:func:`best_minibatch.parallel.exclusive`).
        """
        from best_minibatch.data.tensor_io import save_tensors_atomically
        from best_minibatch.parallel import exclusive

        with exclusive(self.store.folder) if self.store is not None else contextlib.nullcontext():
            for spilled in self.run():
                save_tensors_atomically(spilled.gradient, self.gradient_path(spilled.epoch, spilled.batch))
        assert self.results is not None
        return self.results

    def run(self) -> Iterator[SpilledGradient]:
        """Train every remaining epoch; yield kept gradients as they are computed; set :attr:`results`."""
        recipe = self.config.recipe
        with training_environment(recipe):
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
                yield from train_epochs(
                    net_normal, optimizer, recipe, self.schedule[start:], batches_of, lambda _: self.data.num_batches,
                    evaluate=self._evaluate, hook=probe, on_epoch_start=before_epoch, on_epoch_end=epoch_end,
                    divergence=self._divergence_message, label=self.label,
                )
            finally:
                if probe is not None:
                    probe.close()
            self.results = self._assemble(net_normal, progress)

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
        """Load the newest usable checkpoint, if any; return the number of completed epochs.

        A checkpoint is usable when it is intact (readable, content matching its
        checksum) and every gradient file it records (the kept epochs up to it)
        exists and matches the checksum recorded when it was computed. Otherwise the
        run falls back to an older usable checkpoint and recomputes the epochs after
        it (which rewrites their files); if none is left, it stops naming the
        damaged files.
        """
        if self.store is None:
            return 0
        self.store.remove_partial_files()
        newest, chosen, bad_files, verified = None, None, [], {}
        for epoch, state in self.store.intact_checkpoints(self.digest):
            newest = epoch if newest is None else newest
            bad = self._damaged_gradient_files(epoch, state, verified)
            if not bad:
                chosen = epoch, state
                break
            bad_files.extend(b for b in bad if b not in bad_files)
        damaged = [f"checkpoint '{path}' ({reason})" for path, reason in self.store.damaged]
        damaged += [f"spilled gradient '{path}' ({reason})" for path, reason in bad_files]
        listed = "; ".join(damaged[:3]) + (f"; and {len(damaged) - 3} more" if len(damaged) > 3 else "")
        if chosen is None:
            if not damaged:
                return 0
            raise CheckpointError(
                f"Run '{self.run_name}' of '{self.ordering}' cannot resume: {listed}. No older intact checkpoint is "
                f"left to recompute from. Restore the file(s), or delete '{self.store.folder}' and "
                f"'{self.gradients_dir}' to start the run over."
            )
        done, state = chosen
        if damaged:
            self.store.set_aside_checkpoints_after(done)
            logger.warning("%s: %s. Resuming from the intact checkpoint of epoch %d and recomputing epochs %d..%d.",
                           self.label, listed, done, done + 1, max(newest or done, done + 1))
        net_normal.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        progress.__dict__.update(Progress.from_state(state).__dict__)
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and state.get("rng_cuda"):
            torch.cuda.set_rng_state_all(list(state["rng_cuda"]))
        verb = "complete; reusing its results" if done == len(self.schedule) else f"resuming after epoch {done}"
        logger.info("%s: run '%s' found in %s, %s", self.label, self.run_name, self.store.folder, verb)
        return done

    def _damaged_gradient_files(self, done: int, state: Mapping[str, Any],
                                verified: dict[tuple[Path, int | None], str | None]) -> list[tuple[Path, str]]:
        """The kept gradient files up to epoch ``done`` that are missing or differ from what was spilled."""
        recorded = state.get("gradient_checksums", {})
        spill_dtype = SPILL_DTYPES[self.config.spill_dtype]
        bad = []
        for epoch in sorted(e for e in self.kept_epochs if e <= done):
            checksums = recorded.get(f"{epoch:03d}")
            for batch in range(self.data.num_batches):
                path = self.gradient_path(epoch, batch)
                expected = int(checksums[batch]) if checksums is not None else None
                key = (path, expected)
                if key not in verified:
                    verified[key] = gradient_file_problem(path, expected, self.num_params, spill_dtype)
                if verified[key] is not None:
                    bad.append((path, verified[key]))
        return bad

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
        null, count = measures["null"], len(measures["null"]["distance"])
        rows = progress.null
        rows["epoch"] += [plan.epoch] * count
        rows["phase"] += [plan.phase] * count
        rows["learning_rate"] += [plan.learning_rate] * count
        rows["draw"] += list(range(count))
        for c in GRADIENT_MEASURES:
            rows[c] += null[c].tolist()
        rows["full_grad_norm"] += [measures["full_grad_norm"]] * count

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
        k_count = self.data.num_batches
        mean_distance = full_norm = float("nan")
        if measures is not None:
            rows = progress.distances
            rows["epoch"] += [plan.epoch] * k_count
            rows["phase"] += [plan.phase] * k_count
            rows["learning_rate"] += [plan.learning_rate] * k_count
            rows["batch"] += list(range(k_count))
            for c in GRADIENT_MEASURES:
                rows[c] += measures[c].tolist()
            rows["full_grad_norm"] += [measures["full_grad_norm"]] * k_count
            rows["position"] += measures["position"].tolist()
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
        distances = _distance_frame(self.ordering, self.seed, progress.distances, self.batching)
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
                            _history_frame(self.ordering, self.seed, self.run_name, progress.history), model_state,
                            _null_frame(self.ordering, self.seed, progress.null), self.seed)
