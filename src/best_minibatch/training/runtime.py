"""Where and how torch runs: deterministic kernels and CPU threads, shared by every training loop."""

from __future__ import annotations

import contextlib
import os
import threading
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


_FREE_GPUS: list[int] | None = None
_GPU_GUARD = threading.Lock()


@contextlib.contextmanager
def gpu_slot(device: torch.device) -> Iterator[None]:
    """Pin this thread to a GPU no other training of this process uses while the block runs.

    A process that sees one GPU (a dask-cuda worker, a plain run) always gets it. A
    Dask worker that sees several (a Slurm job of ``gpus_per_job`` GPUs, one worker
    with a thread per GPU) runs a training per thread: each takes a free device
    (``torch.cuda.set_device`` is per thread, and ``cuda`` means the current device).
    The worker's ``GPU`` resource keeps the trainings per worker at most its GPUs.
    """
    global _FREE_GPUS
    if device.type != "cuda" or device.index is not None or torch.cuda.device_count() < 2:
        yield
        return
    with _GPU_GUARD:
        if _FREE_GPUS is None:
            _FREE_GPUS = list(range(torch.cuda.device_count()))
        if not _FREE_GPUS:
            raise RuntimeError("More trainings run at once in this process than it sees GPUs; give the Dask "
                               "workers a GPU resource no larger than their GPUs (docs/scaling.md).")
        index = _FREE_GPUS.pop(0)
    previous = torch.cuda.current_device()
    torch.cuda.set_device(index)
    try:
        yield
    finally:
        torch.cuda.set_device(previous)
        with _GPU_GUARD:
            _FREE_GPUS.append(index)
            _FREE_GPUS.sort()


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present, else the CPU), ``cpu`` or ``cuda``; the one place devices are resolved.

    Raises ``ValueError`` for an unknown name or ``cuda`` without a CUDA device; callers that
    read a parameter turn it into their parameter's error.
    """
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("cuda was asked for but no CUDA device is available")
    return torch.device(name)


def available_memory(device: torch.device) -> int:
    """Bytes the device can still give: free GPU memory, or the RAM the kernel calls available."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
