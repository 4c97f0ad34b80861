"""Benchmark: one torch training on the CPU in this process, in a Dask worker as the project starts them,
and in a Dask worker with Dask's default ``MALLOC_TRIM_THRESHOLD_=65536``, side by side in one run.

Why it exists: Dask's nannies set ``MALLOC_TRIM_THRESHOLD_`` in every worker
(``distributed.nanny.pre-spawn-environ``) so that freed memory goes back to the system.
Setting it at all switches off glibc's dynamic mmap threshold, so each large tensor a
training step allocates is mapped and unmapped afresh. ``best_minibatch.services.cluster`` starts
its workers without it (``WORKER_ENVIRON_UNSET``); this script shows what that is worth.

The work: ``--steps`` SGD steps of the project's small CNN (width 8, the base model) on a
batch of 100 random 32x32 images, one CPU thread, timed inside whichever process runs it
(worker start-up excluded), best of ``--rounds``.

    .venv/bin/python benchmarks/benchmark_worker_malloc.py [--steps 150] [--rounds 3]
    .venv/bin/python benchmarks/benchmark_worker_malloc.py --tiny   (every section in seconds; the suite runs it)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def train_steps(steps: int) -> tuple[float, str | None]:
    """Seconds for ``steps`` training steps in the calling process, and its MALLOC_TRIM_THRESHOLD_."""
    import torch

    from best_minibatch.training.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("small_cnn", width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    inputs, targets = torch.randn(100, 3, 32, 32), torch.randint(0, 10, (100,))
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return time.perf_counter() - started, os.environ.get("MALLOC_TRIM_THRESHOLD_")


def in_worker(steps: int, rounds: int, dask_default: bool) -> tuple[float, str | None]:
    """Best time of ``rounds`` runs of :func:`train_steps` in a one-worker cluster, and the worker's variable."""
    import dask
    from distributed import Client, LocalCluster

    from best_minibatch.services.cluster import WORKER_ENVIRON_UNSET, Cluster, ClusterConfig

    if dask_default:  # a plain LocalCluster with Dask's own setting (distributed.yaml), whatever the user's config
        with dask.config.set({key: 65536 for key in WORKER_ENVIRON_UNSET}), \
                LocalCluster(n_workers=1, threads_per_worker=1, processes=True) as cluster, Client(cluster) as client:
            times = [client.submit(train_steps, steps, pure=False).result() for _ in range(rounds)]
    else:  # as the project's runner starts its workers
        with Cluster(ClusterConfig.from_params({"local": {"n_workers": 1}})) as cluster:
            times = [cluster.client.submit(train_steps, steps, pure=False).result() for _ in range(rounds)]
    return min(t for t, _ in times), times[0][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="every section with tiny sizes, seconds long (the test "
                        "suite runs it: tests/test_benchmarks.py); its figures mean nothing")
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.rounds = 2, 1
    here = min(train_steps(args.steps)[0] for _ in range(args.rounds))
    project, project_env = in_worker(args.steps, args.rounds, dask_default=False)
    default, default_env = in_worker(args.steps, args.rounds, dask_default=True)
    print(f"{args.steps} small-CNN training steps on one CPU thread, best of {args.rounds}:")
    print(f"  this process                                      {here:6.2f} s   1.00x")
    print(f"  project's Dask worker (MALLOC_TRIM_THRESHOLD_={project_env})  {project:6.2f} s   "
          f"{project / here:.2f}x")
    print(f"  Dask's default worker (MALLOC_TRIM_THRESHOLD_={default_env}) {default:6.2f} s   "
          f"{default / here:.2f}x")


if __name__ == "__main__":
    main()
