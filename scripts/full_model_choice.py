"""Which model can the `full` environment train on this machine? Measured, not guessed.

The `full` environment (conf/full) runs all of CIFAR-10 at the paper's batch geometry: 50,000
training images in 195 fixed batches of 256, the 10,000 test images evaluated after every epoch,
five orderings x three seeds x (three phases x 5 epochs), with the same-parameter null. Its
model is the largest candidate whose whole run fits the time budget (about two hours).

For each candidate this script times real gradient_training epochs on the real images: net_normal's
training pass, net_compare's probe of all 195 batches at the epoch-start parameters, the R null
batches and the test evaluation, exactly as the run does them (GradientProbeRun), gradients not spilled.
The first epoch is a warm-up; the second is the measurement. It then prints the whole run's
estimate: epochs x seeds x orderings x seconds per epoch, plus the stages before and after training
(`--fixed-minutes`, measured separately from a run's log).

Run:  .venv/bin/python scripts/full_model_choice.py [--widths 8 12 16 24] [--threads 1 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "src"))

from best_minibatch.data.cifar import read_image_dataset  # noqa: E402
from best_minibatch.gradient_training import (  # noqa: E402
    GradientProbeRun,
    TrainingConfig,
    TrainingData,
    named_model_factory,
)

FULL_ZIP = PROJECT_ROOT.parent / "shared" / "data" / "cifar10-jpeg.zip"
BATCH_SIZE = 256


def load_full(path: Path) -> tuple[TrainingData, int]:
    started = time.perf_counter()
    dataset = read_image_dataset(path)
    index = dataset.index
    train = index[index["split"] == "train"].sort_values("row")
    test = index[index["split"] == "test"].sort_values("row")
    images = dataset.images["train"]
    num_batches = images.shape[0] // BATCH_SIZE
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    data = TrainingData(images, torch.tensor(train["label"].to_numpy()),
                        order[: num_batches * BATCH_SIZE].view(num_batches, BATCH_SIZE),
                        dataset.images["test"], torch.tensor(test["label"].to_numpy()))
    print(f"read {images.shape[0]:,} training and {dataset.images['test'].shape[0]:,} test images from {path} "
          f"in {time.perf_counter() - started:.1f} s: {num_batches} batches of {BATCH_SIZE}")
    return data, num_batches


def epoch_seconds(width: int, threads: int, null_batches: int, data: TrainingData) -> tuple[float, int]:
    config = TrainingConfig.from_params({
        "training": {"model": {"name": "small_cnn", "small_cnn": {"width": width}},
                     "phases": [{"epochs": 2, "lr": 0.1}], "device": "cpu", "cpu_threads": threads,
                     "progress_bar": False, "eval_batch_size": 1000},
        "checkpoint_dir": None, "keep_gradients": "none", "disk_cap_gb": 10, "null_batches": null_batches,
        "gradient_buffer": {"memory_cap_gb": 4.0},
    })
    run = GradientProbeRun(config, data, named_model_factory(config), "timing")
    run.run()
    seconds = run.results.history["seconds"].tolist()
    return seconds[-1], run.num_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=FULL_ZIP)
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 12, 16, 24])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--null-batches", type=int, default=10)
    parser.add_argument("--orderings", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--fixed-minutes", type=float, default=0.0,
                        help="minutes of the stages around training (ingest, scoring, analysis, figures)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()

    data, num_batches = load_full(args.source)
    runs = args.orderings * args.seeds
    rows = []
    for threads in args.threads:
        for width in args.widths:
            seconds, params = epoch_seconds(width, threads, args.null_batches, data)
            hours = (seconds * args.epochs * runs + args.fixed_minutes * 60) / 3600
            rows.append({"width": width, "parameters": params, "threads": threads, "epoch_seconds": round(seconds, 2),
                         "estimated_hours": round(hours, 2)})
            print(f"small_cnn width {width:3d} ({params:>9,} parameters), {threads} thread(s): "
                  f"{seconds:6.1f} s per probed epoch (train + probe of {num_batches} batches + {args.null_batches} null "
                  f"batches + test evaluation) -> {args.epochs} epochs x {runs} runs"
                  f"{f' + {args.fixed_minutes:g} min' if args.fixed_minutes else ''} = {hours:.2f} h", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "batches": num_batches, "batch_size": BATCH_SIZE,
                                         "null_batches": args.null_batches, "runs": runs, "epochs": args.epochs,
                                         "fixed_minutes": args.fixed_minutes, "candidates": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
