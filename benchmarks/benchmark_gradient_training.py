"""Benchmark: a plain training epoch against a gradient_training epoch, side by side, on the CPU.

Same model (the base configuration's small CNN), same real images (the embedded
CIFAR-10 sample: 5,000 training images in 50 fixed batches of 100, as sort_batches
makes them in the base environment), same thread count, in one process. Plain and
probed runs alternate (several rounds) so that load from other processes hits both
alike; one-off costs (first epoch) are not counted. CPU seconds (process_time, one
thread) are the robust figure on a shared machine; wall seconds are printed too.
Neither side evaluates on the test split (that cost is the same for both).

Prints:
* seconds per epoch, plain and with the gradient probe, and their ratio (the compare
  pass adds one forward and backward per batch, but no optimizer step and no data
  preparation, so the ratio is about 2.0 or below when forward/backward dominate; the
  issue's target is at most 2.15);
* peak resident memory of one probed epoch in a fresh process, for 10 and 50 batches
  with the in-memory buffer and for 50 batches with scratch files, on a wider small CNN
  (width 32) so that the buffer is large enough to see;
* spill throughput: kept gradients written as the catalog writes them (one atomically
  written, fsync'ed .pt file per batch).

Run:  .venv/bin/python benchmarks/benchmark_gradient_training.py [--rounds 3] [--threads 1]
      .venv/bin/python benchmarks/benchmark_gradient_training.py --tiny   (every section in seconds; the suite runs it)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "src"))

from best_minibatch.data.cifar import read_image_dataset  # noqa: E402
from best_minibatch.gradient_training import (  # noqa: E402
    GradientProbeRun,
    TrainingConfig,
    TrainingData,
    named_model_factory,
)

SAMPLE_ZIP = PROJECT_ROOT / "data" / "01_raw" / "cifar10-sample.zip"
BATCH_SIZE = 100


def base_model_params() -> dict:
    """The model the base environment trains (the shared recipe, conf/base/parameters.yml)."""
    conf = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters.yml").read_text())
    return conf["training"]["model"]


def load_data(num_batches: int) -> TrainingData:
    dataset = read_image_dataset(SAMPLE_ZIP)
    train = dataset.index[dataset.index["split"] == "train"].sort_values("row")
    images = dataset.images["train"]
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    return TrainingData(images, torch.tensor(train["label"].to_numpy()),
                        order[: num_batches * BATCH_SIZE].view(num_batches, BATCH_SIZE))


def config(threads: int, epochs: int, model: dict | None = None, **extra) -> TrainingConfig:
    """The benchmark's configuration; ``model`` replaces the base model (it belongs to the shared recipe, ``training``)."""
    return TrainingConfig.from_params({
        "training": {"model": model or base_model_params(), "phases": [{"epochs": epochs, "lr": 0.05}],
                     "device": "cpu", "cpu_threads": threads, "progress_bar": False},
        "checkpoint_dir": None, "keep_gradients": "none", "disk_cap_gb": 10, **extra,
    })


def epoch_seconds(cfg: TrainingConfig, data: TrainingData, probe: bool, on_write=None) -> list[float]:
    """Each epoch's seconds; ``on_write(run)`` may wrap the run's gradient writer (``run.gradients.write``)."""
    run = GradientProbeRun(cfg, data, named_model_factory(cfg), "benchmark", probe=probe)
    if on_write is not None:
        on_write(run)
    run.run()
    return run.results.history["seconds"].tolist()


def peak_memory_child(data_path: str, num_batches: int, memory_cap_gb: float, threads: int, width: int) -> None:
    """In a fresh process: one probed epoch; print the peak RSS before and after it (JSON)."""
    saved = torch.load(data_path, weights_only=True)
    data = TrainingData(saved["train_images"], saved["train_labels"], saved["batches"][:num_batches])
    cfg = config(threads, 1, model={"name": "small_cnn", "small_cnn": {"width": width}},
                 gradient_buffer={"memory_cap_gb": memory_cap_gb,
                                  "scratch_dir": tempfile.mkdtemp(prefix="bench-scratch-")})
    before = peak_rss_mib()
    epoch_seconds(cfg, data, probe=True)
    print(json.dumps({"before_mib": before, "after_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(data_path: Path, num_batches: int, memory_cap_gb: float, threads: int, width: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(data_path), str(num_batches), str(memory_cap_gb),
         "--threads", str(threads), "--memory-width", str(width)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating plain/probed rounds")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per round (the first is a warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the base configuration uses 1)")
    parser.add_argument("--memory-width", type=int, default=32,
                        help="small_cnn width for the memory measurement (32: 245k parameters, a visible buffer)")
    parser.add_argument("--batches", type=int, default=50, help="fixed batches of 100 images (base: 50)")
    parser.add_argument("--tiny", action="store_true", help="every section with tiny sizes, seconds long (the test "
                        "suite runs it: tests/test_benchmarks.py); its figures mean nothing")
    parser.add_argument("--memory-child", nargs=3, metavar=("DATA", "BATCHES", "CAP_GB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.rounds, args.epochs, args.batches, args.memory_width = 1, 2, 5, 8
    if args.memory_child:
        peak_memory_child(args.memory_child[0], int(args.memory_child[1]), float(args.memory_child[2]),
                          args.threads, args.memory_width)
        return

    data = load_data(args.batches)
    cfg = config(args.threads, args.epochs)
    probe_model = named_model_factory(cfg)()
    num_params = sum(p.numel() for p in probe_model.parameters())
    print(f"model {cfg.model} {dict(cfg.recipe.model_options)}: {num_params:,} parameters; {data.num_batches} batches of "
          f"{data.batch_size} real CIFAR-10 images; CPU, {args.threads} thread(s); torch {torch.__version__}")

    # Wall-clock seconds per epoch come from the run's history; CPU seconds per epoch are the
    # difference between a run of `epochs` epochs and a run of one (which removes the one-off
    # costs), measured with process_time so that other processes' load does not count.
    timings = {False: {"wall": [], "cpu": []}, True: {"wall": [], "cpu": []}}
    for round_ in range(args.rounds):
        for probe in (False, True):
            started = time.process_time()
            epoch_seconds(config(args.threads, 1), data, probe)
            one = time.process_time() - started
            started = time.process_time()
            walls = epoch_seconds(cfg, data, probe)
            many = time.process_time() - started
            timings[probe]["wall"] += walls[1:]
            timings[probe]["cpu"].append((many - one) / (args.epochs - 1))
        print(f"  round {round_ + 1}: plain {timings[False]['cpu'][-1]:.3f} CPU-s/epoch, gradient_training "
              f"{timings[True]['cpu'][-1]:.3f} CPU-s/epoch")
    images = data.num_batches * data.batch_size
    for kind in ("cpu", "wall"):
        plain_s, probed_s = (statistics.median(timings[p][kind]) for p in (False, True))
        unit = "CPU seconds" if kind == "cpu" else "wall seconds"
        print(f"plain training epoch:    median {plain_s:.3f} {unit} ({images / plain_s:,.0f} images/s)")
        print(f"gradient_training epoch: median {probed_s:.3f} {unit} ({images / probed_s:,.0f} images/s)")
        print(f"ratio gradient_training / plain ({unit}): {probed_s / plain_s:.3f}   (target <= 2.15)")

    # Spill throughput: every gradient of one run kept in float32, written by the run's one writer.
    with tempfile.TemporaryDirectory(prefix="bench-spill-") as folder:
        written = {"bytes": 0, "seconds": 0.0}

        def timed_writer(run):
            write = run.gradients.write

            def timed(epoch, batch, gradient):
                started = time.perf_counter()
                checksum = write(epoch, batch, gradient)
                written["seconds"] += time.perf_counter() - started
                written["bytes"] += gradient.numel() * gradient.element_size()
                return checksum

            run.gradients.write = timed

        spill_cfg = config(args.threads, 2, keep_gradients="all", spill_dtype="float32", gradients_dir=folder)
        epoch_seconds(spill_cfg, data, probe=True, on_write=timed_writer)
        print(f"spill: {written['bytes'] / 2**20:.1f} MiB in {written['seconds']:.3f} s of writes = "
              f"{written['bytes'] / 2**20 / written['seconds']:.1f} MiB/s ({2 * data.num_batches} files of "
              f"{num_params * 4 / 1024:.1f} KiB, each written to a temporary name, fsync'ed and renamed)")

    width = args.memory_width
    wide_params = sum(p.numel() for p in named_model_factory(config(1, 1, model={"name": "small_cnn",
                                                                               "small_cnn": {"width": width}}))().parameters())
    print(f"peak resident memory of one probed epoch, small_cnn width {width} ({wide_params:,} parameters), "
          "each in a fresh process (peak RSS before -> after the epoch):")
    with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:
        data_path = Path(folder) / "data.pt"
        torch.save({"train_images": data.train_images, "train_labels": data.train_labels, "batches": data.batches},
                   data_path)
        few, many = max(1, args.batches // 5), args.batches
        for batches, cap, label in ((few, 1.0, "in-memory buffer"), (many, 1.0, "in-memory buffer"),
                                    (many, 0.0, "scratch-file buffer")):
            measured = peak_memory(data_path, batches, cap, args.threads, width)
            held = batches * wide_params * 4 / 2**20 if cap else 0.0
            print(f"  {batches:3d} batches, {label:20s}: {measured['before_mib']:7.1f} -> "
                  f"{measured['after_mib']:7.1f} MiB (+{measured['after_mib'] - measured['before_mib']:.1f}; "
                  f"the buffer holds {held:.1f} MiB)")


if __name__ == "__main__":
    main()
