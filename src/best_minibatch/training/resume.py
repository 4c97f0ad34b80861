"""Beside the loop: what a checkpoint holds, the check of spilled files on resume, the free-space check.

Knows nothing of Kedro. ``gradient_training.GradientProbeRun`` saves a
:class:`Progress` in every checkpoint (``checkpoints.RunStore``), verifies the
spilled gradient files against the CRC-32 recorded when they were computed
(:func:`gradient_file_problem`) before it resumes, and stops before an epoch whose
files would not fit on disk (:func:`check_free_space`).
"""

from __future__ import annotations

import io
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from best_minibatch.data.tensor_io import format_bytes, load_tensors
from best_minibatch.training.checkpoints import tensor_checksum
from best_minibatch.training.probing import GRADIENT_MEASURES

#: ``position``: the step of its epoch at which the batch was trained (its batch number in a fixed order).
DISTANCE_ROW_KEYS = ("epoch", "phase", "learning_rate", "batch", *GRADIENT_MEASURES, "full_grad_norm", "position")
NULL_ROW_KEYS = ("epoch", "phase", "learning_rate", "draw", *GRADIENT_MEASURES, "full_grad_norm")
HISTORY_NUMERIC = ["epoch", "phase", "learning_rate", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                   "mean_distance", "seconds", "full_grad_norm", "gradients_kept", "gradient_variance_trace",
                   "n_train", "batch_size"]


class DiskSpaceError(OSError):
    """Too little free space for an epoch's files; the message names the folder and the size needed."""


@dataclass
class Progress:
    """Rows and history completed so far, as plain lists (what a checkpoint stores)."""

    distances: dict[str, list] = field(default_factory=lambda: {c: [] for c in DISTANCE_ROW_KEYS})
    history: dict[str, list] = field(default_factory=lambda: {c: [] for c in HISTORY_NUMERIC})
    # the same-parameter null's rows (epochs x draws)
    null: dict[str, list] = field(default_factory=lambda: {c: [] for c in NULL_ROW_KEYS})
    # epoch -> CRC-32 of each spilled gradient (checkpoints.tensor_checksum), to verify the files on resume
    gradient_checksums: dict[int, list[int]] = field(default_factory=dict)

    def to_state(self) -> dict[str, Any]:
        return {
            "distances": {c: torch.tensor(v, dtype=torch.float64 if isinstance(v[0], float) else torch.int64)
                          if v else torch.zeros(0) for c, v in self.distances.items()},
            "history": {c: torch.tensor(v, dtype=torch.float64) for c, v in self.history.items()},
            "null": {c: torch.tensor(v, dtype=torch.float64) for c, v in self.null.items()},
            "gradient_checksums": {f"{e:03d}": torch.tensor(v, dtype=torch.int64)
                                   for e, v in self.gradient_checksums.items()},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Progress:
        progress = cls()
        distances = state["distances"]
        for c in progress.distances:
            if c in distances:
                progress.distances[c] = distances[c].tolist()
        if "position" not in distances:  # checkpoints from before batch_order: always the fixed order
            progress.distances["position"] = list(progress.distances["batch"])
        epochs = len(state["history"]["epoch"])
        for c in progress.history:  # columns added later read as NaN in older checkpoints
            progress.history[c] = state["history"][c].tolist() if c in state["history"] else [math.nan] * epochs
        for c, v in state.get("null", {}).items():  # absent in checkpoints of runs without the null
            progress.null[c] = [int(x) for x in v.tolist()] if c in ("epoch", "phase", "draw") else v.tolist()
        for e, v in state.get("gradient_checksums", {}).items():
            progress.gradient_checksums[int(e)] = v.tolist()
        return progress


def gradient_file_problem(path: Path, expected_checksum: int | None, num_params: int,
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
