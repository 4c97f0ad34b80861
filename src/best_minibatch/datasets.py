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
error naming it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import torch
from kedro.io.core import (
    AbstractVersionedDataset,
    DatasetError,
    Version,
    get_filepath_str,
    get_protocol_and_path,
)

Tensors = torch.Tensor | dict[str, Any]


def save_tensors_atomically(data: Tensors, path: str | os.PathLike) -> None:
    """Write ``data`` with ``torch.save`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(data, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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
