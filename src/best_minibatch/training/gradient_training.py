"""Training with a gradient probe: the paper's Algorithm 1, exact, resumable.

Knows nothing of Kedro. ``net_normal`` trains on one ordering's mini-batches in
their fixed order; at the start of every epoch ``net_compare`` (a separate module)
takes ``net_normal``'s full state (parameters and BatchNorm buffers) and, on
exactly the same input tensors ``net_normal`` gets for each step, does a forward
and backward pass in training mode without an update. Its flattened gradient
``g_k`` is therefore the gradient at the epoch-start parameters. The epoch's
``g_k`` are buffered (:class:`best_minibatch.probing.EpochGradients`); once the
epoch ends their mean ``g_full`` is known and every distance is computed exactly
in float64. Kept epochs' gradients are handed to the caller one batch at a time
(the Kedro node spills them to a partitioned dataset).

After every epoch a checkpoint (model, optimizer, RNG states, the distance rows
and history so far) is written atomically, so a rerun after an interruption
resumes from the last complete epoch and produces the same distance table bit
for bit on a CPU. See ``docs/gradient_training.md``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from best_minibatch.training.runtime import cpu_threads, deterministic_algorithms
from best_minibatch.training.checkpoints import CheckpointError, RunStore, config_hash, tensor_checksum
from best_minibatch.data.tensor_io import format_bytes, load_tensors
from best_minibatch.data.images import augment, batch_generator, to_model_input
from best_minibatch.training.probing import (
    GRADIENT_MEASURES,
    EpochGradients,
    FlatGradient,
    GradientVarianceTrace,
    NonFiniteGradientError,
)

logger = logging.getLogger(__name__)

PARAMS_NAME = "gradient_training"
SPILL_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}
DEVICES = ("auto", "cpu", "cuda")
GIB = 2**30

DISTANCE_COLUMNS = ["ordering", "epoch", "phase", "learning_rate", "batch", "distance", "cosine_similarity",
                    "relative_distance", "grad_norm", "full_grad_norm"]
HISTORY_COLUMNS = ["ordering", "epoch", "phase", "learning_rate", "train_loss", "train_accuracy", "test_loss",
                   "test_accuracy", "mean_distance", "seconds", "full_grad_norm", "run_name", "gradients_kept",
                   "gradient_variance_trace", "n_train", "batch_size"]
_HISTORY_NUMERIC = [c for c in HISTORY_COLUMNS if c not in ("ordering", "run_name")]


class TrainingConfigError(ValueError):
    """A ``gradient_training`` parameter that cannot work; the message names it and the fix."""


class TrainingDataError(ValueError):
    """Inputs (batch assignments, index, images) that do not fit together."""


class DivergenceError(FloatingPointError):
    """The loss or a gradient became NaN or infinite; the message names the epoch and batch."""


class DiskSpaceError(OSError):
    """Too little free space for an epoch's files; the message names the folder and the size needed."""


def _config_error(key: str, problem: str, fix: str) -> TrainingConfigError:
    return TrainingConfigError(f"Parameter {PARAMS_NAME}.{key}: {problem}. {fix}")


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class EpochPlan:
    epoch: int  # 1-based
    phase: int  # 1-based
    learning_rate: float


@dataclass(frozen=True)
class TrainingConfig:
    """Everything ``gradient_training`` reads from its parameters, checked on construction."""

    model: str = "small_cnn"
    model_options: tuple[tuple[str, Any], ...] = ()
    phases: tuple[tuple[int, float], ...] = ((3, 0.1), (3, 0.01), (3, 0.001))
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = False
    seed: int = 0
    device: str = "auto"
    bf16_autocast: bool = False
    deterministic: bool = True
    eval_batch_size: int = 500
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
    progress_bar: bool = True
    cpu_threads: int | None = None
    trace_check: Any = False

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise _config_error("model.name", f"expected a model name, got {self.model!r}", "Use e.g. small_cnn.")
        if self.cpu_threads is not None and (not isinstance(self.cpu_threads, int) or self.cpu_threads < 1):
            raise _config_error("cpu_threads", f"must be a positive integer or null, got {self.cpu_threads!r}",
                                "Use null (torch's default) or e.g. 1.")
        if not self.phases:
            raise _config_error("phases", "the list of learning-rate phases is empty",
                                "Give at least one phase, e.g. [{epochs: 3, lr: 0.1}].")
        for i, (epochs, lr) in enumerate(self.phases):
            if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
                raise _config_error(f"phases[{i}].epochs", f"must be a positive integer, got {epochs!r}",
                                    "Set how many epochs the phase lasts (1 or more).")
            if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
                raise _config_error(f"phases[{i}].lr", f"must be a positive number, got {lr!r}",
                                    "Set the phase's learning rate, e.g. 0.1.")
        for key in ("momentum", "weight_decay"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise _config_error(key, f"must be a non-negative number, got {value!r}", "The paper uses 0.9 and 5e-4.")
        if self.device not in DEVICES:
            raise _config_error("device", f"unknown device {self.device!r}", f"Use one of {', '.join(DEVICES)}.")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise _config_error("device", "cuda was asked for but no CUDA device is available",
                                "Use device: auto (CUDA when present, else CPU) or device: cpu.")
        for key in ("eval_batch_size", "keep_checkpoints"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _config_error(key, f"must be a positive integer, got {value!r}", "Use e.g. 500 or 2.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise _config_error("seed", f"must be a non-negative integer, got {self.seed!r}", "Use e.g. 0.")
        if not isinstance(self.run_name, str) or not self.run_name or "/" in self.run_name or self.run_name in (".", ".."):
            raise _config_error("run_name", f"must be a folder name, got {self.run_name!r}",
                                "Use auto (a hash of the configuration) or a plain name without '/'.")
        if self.spill_dtype not in SPILL_DTYPES:
            raise _config_error("spill_dtype", f"unknown dtype {self.spill_dtype!r}",
                                f"Use one of {', '.join(SPILL_DTYPES)}.")
        for key in ("disk_cap_gb", "buffer_memory_cap_gb"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise _config_error(key, f"must be a non-negative number of GiB, got {value!r}", "Use e.g. 2.")
        self.kept_epochs  # validates keep_gradients
        trace = self.trace_check
        if not isinstance(trace, bool) and not (
                isinstance(trace, (list, tuple)) and all(isinstance(o, str) and o for o in trace)):
            raise _config_error("trace_check", f"expected true, false or a list of orderings, got {trace!r}",
                                "Use e.g. [random] (the null ordering, which the analysis's trace check reads).")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "TrainingConfig":
        """Build from the ``gradient_training`` parameters dict; unknown keys are an error."""
        params = dict(params)
        public = {f for f in cls.__dataclass_fields__} - {"model_options", "buffer_memory_cap_gb",
                                                           "buffer_on_model_device", "scratch_dir"}
        if unknown := set(params) - public - {"gradient_buffer"}:
            raise _config_error(", ".join(sorted(unknown)), "unknown parameter",
                                f"Known parameters: {', '.join(sorted(public | {'gradient_buffer'}))}.")
        buffer = params.pop("gradient_buffer", None) or {}
        known_buffer = {"memory_cap_gb", "on_model_device", "scratch_dir"}
        if unknown := set(buffer) - known_buffer:
            raise _config_error("gradient_buffer", f"unknown keys {sorted(unknown)}",
                                f"Known keys: {', '.join(sorted(known_buffer))}.")
        model = params.pop("model", {"name": cls.model})
        if isinstance(model, str):
            model = {"name": model}
        if not isinstance(model, Mapping) or "name" not in model:
            raise _config_error("model", f"expected {{name: ..., <options>}}, got {model!r}",
                                "Write e.g. model: {name: small_cnn, width: 8}.")
        # Options sit under the model's own name ({name: small_cnn, small_cnn: {width: 8}}), so an
        # environment that switches the model does not inherit another model's options when
        # parameters merge softly; plain keys ({name: small_cnn, width: 8}) are options too.
        options = {k: v for k, v in model.items() if k != "name" and not isinstance(v, Mapping)}
        own = model.get(model["name"], {})
        if not isinstance(own, Mapping):
            raise _config_error(f"model.{model['name']}", f"expected a mapping of options, got {own!r}",
                                "Write e.g. small_cnn: {width: 8}.")
        options.update(own)
        params["model"] = model["name"]
        params["model_options"] = tuple(sorted(options.items()))
        phases = params.pop("phases", cls.phases)
        if not isinstance(phases, (list, tuple)):
            raise _config_error("phases", f"expected a list of {{epochs, lr}}, got {phases!r}",
                                "Write e.g. [{epochs: 3, lr: 0.1}, {epochs: 3, lr: 0.01}].")
        parsed = []
        for i, phase in enumerate(phases):
            if isinstance(phase, (list, tuple)) and len(phase) == 2:
                parsed.append((phase[0], phase[1]))
            elif isinstance(phase, Mapping) and set(phase) == {"epochs", "lr"}:
                parsed.append((phase["epochs"], phase["lr"]))
            else:
                raise _config_error(f"phases[{i}]", f"expected {{epochs: N, lr: X}}, got {phase!r}",
                                    "Each phase needs exactly the keys epochs and lr.")
        if "memory_cap_gb" in buffer:
            params["buffer_memory_cap_gb"] = buffer["memory_cap_gb"]
        if "on_model_device" in buffer:
            params["buffer_on_model_device"] = buffer["on_model_device"]
        if "scratch_dir" in buffer:
            params["scratch_dir"] = buffer["scratch_dir"]
        if isinstance(params.get("keep_gradients"), list):
            params["keep_gradients"] = tuple(params["keep_gradients"])
        if isinstance(params.get("trace_check"), list):
            params["trace_check"] = tuple(params["trace_check"])
        return cls(phases=tuple(parsed), **params)

    @property
    def num_epochs(self) -> int:
        return sum(epochs for epochs, _ in self.phases)

    @property
    def schedule(self) -> list[EpochPlan]:
        plans = []
        for phase, (epochs, lr) in enumerate(self.phases, start=1):
            plans.extend(EpochPlan(len(plans) + 1, phase, float(lr)) for _ in range(epochs))
        return plans

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

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def identity(self) -> dict[str, Any]:
        """The settings that determine a run's results and spilled files (what ``run_name: auto`` hashes)."""
        device = self.resolved_device()
        return {
            "model": self.model,
            "model_options": {k: v for k, v in self.model_options},
            "phases": [[epochs, float(lr)] for epochs, lr in self.phases],
            "momentum": float(self.momentum),
            "weight_decay": float(self.weight_decay),
            "augment": bool(self.augment),
            "seed": self.seed,
            "device": device.type,
            "bf16_autocast": bool(self.bf16_autocast and device.type == "cuda"),
            "deterministic": bool(self.deterministic),
            "cpu_threads": self.cpu_threads if device.type == "cpu" else None,
            "kept_epochs": list(self.kept_epochs),
            "spill_dtype": self.spill_dtype,
        }


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
                    train_images: torch.Tensor, test_images: torch.Tensor | None) -> "TrainingData":
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
    """Everything a finished run publishes."""

    ordering: str
    run_name: str
    distances: pd.DataFrame
    distance_matrix: torch.Tensor
    history: pd.DataFrame
    model_state: dict[str, torch.Tensor]

    @classmethod
    def empty(cls, ordering: str, run_name: str = "") -> "ProbeResults":
        return cls(ordering, run_name, empty_distance_table(), torch.zeros(0, 0, dtype=torch.float64),
                   empty_history_table(), {})


def empty_distance_table() -> pd.DataFrame:
    return _distance_frame("", {c: [] for c in ("epoch", "phase", "learning_rate", "batch", *GRADIENT_MEASURES,
                                                "full_grad_norm")})


def empty_history_table() -> pd.DataFrame:
    return _history_frame("", "", {c: [] for c in _HISTORY_NUMERIC})


def _distance_frame(ordering: str, rows: Mapping[str, Any]) -> pd.DataFrame:
    frame = pd.DataFrame({
        "ordering": pd.Series([ordering] * len(rows["epoch"]), dtype=object),
        "epoch": np.asarray(rows["epoch"], dtype=np.int64),
        "phase": np.asarray(rows["phase"], dtype=np.int64),
        "learning_rate": np.asarray(rows["learning_rate"], dtype=np.float64),
        "batch": np.asarray(rows["batch"], dtype=np.int64),
        **{c: np.asarray(rows[c], dtype=np.float64) for c in (*GRADIENT_MEASURES, "full_grad_norm")},
    })
    return frame[DISTANCE_COLUMNS]


def _history_frame(ordering: str, run_name: str, rows: Mapping[str, Any]) -> pd.DataFrame:
    n = len(rows["epoch"])
    frame = pd.DataFrame({c: np.asarray(rows[c], dtype=np.float64) for c in _HISTORY_NUMERIC})
    for c in ("epoch", "phase"):
        frame[c] = frame[c].astype(np.int64)
    for c in ("n_train", "batch_size"):  # NaN only in epochs resumed from checkpoints that predate them
        if frame[c].notna().all():
            frame[c] = frame[c].astype(np.int64)
    frame["gradients_kept"] = frame["gradients_kept"].astype(bool)
    frame["ordering"] = pd.Series([ordering] * n, dtype=object)
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


def run_identity(config: TrainingConfig, ordering: str, num_params: int, param_dtype: torch.dtype,
                 data_fingerprint: str | None, probe: bool = True) -> dict[str, Any]:
    """Everything that determines a run's results and files (``run.json``; ``run_name: auto`` hashes it)."""
    identity = {**config.identity(), "ordering": ordering, "probe": probe, "num_params": num_params,
                "param_dtype": str(param_dtype), "data": data_fingerprint}
    if probe and config.traces(ordering):
        identity["trace_check"] = True  # only when on, so that runs without it keep their names
    return identity


def check_run_folder(config: TrainingConfig, ordering: str, num_params: int, param_dtype: torch.dtype) -> None:
    """Before the data is loaded: refuse an explicit ``run_name`` whose folders hold another run.

    Compares every setting but the data (whose digest needs the images); a run
    that differs only in its data is refused when training starts, still before
    it writes anything. ``run_name: auto`` names runs by all of it, so it never mixes.
    """
    if config.run_name == "auto" or config.checkpoint_dir is None:
        return
    store = RunStore(config.checkpoint_dir, config.run_name, ordering,
                     Path(config.gradients_dir) / config.run_name / ordering, config.keep_checkpoints)
    store.check_compatible(run_identity(config, ordering, num_params, param_dtype, None), None,
                           unknown=("data",))


# --------------------------------------------------------------------------- the run


@dataclass
class _Progress:
    """Rows and history completed so far, as plain lists (what a checkpoint stores)."""

    distances: dict[str, list] = field(default_factory=lambda: {
        c: [] for c in ("epoch", "phase", "learning_rate", "batch", *GRADIENT_MEASURES, "full_grad_norm")})
    history: dict[str, list] = field(default_factory=lambda: {c: [] for c in _HISTORY_NUMERIC})
    # epoch -> CRC-32 of each spilled gradient (checkpoints.tensor_checksum), to verify the files on resume
    gradient_checksums: dict[int, list[int]] = field(default_factory=dict)

    def to_state(self) -> dict[str, Any]:
        return {
            "distances": {c: torch.tensor(v, dtype=torch.float64 if isinstance(v[0], float) else torch.int64)
                          if v else torch.zeros(0) for c, v in self.distances.items()},
            "history": {c: torch.tensor(v, dtype=torch.float64) for c, v in self.history.items()},
            "gradient_checksums": {f"{e:03d}": torch.tensor(v, dtype=torch.int64)
                                   for e, v in self.gradient_checksums.items()},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "_Progress":
        progress = cls()
        for c in progress.distances:
            progress.distances[c] = state["distances"][c].tolist()
        epochs = len(state["history"]["epoch"])
        for c in progress.history:  # columns added later read as NaN in older checkpoints
            progress.history[c] = state["history"][c].tolist() if c in state["history"] else [math.nan] * epochs
        for e, v in state.get("gradient_checksums", {}).items():
            progress.gradient_checksums[int(e)] = v.tolist()
        return progress


class GradientProbeRun:
    """One ordering's training run with the gradient probe.

    Construction checks everything (parameters, data, the disk cap, the run
    folder) and writes nothing; :meth:`run` then trains, yielding each kept
    gradient as a :class:`SpilledGradient`, and leaves the outputs in
    :attr:`results`.

    ``probe=False`` trains ``net_normal`` alone (no compare pass, no distances):
    the plain-training baseline of the benchmark and of the test showing that the
    compare pass does not disturb training. ``checkpoint_dir: null`` in the config
    runs without checkpoints.
    """

    def __init__(self, config: TrainingConfig, data: TrainingData, model_factory: Callable[[], nn.Module],
                 ordering: str, *, probe: bool = True) -> None:
        self.config = config
        self.data = data
        self.ordering = ordering
        self.probe = probe
        self.device = config.resolved_device()
        self.schedule = config.schedule
        self.kept_epochs = set(config.kept_epochs) if probe else set()
        self.trace = probe and config.traces(ordering)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            probe_model = model_factory()
        self.model_factory = model_factory
        self.num_params = sum(p.numel() for p in probe_model.parameters() if p.requires_grad)
        self.param_dtype = next(probe_model.parameters()).dtype
        # A checkpoint holds the model's state and one momentum buffer per parameter.
        self.checkpoint_bytes = (sum(t.numel() * t.element_size() for t in probe_model.state_dict().values())
                                 + self.num_params * self.param_dtype.itemsize)
        del probe_model
        spill_bytes = self.num_params * SPILL_DTYPES[config.spill_dtype].itemsize
        self.epoch_spill_bytes = spill_bytes * data.num_batches
        self.spill_file_bytes = spill_bytes + _torch_save_overhead(SPILL_DTYPES[config.spill_dtype])
        if probe:
            check_disk_cap(config, self.num_params, data.num_batches)
        identity = run_identity(config, ordering, self.num_params, self.param_dtype, data.fingerprint(), probe)
        self.identity = identity
        self.digest = config_hash(identity)
        self.run_name = f"{config.model}-{self.digest[:12]}" if config.run_name == "auto" else config.run_name
        self.gradients_dir = Path(config.gradients_dir) / self.run_name / ordering
        self.store = None
        if config.checkpoint_dir is not None:
            self.store = RunStore(config.checkpoint_dir, self.run_name, ordering, self.gradients_dir,
                                  config.keep_checkpoints)
            self.store.check_compatible(identity, self.digest)
        self.results: ProbeResults | None = None

    def partition_id(self, epoch: int, batch: int) -> str:
        """The spilled gradient's id under the gradients root: ``<run_name>/<ordering>/epoch=EEE/batch=KKKK``."""
        return f"{self.run_name}/{self.ordering}/epoch={epoch:03d}/batch={batch:04d}"

    # ------------------------------------------------------------------ main loop

    def run(self) -> Iterator[SpilledGradient]:
        """Train every remaining epoch; yield kept gradients as they are computed; set :attr:`results`."""
        config = self.config
        with deterministic_algorithms(config.deterministic, self.device), cpu_threads(config.cpu_threads):
            if self.store is not None:
                self.store.claim(self.identity, self.digest)
            torch.manual_seed(config.seed)
            net_normal = self.model_factory().to(self.device)
            optimizer = torch.optim.SGD(net_normal.parameters(), lr=self.schedule[0].learning_rate,
                                        momentum=config.momentum, weight_decay=config.weight_decay)
            progress = _Progress()
            start = self._resume(net_normal, optimizer, progress)
            net_compare = flat = None
            if self.probe:
                net_compare = _detached_copy(net_normal)
                flat = FlatGradient(net_compare)
            for plan in self.schedule[start:]:
                yield from self._epoch(plan, net_normal, optimizer, net_compare, flat, progress)
            self.results = self._assemble(net_normal, progress)

    def _resume(self, net_normal: nn.Module, optimizer: torch.optim.Optimizer, progress: _Progress) -> int:
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
        if chosen is None:
            if not damaged:
                return 0
            raise CheckpointError(
                f"Run '{self.run_name}' of '{self.ordering}' cannot resume: "
                + "; ".join(damaged[:3]) + (f"; and {len(damaged) - 3} more" if len(damaged) > 3 else "")
                + ". No older intact checkpoint is left to recompute from. Restore the file(s), or delete "
                f"'{self.store.folder}' and '{self.gradients_dir}' to start the run over."
            )
        done, state = chosen
        if damaged:
            self.store.set_aside_checkpoints_after(done)
            logger.warning(
                "%s: %s. Resuming from the intact checkpoint of epoch %d and recomputing epochs %d..%d.",
                self.ordering, "; ".join(damaged[:3]) + (f"; and {len(damaged) - 3} more" if len(damaged) > 3 else ""),
                done, done + 1, max(newest or done, done + 1),
            )
        net_normal.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        progress.__dict__.update(_Progress.from_state(state).__dict__)
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and state.get("rng_cuda"):
            torch.cuda.set_rng_state_all(list(state["rng_cuda"]))
        verb = "complete; reusing its results" if done == len(self.schedule) else f"resuming after epoch {done}"
        logger.info("%s: run '%s' found in %s, %s", self.ordering, self.run_name, self.store.folder, verb)
        return done

    def gradient_path(self, epoch: int, batch: int) -> Path:
        return self.gradients_dir / f"epoch={epoch:03d}" / f"batch={batch:04d}.pt"

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
                    verified[key] = _gradient_file_problem(path, expected, self.num_params, spill_dtype)
                if verified[key] is not None:
                    bad.append((path, verified[key]))
        return bad

    def _batch_inputs(self, epoch: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.data.batches[batch]
        inputs = to_model_input(self.data.train_images[rows], dtype=self.param_dtype)
        if self.config.augment:
            inputs = augment(inputs, batch_generator(self.config.seed, epoch, batch))
        non_blocking = self.device.type == "cuda"
        return (inputs.to(self.device, non_blocking=non_blocking),
                self.data.train_labels[rows].to(self.device, non_blocking=non_blocking))

    def _autocast(self):
        enabled = self.config.bf16_autocast and self.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()

    def _epoch(self, plan: EpochPlan, net_normal: nn.Module, optimizer: torch.optim.Optimizer,
               net_compare: nn.Module | None, flat: FlatGradient | None, progress: _Progress
               ) -> Iterator[SpilledGradient]:
        config, data = self.config, self.data
        started = time.perf_counter()
        kept = plan.epoch in self.kept_epochs
        self._check_free_space(plan.epoch, kept)
        checksums: list[int] = []
        for group in optimizer.param_groups:
            group["lr"] = plan.learning_rate
        net_normal.train()
        buffer = None
        if net_compare is not None:
            # Algorithm 1, line 5: net_compare takes net_normal's full state (parameters and BN buffers).
            net_compare.load_state_dict(net_normal.state_dict())  # copies in place: .grad views stay
            net_compare.train()
            flat.check_attached()
            on_device = config.buffer_on_model_device and self.device.type == "cuda"
            scratch = config.scratch_dir or (self.store.scratch_dir if self.store is not None else None)
            buffer = EpochGradients(data.num_batches, self.num_params, flat.vector.dtype,
                                    self.device if on_device else "cpu", config.buffer_memory_cap_gb * GIB, scratch)
        # Per-example gradients at the epoch-start parameters, BatchNorm on the epoch-start running statistics.
        variance = GradientVarianceTrace(net_compare) if self.trace else None
        spill_dtype = SPILL_DTYPES[config.spill_dtype]
        losses = torch.zeros(data.num_batches, dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        try:
            with _progress_bar(config.progress_bar, f"{self.ordering} epoch {plan.epoch}/{len(self.schedule)}",
                               data.num_batches) as advance:
                for k in range(data.num_batches):
                    inputs, targets = self._batch_inputs(plan.epoch, k)
                    # The ordinary training step of net_normal (Algorithm 1, lines 8-11).
                    optimizer.zero_grad(set_to_none=True)
                    with self._autocast():
                        outputs = net_normal(inputs)
                        loss = nn.functional.cross_entropy(outputs, targets)
                    loss.backward()
                    optimizer.step()
                    losses[k] = loss.detach()
                    correct += (outputs.detach().argmax(dim=1) == targets).sum()
                    if net_compare is not None:
                        # The same inputs through net_compare, still at the epoch-start parameters (lines 13-16).
                        flat.zero()
                        with self._autocast():
                            compare_loss = nn.functional.cross_entropy(net_compare(inputs), targets)
                        compare_loss.backward()
                        buffer.append(flat.vector)
                        if variance is not None:
                            variance.add(inputs, targets)
                        if kept:
                            spilled = flat.vector.to("cpu", spill_dtype, copy=True)
                            checksums.append(tensor_checksum(spilled))
                            yield SpilledGradient(plan.epoch, k, spilled)
                    advance()
            batch_losses = losses.cpu().numpy()
            if not np.isfinite(batch_losses).all():
                bad = int(np.flatnonzero(~np.isfinite(batch_losses))[0])
                raise DivergenceError(self._divergence_message(plan.epoch, bad, f"training loss {batch_losses[bad]}"))
            measures = None
            if buffer is not None:
                try:
                    measures = buffer.measures()
                except NonFiniteGradientError as error:
                    raise DivergenceError(self._divergence_message(plan.epoch, None, str(error))) from error
        finally:
            if buffer is not None:
                buffer.close()
        test_loss, test_accuracy = self._evaluate(net_normal)
        seconds = time.perf_counter() - started
        if kept:
            progress.gradient_checksums[plan.epoch] = checksums
        self._record(plan, measures, float(batch_losses.mean()),
                     int(correct) / (data.num_batches * data.batch_size), test_loss, test_accuracy, seconds,
                     kept, progress, variance.trace() if variance is not None else math.nan)
        if self.store is not None:
            state = {
                "model": net_normal.state_dict(),
                "optimizer": optimizer.state_dict(),
                **progress.to_state(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            }
            self.store.save_checkpoint(plan.epoch, state, self.digest)

    def _divergence_message(self, epoch: int, batch: int | None, what: str) -> str:
        where = f"epoch {epoch}" + (f", batch {batch}" if batch is not None else "")
        kept = (f"the last good checkpoint (epoch {epoch - 1}) is kept in '{self.store.folder}'"
                if self.store is not None and epoch > 1 else "no checkpoint of this epoch was written")
        return (f"Ordering '{self.ordering}', {where}: {what} is not finite; the run stopped and {kept}. "
                "Lower the learning rate of that phase (gradient_training.phases) or enable "
                "gradient_training.augment, then rerun.")

    def _check_free_space(self, epoch: int, kept: bool) -> None:
        """Stop before an epoch whose files (kept gradients, scratch buffer, checkpoint) would not fit.

        Needs are added up per file system, with each file rounded up to whole blocks.
        """
        needs: list[tuple[Path, str, int]] = []
        if kept:
            needs.append((self.gradients_dir, "kept gradients",
                          self.data.num_batches * self.spill_file_bytes))
        buffer_bytes = self.data.num_batches * self.num_params * self.param_dtype.itemsize
        if self.probe and buffer_bytes > self.config.buffer_memory_cap_gb * GIB:
            scratch = self.config.scratch_dir or (self.store.scratch_dir if self.store is not None else None)
            needs.append((Path(scratch) if scratch else Path(tempfile.gettempdir()), "scratch buffer", buffer_bytes))
        if self.store is not None:
            distance_rows = len(self.schedule) * self.data.num_batches * len(DISTANCE_COLUMNS) * 8
            needs.append((self.store.folder, "checkpoint", self.checkpoint_bytes + distance_rows + 2**16))
        by_device: dict[int, list[tuple[Path, str, int, int]]] = {}
        for folder, what, nbytes in needs:
            existing = _existing_ancestor(folder)
            block = os.statvfs(existing).f_frsize or 4096
            files = self.data.num_batches if what == "kept gradients" else 1
            on_disk = files * -(-(nbytes // files) // block) * block
            by_device.setdefault(os.stat(existing).st_dev, []).append((folder, what, on_disk, existing))
        for entries in by_device.values():
            need = sum(e[2] for e in entries)
            free = shutil.disk_usage(entries[0][3]).free
            if free < need:
                folders = " and ".join(f"'{folder}'" for folder, *_ in entries)
                parts = ", ".join(f"{what} {format_bytes(n)}" for _, what, n, _ in entries)
                last = (f"the checkpoint of epoch {epoch - 1} is kept, so the run resumes after it"
                        if epoch > 1 and self.store is not None else "nothing was trained yet")
                raise DiskSpaceError(
                    f"Epoch {epoch} of '{self.ordering}' needs {format_bytes(need)} in {folders} ({parts}), but "
                    f"only {format_bytes(free)} are free. Free space there and run the same command again ({last}), "
                    "or keep fewer epochs' gradients (gradient_training.keep_gradients), or move them "
                    "(runtime parameter gradients_dir).",
                )

    @torch.inference_mode()
    def _evaluate(self, model: nn.Module) -> tuple[float, float]:
        if self.data.test_images is None or self.data.test_images.shape[0] == 0:
            return float("nan"), float("nan")
        model.eval()
        total_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        n = self.data.test_images.shape[0]
        for start in range(0, n, self.config.eval_batch_size):
            stop = min(n, start + self.config.eval_batch_size)
            inputs = to_model_input(self.data.test_images[start:stop], dtype=self.param_dtype).to(self.device)
            targets = self.data.test_labels[start:stop].to(self.device)
            with self._autocast():
                outputs = model(inputs)
            total_loss += nn.functional.cross_entropy(outputs.double(), targets, reduction="sum")
            correct += (outputs.argmax(dim=1) == targets).sum()
        model.train()
        return float(total_loss) / n, int(correct) / n

    def _record(self, plan: EpochPlan, measures: dict | None, train_loss: float, train_accuracy: float,
                test_loss: float, test_accuracy: float, seconds: float, kept: bool, progress: _Progress,
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
        logger.info(
            "%s epoch %d/%d (phase %d, lr %g): train loss %.4f acc %.3f | test loss %.4f acc %.3f | "
            "mean distance %.5g | %.1f s%s",
            self.ordering, plan.epoch, len(self.schedule), plan.phase, plan.learning_rate, train_loss,
            train_accuracy, test_loss, test_accuracy, mean_distance, seconds, " | gradients kept" if kept else "",
        )

    def _assemble(self, net_normal: nn.Module, progress: _Progress) -> ProbeResults:
        distances = _distance_frame(self.ordering, progress.distances)
        epochs = len(progress.history["epoch"])
        if self.probe and epochs:
            matrix = torch.tensor(progress.distances["distance"], dtype=torch.float64).view(epochs, self.data.num_batches)
        else:
            matrix = torch.zeros(0, 0, dtype=torch.float64)
        model_state = {k: v.detach().cpu().clone() for k, v in net_normal.state_dict().items()}
        return ProbeResults(self.ordering, self.run_name, distances, matrix,
                            _history_frame(self.ordering, self.run_name, progress.history), model_state)


# --------------------------------------------------------------------------- helpers


def _torch_save_overhead(dtype: torch.dtype) -> int:
    """Bytes ``torch.save`` adds around a 1-D tensor (its zip container; 64 bytes of alignment slack)."""
    buffer = io.BytesIO()
    torch.save(torch.zeros(1, dtype=dtype), buffer)
    return len(buffer.getvalue()) - dtype.itemsize + 64


def _existing_ancestor(folder: Path) -> Path:
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _gradient_file_problem(path: Path, expected_checksum: int | None, num_params: int,
                           dtype: torch.dtype) -> str | None:
    """Why a spilled gradient file cannot be trusted (``None``: it holds what was spilled)."""
    if not path.exists():
        return "missing"
    try:
        tensor = load_tensors(path)
    except Exception as error:  # load_tensors names truncated and corrupt files
        return f"unreadable: {error}"
    if not isinstance(tensor, torch.Tensor) or tensor.shape != (num_params,) or tensor.dtype != dtype:
        shape = (f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor)
                 else type(tensor).__name__)
        return f"holds {shape}, expected {dtype} ({num_params},)"
    if expected_checksum is not None and tensor_checksum(tensor) != expected_checksum:
        return "its values differ from the gradient that was spilled (checksum mismatch)"
    return None


def _detached_copy(model: nn.Module) -> nn.Module:
    """A separate module with its own parameters and buffers (never shares storage with ``model``)."""
    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.grad = None
    return clone




def named_model_factory(config: TrainingConfig, num_classes: int = 10) -> Callable[[], nn.Module]:
    """A builder of the model the configuration names (``best_minibatch.training.models``)."""
    from best_minibatch.training.models import build_model

    options = dict(config.model_options)
    try:
        build_model(config.model, num_classes, **options)  # fails fast on a bad name or option
    except ValueError as error:
        raise _config_error("model", str(error), "Fix model.name or its options.") from error
    return lambda: build_model(config.model, num_classes, **options)


@contextlib.contextmanager
def _progress_bar(enabled: bool, description: str, total: int):
    """A rich progress bar on the console Kedro's log handler uses; a no-op when output is not a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    import rich

    console: Console = rich.get_console()
    if not enabled or not console.is_terminal:
        yield lambda: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)
