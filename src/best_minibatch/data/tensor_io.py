"""The project's one tensor format, Kedro-free.

A file written with ``torch.save`` holding either one ``torch.Tensor`` or a flat
``dict`` of tensors (a model's ``state_dict``, a checkpoint's tensors), read back
with ``torch.load(weights_only=True)`` so that loading never runs pickled code.

Writes are atomic: the file is written under a temporary name in the same
folder, flushed to disk, then renamed, so an interrupted run never leaves a
half-written file under the real name. A file that cannot be read raises an
error naming it. A write that runs out of disk space raises
:class:`DiskFullError` naming the folder and the space needed (torch itself
reports it only as an unexplained "unexpected pos" error).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

Tensors = torch.Tensor | dict[str, Any]


#: Suffix of the temporary files of atomic writes; a file with it was never completed.
PARTIAL_SUFFIX = ".partial"
#: Bytes in a GiB (sizes in messages and caps are binary).
GIB = 2**30
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class TensorFileError(ValueError):
    """A tensor file that cannot be read (corrupt or truncated); the message names it."""


class DiskFullError(OSError):
    """A write ran out of disk space; the message names the folder and the space needed."""


class _RecordingWriter:
    """Passes writes to ``stream`` and remembers the ``OSError`` one raised.

    ``torch.save`` turns a failing write into a bare ``RuntimeError`` ("unexpected
    pos"); the recorded error says what really happened.
    """

    def __init__(self, stream) -> None:
        self.stream = stream
        self.error: OSError | None = None
        self.written = 0

    def write(self, data) -> int:
        try:
            count = self.stream.write(data)
        except OSError as error:
            self.error = error
            raise
        self.written += count
        return count

    def flush(self) -> None:
        self.stream.flush()


def tensor_bytes(data: Any) -> int:
    """The bytes of every tensor in ``data`` (a tensor or nested dicts and lists of them)."""
    if isinstance(data, torch.Tensor):
        return data.numel() * data.element_size()
    if isinstance(data, dict):
        return sum(tensor_bytes(v) for v in data.values())
    if isinstance(data, (list, tuple)):
        return sum(tensor_bytes(v) for v in data)
    return 0


def save_tensors_atomically(data: Tensors, path: str | os.PathLike) -> None:
    """Write ``data`` with ``torch.save`` to ``path`` through a temporary file and a rename.

    Raises :class:`DiskFullError` (an ``OSError`` with ``errno.ENOSPC``) when the
    disk fills up; the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    writer = None
    try:
        with os.fdopen(handle, "wb") as stream:
            writer = _RecordingWriter(stream)
            torch.save(data, writer)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        cause = writer.error if writer is not None and writer.error is not None else error
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
            free = shutil.disk_usage(path.parent).free
            raise DiskFullError(
                cause.errno,
                f"No space left in '{path.parent}' while writing '{path.name}': it needs about "
                f"{format_bytes(tensor_bytes(data))} and {format_bytes(free)} are free. Nothing was "
                "written under that name. Free space there (or point the output elsewhere) and run the "
                "same command again; a training run resumes from its last complete epoch.",
            ) from cause
        raise


def write_text_atomically(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (a reader never sees half of it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def format_bytes(count: float) -> str:
    """``count`` bytes in binary units, e.g. ``40.0 KiB``."""
    units = ("bytes", "KiB", "MiB", "GiB", "TiB")
    value, unit = float(count), 0
    while abs(value) >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    return f"{int(count)} bytes" if unit == 0 else f"{value:.1f} {units[unit]}"


def load_tensors(path: str | os.PathLike) -> Tensors:
    """Read a file written by :func:`save_tensors_atomically`, naming the file if it is damaged."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError...
        raise TensorFileError(
            f"Tensor file '{path}' is corrupt or truncated ({error}). Delete it and rerun the "
            "node that writes it."
        ) from error
