"""Kedro datasets of this project, thin wrappers of the Kedro-free tensor I/O.

``TensorDataset`` reads and writes the project's one tensor format
(:mod:`best_minibatch.data.tensor_io`: ``torch.save`` files loaded with
``weights_only=True``, written atomically, disk-full errors that name the
folder). It is used for the image tensors, the distance matrices, the trained
models and, as the inner dataset of ``SpilledGradientsDataset`` (a
``PartitionedDataset``), for the spilled gradients, which the training run writes
itself. ``OptionalDataset`` reads another dataset as ``None`` until it exists.
"""

from __future__ import annotations

import os
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
from kedro_datasets.partitions import PartitionedDataset

from best_minibatch.data.tensor_io import Tensors, load_tensors, save_tensors_atomically


class TensorDataset(AbstractVersionedDataset[Tensors, Tensors]):
    """A ``torch.Tensor`` (or a dict of tensors) in one ``.pt`` file, optionally versioned.

    Example catalog entry::

        train_images:
          type: best_minibatch.kedro_glue.datasets.TensorDataset
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
          type: best_minibatch.kedro_glue.datasets.OptionalDataset
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


class SpilledGradientsDataset(PartitionedDataset):
    """The spilled gradients: a ``PartitionedDataset`` of :class:`TensorDataset` files that the run writes.

    ``gradient_training`` writes each kept gradient as soon as it is computed, in its run
    folder (``best_minibatch.gradient_training.store.GradientFiles``: one writer under
    every runner, so a sequential and a Dask run write the same files the same way). The
    node then saves ``{partition_id: path written}`` here, and saving checks, without
    writing, that each partition is the file this dataset reads under that id and that
    it exists: a ``gradients_dir`` that differs from this dataset's ``path`` fails here,
    naming both. Loading is ``PartitionedDataset``'s: ``{partition_id: load function}``.
    """

    def save(self, data: dict[str, Any]) -> None:
        problems = []
        for partition_id, written in sorted(data.items()):
            expected = Path(self._partition_to_path(partition_id))
            if not isinstance(written, (str, os.PathLike)):
                problems.append(f"'{partition_id}': expected the path its run wrote, got {type(written).__name__}")
            elif Path(written).absolute() != expected.absolute():
                problems.append(f"'{partition_id}' was written to '{written}', but this dataset reads it from "
                                f"'{expected}'")
            elif not expected.is_file():
                problems.append(f"'{partition_id}' is missing at '{expected}'")
        if problems:
            raise DatasetError(
                f"Spilled gradients under '{self._path}' do not match what the training wrote: "
                + "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
                + ". Keep gradient_training.gradients_dir equal to this dataset's path (both read the runtime "
                "parameter gradients_dir) and run the same command again; training resumes from its checkpoints."
            )
        self._invalidate_caches()
