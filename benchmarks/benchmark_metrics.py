"""Scoring speed of the metrics on all 50,000 CIFAR-10 training images, with the two targets side by side.

    .venv/bin/python benchmarks/benchmark_metrics.py [--threads 1] [--repeats 3]
        [--lpips-single-images 200] [--lpips-batch 500] [--upsample 0] [--weights PATH]
    .venv/bin/python benchmarks/benchmark_metrics.py --tiny   (every section on 500 sample images; the suite runs it)

Targets (this project's 2-core CPU machines):

1. intensity + colour + edges together score the 50,000 images in under 5 s;
2. LPIPS in batches is at least 50x faster (images/s) than the same model called
   one image at a time.

The cheap metrics run through :func:`best_minibatch.metrics.scoring.score_images`
with their default options, ``--repeats`` times each; the best and the median time
are printed (on a shared machine other processes steal the cores: the best run
is the closest to the metric's own cost, the median shows the contention). The
target is judged on the sum of the best times.

LPIPS runs with the real AlexNet ImageNet weights, found as the perceptual metric
finds them (``--weights``, torchvision's cache, or the file ``make weights`` stores;
the source and its sha256 are printed). The batched run scores all 50,000 images
against their average image, the one-at-a-time run the first
``--lpips-single-images`` with the same model, the same reference and the same
upsampling (its time for all 50,000 is extrapolated from its rate), both after a
warm-up, both with ``torch.set_num_threads(--threads)``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from best_minibatch.data.cifar import read_image_dataset
from best_minibatch.metrics import lpips_weights
from best_minibatch.metrics.perceptual import load_lpips_alexnet, lpips_distances_to_reference, weights_source
from best_minibatch.metrics.scoring import METRICS, score_images

SAMPLE_ZIP = Path(__file__).resolve().parents[1] / "data" / "01_raw" / "cifar10-sample.zip"
FULL_CIFAR_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.zip"
CHEAP_METRICS = ("intensity", "color", "edges")
CHEAP_TARGET_SECONDS = 5.0
LPIPS_TARGET_RATIO = 50.0


def timed(function, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zip", type=Path, default=FULL_CIFAR_ZIP)
    parser.add_argument("--threads", type=int, default=METRICS["perceptual"].defaults["cpu_threads"] or 2,
                        help="torch threads for LPIPS (default: the perceptual metric's cpu_threads)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lpips-single-images", type=int, default=200)
    parser.add_argument("--lpips-batch", type=int, default=500)
    parser.add_argument(
        "--upsample", type=int, default=METRICS["perceptual"].defaults["upsample_to"] or 0,
        help="LPIPS input side length; 0 = native 32x32 (the perceptual metric's default)",
    )
    parser.add_argument("--tiny", action="store_true", help="every section on 500 images of the embedded sample (the "
                        "test suite runs it: tests/test_benchmarks.py); its figures mean nothing")
    parser.add_argument("--weights", type=Path, default=None,
                        help="AlexNet ImageNet weights file (default: where the perceptual metric finds them)")
    args = parser.parse_args()
    if args.tiny:
        args.zip, args.repeats, args.lpips_single_images, args.lpips_batch = SAMPLE_ZIP, 1, 4, 50
    torch.set_num_threads(args.threads)
    source = weights_source({"backbone_weights": args.weights, "download": False})
    if source is None and not args.tiny:
        raise SystemExit(f"No AlexNet ImageNet weights for LPIPS: run {lpips_weights.FIX_COMMAND} first.")
    upsample = args.upsample or None

    started = time.perf_counter()
    dataset = read_image_dataset(args.zip)
    images = dataset.images["train"].numpy()[: 500 if args.tiny else None]
    ids = np.arange(len(images))
    n = len(images)
    print(f"decoded {n} training images of {args.zip.name} in {time.perf_counter() - started:.1f} s "
          f"(not part of any target); torch threads: {args.threads}")
    print()

    print(f"{'metric':<34}{'best s':>9}{'median s':>10}{'images/s (best)':>17}")
    best_total = 0.0
    median_total = 0.0
    for name in CHEAP_METRICS:
        seconds = timed(lambda: score_images(name, images, ids, {}), args.repeats)
        best, median = min(seconds), statistics.median(seconds)
        best_total += best
        median_total += median
        print(f"{name:<34}{best:>9.3f}{median:>10.3f}{n / best:>17,.0f}")
    seconds = timed(lambda: score_images("random", images, ids, {}), args.repeats)
    print(f"{'random':<34}{min(seconds):>9.3f}{statistics.median(seconds):>10.3f}{n / min(seconds):>17,.0f}")

    if source is None:  # --tiny only
        print(f"LPIPS: skipped (no AlexNet ImageNet weights; {lpips_weights.FIX_COMMAND} fetches them)")
        return
    model = load_lpips_alexnet(source.path)
    average = images.mean(axis=0, dtype=np.float64)
    lpips_distances_to_reference(model, images[:args.lpips_batch], average, batch_size=args.lpips_batch,
                                 upsample_to=upsample)
    started = time.perf_counter()
    batched = lpips_distances_to_reference(model, images, average, batch_size=args.lpips_batch, upsample_to=upsample)
    batched_seconds = time.perf_counter() - started

    single_images = images[: args.lpips_single_images]
    lpips_distances_to_reference(model, single_images[:5], average, batch_size=1, upsample_to=upsample)
    started = time.perf_counter()
    single = lpips_distances_to_reference(model, single_images, average, batch_size=1, upsample_to=upsample)
    single_seconds = time.perf_counter() - started
    agree = np.allclose(single, batched[: len(single)], rtol=0, atol=1e-6)

    side = upsample or images.shape[1]
    label = f"LPIPS {side}x{side}"
    batched_rate = n / batched_seconds
    single_rate = len(single) / single_seconds
    print(f"{label + f', batch {args.lpips_batch}':<34}{batched_seconds:>9.3f}{'-':>10}{batched_rate:>17,.0f}"
          f"   ({n} images)")
    print(f"{label + ', one at a time':<34}{single_seconds:>9.3f}{'-':>10}{single_rate:>17,.0f}"
          f"   ({len(single)} images; "
          f"{n / single_rate:,.0f} s for all {n}, extrapolated)")
    print(f"  weights: {source.describe()}")
    print(f"  batched and one-at-a-time distances agree on the shared images (1e-6): {agree}")
    print()

    ratio = batched_rate / single_rate
    print("targets")
    print(f"  intensity + color + edges, 50,000 images: {best_total:.2f} s best "
          f"({median_total:.2f} s median)   target < {CHEAP_TARGET_SECONDS:.0f} s: "
          f"{'MET' if best_total < CHEAP_TARGET_SECONDS else 'NOT MET'}")
    print(f"  LPIPS batched / one at a time: {batched_rate:,.0f} / {single_rate:,.0f} images/s = {ratio:.0f}x   "
          f"target >= {LPIPS_TARGET_RATIO:.0f}x: {'MET' if ratio >= LPIPS_TARGET_RATIO else 'NOT MET'}")


if __name__ == "__main__":
    main()
