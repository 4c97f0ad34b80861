"""Turning the project's uint8 NHWC image tensors into model inputs.

Every model in the project sees the same preprocessing: scale to [0, 1],
normalise per channel with the CIFAR-10 training-set statistics, NCHW layout.
Augmentation (random crop with 4-pixel zero padding, horizontal flip) is
optional and driven by an explicit ``torch.Generator`` so that a rerun with the
same seed sees the same crops and flips.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Per-channel mean and standard deviation of the CIFAR-10 training set (RGB, [0, 1] scale).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def to_model_input(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``N x H x W x 3`` (RGB) -> normalised ``N x 3 x H x W`` floats."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"Expected uint8 images of shape N x H x W x 3, got {images.dtype} {tuple(images.shape)}."
        )
    x = images.permute(0, 3, 1, 2).to(dtype).div_(255.0)
    mean = torch.tensor(CIFAR10_MEAN, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, dtype=dtype).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def augment(inputs: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip of an ``N x C x H x W`` batch.

    Padding happens after normalisation, so the padded border is the normalised
    value 0 (the dataset mean), as torchvision's ``RandomCrop`` on normalised input.
    All randomness comes from ``generator``.
    """
    n, _, h, w = inputs.shape
    padded = F.pad(inputs, (padding, padding, padding, padding))
    tops = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    lefts = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    rows = tops.view(n, 1) + torch.arange(h).view(1, h)  # n x h
    cols = lefts.view(n, 1) + torch.arange(w).view(1, w)  # n x w
    cols = torch.where(flips.view(n, 1), cols.flip(1), cols)
    batch = torch.arange(n).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)]  # n x h x w x c
    return out.permute(0, 3, 1, 2).contiguous()


def batch_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    """A generator seeded from (seed, epoch, batch): augmentation reproduces on rerun or resume."""
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + batch)
    return generator
