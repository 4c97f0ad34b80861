"""Training throughput of the registered models on the CPU, side by side in one run.

Times the work one training step does (forward, backward, SGD step with
momentum 0.9 and weight decay 5e-4) and the work one ``net_compare`` probe does
(forward and backward in training mode, no step), on real CIFAR-10 images from
the embedded sample, batch 100 by default. Compares torch thread counts (2 and
1) and OpenMP wait policies (``OMP_WAIT_POLICY`` unset, i.e. the runtime's
spinning default, and ``PASSIVE``): on a machine whose cores other processes
share, spinning OpenMP threads can make two threads many times slower than one.
The policy is read when the OpenMP runtime starts, so each policy is measured in
its own child process. Prints images per second, each row's ratio to the first
row, and what the rates mean for the default run (orderings x epochs x images,
each trained once and probed once).

    .venv/bin/python benchmarks/benchmark_models.py
    .venv/bin/python benchmarks/benchmark_models.py --models small_cnn resnet18 --threads 2
    .venv/bin/python benchmarks/benchmark_models.py --tiny   (every section in seconds; the suite runs it)

Each figure is the best and the median of ``--repeats`` timed runs of
``--steps`` steps, after warm-up steps: the best run is the closest to the
model's own cost, the median shows the contention seen. The last column,
training images per CPU-second (process CPU time, best run), is hardly touched
by other processes: with one thread it is the rate of one dedicated core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from best_minibatch.data.cifar import read_image_dataset
from best_minibatch.data.images import to_model_input
from best_minibatch.training.models import build_model, count_parameters

SAMPLE_ZIP = Path(__file__).resolve().parents[1] / "data" / "01_raw" / "cifar10-sample.zip"
DEFAULT_POLICY = "default"


def real_batches(batch: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    dataset = read_image_dataset(SAMPLE_ZIP)
    rows = dataset.index[dataset.index["split"] == "train"].sort_values("row")
    images = to_model_input(dataset.images["train"][torch.tensor(rows["row"].to_numpy())])
    labels = torch.tensor(rows["label"].to_numpy())
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return [
        (images[order[k * batch : (k + 1) * batch]], labels[order[k * batch : (k + 1) * batch]])
        for k in range(count)
    ]


def images_per_second(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    update: bool,
    steps: int,
    repeats: int,
) -> tuple[float, float, float]:
    """Best and median images per wall-clock second, and best per CPU-second, over ``repeats`` runs."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()

    def step(k: int) -> None:
        inputs, targets = batches[k % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(inputs), targets).backward()
        if update:
            optimizer.step()

    for k in range(3):
        step(k)
    images = steps * len(batches[0][1])
    rates, cpu_rates = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        for k in range(steps):
            step(k)
        rates.append(images / (time.perf_counter() - start))
        cpu_rates.append(images / (time.process_time() - cpu_start))
    return max(rates), statistics.median(rates), max(cpu_rates)


def measure(args: argparse.Namespace, policy: str) -> None:
    """Child process: one JSON line per (model, threads)."""
    torch.manual_seed(0)
    batches = real_batches(args.batch, 20)
    for spec in args.models:
        name, _, option_text = spec.partition(":")
        options = {k: int(v) for k, v in (kv.split("=") for kv in option_text.split(",") if kv)}
        steps = args.steps if name == "small_cnn" else max(2, args.steps // 10)
        for threads in args.threads:
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            model = build_model(name, **options)
            train = images_per_second(model, batches, update=True, steps=steps, repeats=args.repeats)
            probe = images_per_second(model, batches, update=False, steps=steps, repeats=args.repeats)
            row = {
                "model": spec,
                "policy": policy,
                "threads": threads,
                "parameters": count_parameters(model),
                "train": train,
                "probe": probe,
            }
            print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small_cnn", "small_cnn:width=32"])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--wait-policies", nargs="+", default=[DEFAULT_POLICY, "PASSIVE"])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed run (other models: 1/10)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--orderings", type=int, default=4, help="for the default-run estimate")
    parser.add_argument("--epochs", type=int, default=9, help="for the default-run estimate")
    parser.add_argument("--images", type=int, default=5000, help="for the default-run estimate")
    parser.add_argument("--tiny", action="store_true", help="every section with tiny sizes, seconds long (the test "
                        "suite runs it: tests/test_benchmarks.py); its figures mean nothing")
    parser.add_argument("--child-policy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.models, args.threads, args.steps, args.repeats, args.batch = ["small_cnn"], [1], 1, 1, 10
    if args.child_policy:
        measure(args, args.child_policy)
        return

    print(f"torch {torch.__version__}, batch {args.batch}, real CIFAR-10 images, {os.cpu_count()} CPUs")
    print("img/s as best / median of the timed runs; ratio of best training rates to the first row")
    header = f"{'model':<20}{'OMP_WAIT_POLICY':>16}{'threads':>8}{'parameters':>12}"
    print(header + f"{'train img/s':>17}{'probe img/s':>17}{'ratio':>7}{'train img/CPU-s':>17}  default run")
    passes = args.orderings * args.epochs * args.images
    reference = None
    for policy in args.wait_policies:
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        if policy != DEFAULT_POLICY:
            env["OMP_WAIT_POLICY"] = policy
        command = [sys.executable, __file__, *sys.argv[1:], "--child-policy", policy]
        with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) as child:
            assert child.stdout is not None
            for line in child.stdout:
                row = json.loads(line)
                train, probe = row["train"], row["probe"]
                reference = reference or train[0]
                estimate = ""
                if row["model"] == "small_cnn":
                    seconds = passes / train[0] + passes / probe[0]
                    estimate = f"{seconds:.0f} s"
                print(
                    f"{row['model']:<20}{row['policy']:>16}{row['threads']:>8}{row['parameters']:>12,}"
                    f"{f'{train[0]:,.0f} / {train[1]:,.0f}':>17}{f'{probe[0]:,.0f} / {probe[1]:,.0f}':>17}"
                    f"{train[0] / reference:>7.2f}{train[2]:>17,.0f}  {estimate}"
                )
        if child.returncode:
            sys.exit(f"measuring with OMP_WAIT_POLICY={policy} failed (exit {child.returncode})")
    print(
        f"default run: {args.orderings} orderings x {args.epochs} epochs x {args.images:,} images, "
        "each trained and probed, model compute at the best rates (small_cnn rows)"
    )


if __name__ == "__main__":
    main()
