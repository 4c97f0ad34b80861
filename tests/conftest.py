"""Shared fixtures: the real data every test may use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from best_minibatch.cifar import ImageDataset, read_image_dataset

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_ZIP = PROJECT_ROOT / "data" / "01_raw" / "cifar10-sample.zip"
FULL_CIFAR_ZIP = PROJECT_ROOT.parent / "shared" / "data" / "cifar10-jpeg.zip"

# Two cores: keep torch from oversubscribing them when tests run.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def sample_dataset() -> ImageDataset:
    """The embedded sample (5,000 train + 1,000 test real CIFAR-10 images)."""
    return read_image_dataset(SAMPLE_ZIP)


@pytest.fixture(scope="session")
def full_cifar_zip() -> Path:
    """All of CIFAR-10 as JPEG; present on every machine of this project and in CI."""
    if not FULL_CIFAR_ZIP.exists():
        pytest.fail(f"{FULL_CIFAR_ZIP} is missing; it is part of the project's shared data.")
    return FULL_CIFAR_ZIP


@pytest.fixture(scope="session")
def full_dataset(full_cifar_zip: Path) -> ImageDataset:
    """All 60,000 CIFAR-10 images, decoded once per test session (~2 s)."""
    return read_image_dataset(full_cifar_zip)
