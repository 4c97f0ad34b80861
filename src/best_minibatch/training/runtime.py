"""Where and how torch runs: deterministic kernels and CPU threads, shared by every training loop."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool, device: torch.device) -> Iterator[None]:
    """Deterministic kernels on CUDA while the block runs, restoring the caller's settings after.

    On the CPU the kernels the project's loops use are deterministic for a fixed thread
    count (``cpu_threads``), which the resume and reproducibility tests check bit for
    bit; there the switch is left alone, because turning it on imports torch's compiler
    stack (seconds per process).
    """
    if device.type != "cuda":
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    previous_benchmark = torch.backends.cudnn.benchmark
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.benchmark = not enabled
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous_benchmark


@contextlib.contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """Use ``count`` intra-op CPU threads while the block runs (``None``: leave torch's setting)."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
