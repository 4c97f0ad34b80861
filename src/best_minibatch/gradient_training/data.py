"""``gradient_training``'s data: one ordering's fixed mini-batches over the training images, and the test split.

Knows nothing of Kedro. :meth:`TrainingData.from_tables` checks ``batch_assignments``,
``image_index`` and the image tensors against each other (docs/data_flow.md) before
any work.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch


class TrainingDataError(ValueError):
    """Inputs (batch assignments, index, images) that do not fit together."""


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
