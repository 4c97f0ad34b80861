"""Nodes of ``ingest_cifar``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from best_minibatch.data.cifar import SourceConfig, download_cifar_python, read_image_dataset

logger = logging.getLogger(__name__)


def ingest_images(source: dict[str, Any]) -> tuple[pd.DataFrame, torch.Tensor, torch.Tensor]:
    """Read the raw dataset named by ``source``; return the index and the train/test uint8 NHWC tensors.

    ``source`` holds ``path``, ``layout`` (auto, image_folder, cifar_python), ``download``
    and ``download_root``. With ``download: true`` and a missing ``path`` the canonical
    release is fetched through torchvision into ``download_root``.
    """
    config = SourceConfig.from_params({"source": source})
    path = Path(config.path)
    if not path.exists() and config.download:
        path = download_cifar_python(Path(config.download_root))
    dataset = read_image_dataset(path, layout=config.layout)
    counts = dataset.index.groupby("split").size().to_dict()
    logger.info(
        "Ingested %s: %d training and %d test images of %d classes, %s each",
        path, counts["train"], counts["test"], len(dataset.class_names),
        "x".join(map(str, dataset.images["train"].shape[1:])),
    )
    return dataset.index, dataset.images["train"], dataset.images["test"]
