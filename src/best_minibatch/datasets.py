"""Kedro datasets of this project.

``TensorDataset`` is the project's one tensor format: a file written with
``torch.save`` holding either one ``torch.Tensor`` or a flat ``dict`` of
tensors (a model's ``state_dict``, a checkpoint's tensors), read back with
``torch.load(weights_only=True)`` so that loading never runs pickled code.
It is used for the image tensors, the distance matrices, the trained models and,
as the inner dataset of a ``PartitionedDataset``, for the spilled gradients.

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
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import torch
from kedro.io.core import (
    AbstractDataset,
    AbstractVersionedDataset,
    DatasetError,
    Version,
    get_filepath_str,
    get_protocol_and_path,
)

Tensors = torch.Tensor | dict[str, Any]


#: Suffix of the temporary files of atomic writes; a file with it was never completed.
PARTIAL_SUFFIX = ".partial"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


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
        raise DatasetError(
            f"Tensor file '{path}' is corrupt or truncated ({error}). Delete it and rerun the "
            "node that writes it."
        ) from error


class TensorDataset(AbstractVersionedDataset[Tensors, Tensors]):
    """A ``torch.Tensor`` (or a dict of tensors) in one ``.pt`` file, optionally versioned.

    Example catalog entry::

        train_images:
          type: best_minibatch.datasets.TensorDataset
          filepath: data/02_intermediate/train_images.pt
          versioned: true
    """

    def __init__(
        self,
        filepath: str,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
    ) -> None:
        protocol, path = get_protocol_and_path(filepath, version)
        if protocol != "file":
            raise DatasetError(
                f"TensorDataset writes local files only (atomic rename); got '{filepath}'."
            )
        self._protocol = protocol
        self._fs = fsspec.filesystem(protocol, **(fs_args or {}))
        self.metadata = metadata
        super().__init__(
            filepath=PurePosixPath(path),
            version=version,
            exists_function=self._fs.exists,
            glob_function=self._fs.glob,
        )

    def load(self) -> Tensors:
        return load_tensors(get_filepath_str(self._get_load_path(), self._protocol))

    def save(self, data: Tensors) -> None:
        if not isinstance(data, (torch.Tensor, dict)):
            raise DatasetError(
                f"TensorDataset saves a torch.Tensor or a dict of tensors, got {type(data).__name__}."
            )
        save_tensors_atomically(data, get_filepath_str(self._get_save_path(), self._protocol))

    def _exists(self) -> bool:
        try:
            path = get_filepath_str(self._get_load_path(), self._protocol)
        except DatasetError:
            return False
        return self._fs.exists(path)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, "version": self._version}


class OptionalDataset(AbstractDataset[Any, Any]):
    """Another dataset, read as ``None`` while nothing has been saved to it.

    For inputs that a separate pipeline may or may not have produced yet: the report
    includes the batch_selection section only once ``kedro run --pipeline=batch_selection``
    has written it. Example::

        batch_selection_report_section:
          type: best_minibatch.datasets.OptionalDataset
          dataset:
            type: text.TextDataset
            filepath: data/08_reporting/batch_selection/report_fragment.html
            versioned: true
    """

    def __init__(self, dataset: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        self._dataset = AbstractDataset.from_config("wrapped", dict(dataset))
        self.metadata = metadata

    def load(self) -> Any:
        return self._dataset.load() if self._dataset.exists() else None

    def save(self, data: Any) -> None:
        self._dataset.save(data)

    def _exists(self) -> bool:
        return self._dataset.exists()

    def _describe(self) -> dict[str, Any]:
        return {"dataset": self._dataset._describe()}
