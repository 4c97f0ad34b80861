"""M4, the perceptual metric: LPIPS (AlexNet, v0.1) distance of each image to the average image.

Knows nothing of Kedro. Registered in :mod:`best_minibatch.metrics.scoring` (the
registry's order puts it after ``edges``). Where its AlexNet ImageNet weights come
from, and how they are proven to be the real ones, is
:mod:`best_minibatch.metrics.lpips_weights`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from best_minibatch.metrics import lpips_weights
from best_minibatch.metrics.lpips_weights import lpips_with_backbone
from best_minibatch.metrics.options import MetricConfigError

if TYPE_CHECKING:
    import lpips
    import torch

    from best_minibatch.config import Section

logger = logging.getLogger(__name__)

PERCEPTUAL_DEFAULTS = {
    # Local file with the AlexNet ImageNet weights (torchvision's alexnet-owt-7be5be79.pth, or the
    # file `make weights` stores); null: torchvision's cache, then (with `download`) torchvision's
    # download, then the file `make weights` converted from the package index.
    "backbone_weights": None,
    # true: when no local file has the weights, try torchvision's download (10 s timeout) first.
    "download": False,
    # true: missing weights are an error before any work; false: the metric is skipped with a warning.
    "strict": False,
    # Side length the images (and the average image) are bilinearly upsampled to before LPIPS;
    # None = native 32x32, as in the paper (which feeds the images to LPIPS as they are). 64 is
    # the patch size LPIPS's linear layers were fitted on and gives AlexNet's conv3-conv5 3x3
    # instead of 1x1 feature maps, at about 4x the cost.
    "upsample_to": None,
    "batch_size": 500,
    "device": "cpu",  # cpu | cuda | auto (cuda when available)
    # Intra-op CPU threads while scoring (null: torch's setting). One is fastest on a shared 2-core
    # machine: measured on 50,000 images, 6.7 s with one thread against 75 s with two while other
    # jobs ran (benchmarks/benchmark_metrics.py --threads).
    "cpu_threads": 1,
}


def perceptual_options(section: Section) -> dict[str, Any]:
    """``score_metrics.perceptual``, every option checked (bad options are errors even where the metric would
    be skipped for want of weights)."""
    return {
        "backbone_weights": section.text("backbone_weights", None, "Set it to the AlexNet weights file "
                                         "(alexnet-owt-7be5be79.pth), or null to look in the usual places.",
                                         optional=True),
        "download": section.boolean("download", None),
        "strict": section.boolean("strict", None),
        "upsample_to": section.integer("upsample_to", None, 32, "Use null (native 32x32, as in the paper) or e.g. "
                                       "64.", optional=True),
        "batch_size": section.integer("batch_size", None, 1, "Use e.g. 500."),
        "device": section.choice("device", None, ("cpu", "cuda", "auto")),
        "cpu_threads": section.integer("cpu_threads", None, 1, "Use null (torch's setting) or e.g. 1.",
                                       optional=True),
    }


def weights_source(options: Mapping[str, Any]) -> lpips_weights.WeightsSource | None:
    """The source of the AlexNet weights for these options (proven where it must be); ``None``: no source has them."""
    return lpips_weights.resolve_weights(options["backbone_weights"], download=bool(options["download"]))


def perceptual_unavailable_reason(options: Mapping[str, Any]) -> str | None:
    """Why LPIPS cannot run (None: a source has proven weights). Bad options, a named file that is
    missing and a file that fails a proof check are errors, not reasons to skip."""
    if weights_source(options) is not None:
        return None
    return lpips_weights.missing_weights_reason(bool(options["download"]))


def perceptual_provenance(options: Mapping[str, Any]) -> dict[str, Any] | None:
    """Where the weights came from (source, path, sha256, proof) for the metric's status record."""
    source = weights_source(options)
    return None if source is None else source.as_dict()


def load_lpips_alexnet(weights_path: str | Any) -> lpips.LPIPS:
    """The real LPIPS metric: AlexNet with the ImageNet weights in ``weights_path`` plus lpips' v0.1 layers."""
    from pathlib import Path

    import torch

    try:
        state = torch.load(Path(weights_path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same advice
        raise MetricConfigError(
            f"Cannot read AlexNet weights from '{weights_path}' ({error}). It must be torchvision's "
            f"{lpips_weights.ALEXNET_WEIGHTS_FILENAME} or the file {lpips_weights.FIX_COMMAND} stores; fix "
            "score_metrics.perceptual.backbone_weights or the cached file."
        ) from error
    return lpips_with_backbone(state)


def resolve_device(name: str) -> torch.device:
    """The scoring device (the project's one device rule, ``training.runtime.resolve_device``)."""
    from best_minibatch.training.runtime import resolve_device as resolve

    try:
        return resolve(name)
    except ValueError as error:
        raise MetricConfigError(f"score_metrics.perceptual.device: {error}; use cpu or auto.") from error


def to_lpips_input(images: np.ndarray, upsample_to: int | None, device: torch.device) -> torch.Tensor:
    """uint8 (or float) NHWC in [0, 255] -> float32 NCHW in [-1, 1] (LPIPS's input range), optionally upsampled."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    x = x.permute(0, 3, 1, 2).to(torch.float32).div_(127.5).sub_(1.0)
    if upsample_to is not None and upsample_to != x.shape[-1]:
        x = F.interpolate(x, size=(upsample_to, upsample_to), mode="bilinear", align_corners=False)
    return x


def lpips_distances_to_reference(
    model: lpips.LPIPS,
    images: np.ndarray,
    reference: np.ndarray,
    *,
    batch_size: int = 500,
    upsample_to: int | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """LPIPS distance of every image (uint8 ``N x H x W x 3``) to one ``reference`` image (``H x W x 3``,
    0-255 floats)."""
    import torch

    target = resolve_device(device)
    model = model.to(target)
    reference_input = to_lpips_input(reference[None].astype(np.float32), upsample_to, target)
    distances = np.empty(len(images), dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = to_lpips_input(images[start:start + batch_size], upsample_to, target)
            # lpips broadcasts the single reference over the batch.
            distances[start:start + len(batch)] = model(batch, reference_input).flatten().double().cpu().numpy()
    return distances


def perceptual_score(images: np.ndarray, options: Mapping[str, Any]) -> pd.DataFrame:
    """LPIPS distance to the average image (pixel-wise mean over all scored images), computed in batches.

    ``options``: as :func:`perceptual_options` returns them (``scoring.metric_options``)."""
    batch_size, upsample_to, device = options["batch_size"], options["upsample_to"], options["device"]
    resolve_device(device)
    source = weights_source(options)
    if source is None:  # scoring was asked for although no source has the weights
        raise MetricConfigError(lpips_weights.missing_weights_reason(bool(options["download"])))
    model = load_lpips_alexnet(source.path)
    average_image = images.mean(axis=0, dtype=np.float64)
    started = time.perf_counter()
    from best_minibatch.training.runtime import cpu_threads

    with cpu_threads(options["cpu_threads"]):
        distances = lpips_distances_to_reference(
            model, images, average_image, batch_size=batch_size, upsample_to=upsample_to, device=device
        )
    logger.info("LPIPS (%s) scored %d images in %.1f s", source.describe(), len(images), time.perf_counter() - started)
    return pd.DataFrame({"score": distances})
