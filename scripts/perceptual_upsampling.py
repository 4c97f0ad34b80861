"""How the perceptual ordering changes when the 32x32 images are upsampled before LPIPS.

    .venv/bin/python scripts/perceptual_upsampling.py [--sizes 64 224] [--zip data/01_raw/cifar10-sample.zip]

Scores every training image of the embedded sample with the perceptual metric
(LPIPS, AlexNet v0.1, distance to the average image) at native 32x32 and with
``score_metrics.perceptual.upsample_to`` set to each size, through the metric
itself (:func:`best_minibatch.metrics.scoring.score_images`), and prints per size:
Spearman's rank correlation of the scores with the native ones, the share of
images that stay in (or out of) the upper quartile the paper's first claim is
about, and the scoring time. docs/adding_a_metric.md quotes its output.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from best_minibatch.data.cifar import read_image_dataset
from best_minibatch.metrics import lpips_weights
from best_minibatch.metrics.perceptual import weights_source
from best_minibatch.metrics.scoring import score_images

SAMPLE_ZIP = Path(__file__).resolve().parents[1] / "data" / "01_raw" / "cifar10-sample.zip"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zip", type=Path, default=SAMPLE_ZIP)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = weights_source({"backbone_weights": None, "download": False})
    if source is None:
        raise SystemExit(f"No AlexNet ImageNet weights for LPIPS: run {lpips_weights.FIX_COMMAND} first.")
    images = read_image_dataset(args.zip).images["train"].numpy()
    ids = np.arange(len(images))

    def scores(size: int | None) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        table, status = score_images("perceptual", images, ids, {"perceptual": {"upsample_to": size}})
        assert status["status"] == "ok", status
        return table["score"].to_numpy(), time.perf_counter() - started

    native, native_seconds = scores(None)
    upper = native > np.quantile(native, 0.75)
    print(f"{len(images)} training images of {args.zip.name}; {source.describe()}")
    print(f"torch threads: {args.threads}")
    print(f"{'upsample_to':>12}{'Spearman vs 32x32':>20}{'same upper-quartile membership':>33}{'seconds':>10}")
    print(f"{'32 (native)':>12}{1.0:>20.3f}{1.0:>33.3f}{native_seconds:>10.1f}")
    for size in args.sizes:
        values, seconds = scores(size)
        rho = stats.spearmanr(native, values).statistic
        same = np.mean((values > np.quantile(values, 0.75)) == upper)
        print(f"{size:>12}{rho:>20.3f}{same:>33.3f}{seconds:>10.1f}")


if __name__ == "__main__":
    main()
