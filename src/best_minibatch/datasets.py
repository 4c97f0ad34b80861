"""Kedro datasets of this project, thin wrappers of the Kedro-free tensor I/O.

``TensorDataset`` reads and writes the project's one tensor format
(:mod:`best_minibatch.data.tensor_io`: ``torch.save`` files loaded with
``weights_only=True``, written atomically, disk-full errors that name the
folder). It is used for the image tensors, the distance matrices, the trained
models and, as the inner dataset of a ``PartitionedDataset``, for the spilled
gradients. ``OptionalDataset`` reads another dataset as ``None`` until it exists.
"""

from __future__ import annotations

from pathlib import PurePosixPath
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

from best_minibatch.data.tensor_io import Tensors, load_tensors, save_tensors_atomically


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

        batch_selection.report_fragment_html:
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
