"""Time one plain and one probed batch_selection epoch at the `full` environment's geometry, to size the run.

The `full` batch_selection experiment (conf/full/parameters_batch_selection.yml) trains every
(seed, policy) on the 50,000 CIFAR-10 training images minus the stratified validation split,
in batches of 256, with the full environment's model. This script reads that configuration
(`kedro`'s merged parameters of `--env full`), reads the real images, and trains through the
experiment's own code (`selection.train_with_policy`, the shared loop) for one epoch:

* a plain epoch: the `shuffle` policy (every policy but the oracle costs the same per step);
* a probed epoch: the `oracle` policy (the probe of every candidate batch at the epoch start, then
  the same steps).

It prints, per epoch, the loop's clock (training steps plus probing: the seconds the experiment
reports) and the wall-clock of the evaluations on the validation split, then the whole
experiment's estimate: seeds x (plain policies x epochs x plain epoch + oracle epochs x probed
epoch + evaluations), divided by the workers that run tasks side by side.

Run:  PYTHONPATH=$PWD/src .venv/bin/python scripts/selection_timing.py [--threads 1] [--workers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "src"))

import torch  # noqa: E402

from best_minibatch import selection  # noqa: E402
from best_minibatch.data.cifar import read_image_dataset  # noqa: E402
from best_minibatch.training.recipe import training_environment  # noqa: E402


def full_parameters() -> dict:
    """The merged parameters of `kedro run --env full` in this checkout (nothing runs)."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
    bootstrap_project(PROJECT_ROOT)
    with KedroSession.create(project_path=PROJECT_ROOT, env="full") as session:
        return session.load_context().params


def one_epoch(policy_name: str, config: selection.SelectionConfig, data: selection.ImageData,
              labels, num_classes: int) -> dict:
    """One epoch of ``policy_name`` through the experiment's own training function."""
    recipe = dataclasses.replace(config.recipe, phases=((1, config.recipe.phases[0][1]),), progress_bar=False)
    with training_environment(recipe):
        torch.manual_seed(0)
        model = recipe.model_factory(num_classes)()
        policy = selection.build_policy(policy_name, config, 0, data.train_ids, None, labels=labels)
        started = time.perf_counter()
        _, result = selection.train_with_policy(policy, model, data, recipe, 0)
        wall = time.perf_counter() - started
    evaluations = 1 + recipe.evaluations_per_epoch  # before the first step, then per epoch
    return {"policy": policy_name, "steps": result["steps"], "probe_passes": result["probe_passes"],
            "epoch_seconds": round(result["seconds"], 2), "probe_seconds": round(result["probe_seconds"], 2),
            "evaluation_seconds": round((wall - result["seconds"]) / evaluations, 2),
            "parameters": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: batch_selection's recipe in --env full)")
    parser.add_argument("--workers", type=int, default=2, help="runs side by side (Dask local workers)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()

    params = full_parameters()
    config = selection.SelectionConfig.from_params(params["batch_selection"], params["training"],
                                                   params["sort_batches"]["batch_size"])
    if args.threads is not None:
        config = dataclasses.replace(config, recipe=dataclasses.replace(config.recipe, cpu_threads=args.threads))
    source = PROJECT_ROOT / params["ingest_cifar"]["source"]["path"]
    started = time.perf_counter()
    dataset = read_image_dataset(source)
    split = selection.stratified_validation_split(dataset.index, config.validation_fraction, config.validation_seed)
    data = selection.ImageData.from_tables(dataset.index, split, dataset.images["train"], dataset.images["test"])
    labels = data.labels[data.rows(data.train_ids)].numpy()
    num_classes = int(dataset.index["label"].nunique())
    k = len(data.train_ids) // config.batch_size
    print(f"read {source} in {time.perf_counter() - started:.1f} s: {len(data.train_ids):,} training, "
          f"{len(data.validation_ids):,} validation images; {k} steps of {config.batch_size} per epoch; "
          f"{config.recipe.model} {dict(config.recipe.model_options)}, {config.recipe.cpu_threads} thread(s)",
          flush=True)
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    rows = [one_epoch("shuffle", config, data, labels, num_classes), one_epoch("oracle", config, data, labels,
                                                                               num_classes)]
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[:3]
    for row in rows:
        print(f"{row['policy']:8s}: {row['steps']} steps + {row['probe_passes']} probe passes in "
              f"{row['epoch_seconds']:.1f} s (probing {row['probe_seconds']:.1f} s); one evaluation of the "
              f"validation split {row['evaluation_seconds']:.1f} s", flush=True)
    plain, probed = rows
    epochs = config.recipe.num_epochs
    evaluations = 1 + epochs * config.recipe.evaluations_per_epoch
    plain_policies = [p for p in config.policies if p != "oracle"]
    per_seed = (len(plain_policies) * (epochs * plain["epoch_seconds"] + evaluations * plain["evaluation_seconds"])
                + ("oracle" in config.policies) * (epochs * probed["epoch_seconds"]
                                                   + evaluations * probed["evaluation_seconds"]))
    hours = per_seed * len(config.seeds) / args.workers / 3600
    print(f"estimate: {len(config.seeds)} seeds x ({len(plain_policies)} plain policies x {epochs} epochs x "
          f"{plain['epoch_seconds']:.1f} s + oracle {epochs} x {probed['epoch_seconds']:.1f} s + {evaluations} "
          f"evaluations per run) / {args.workers} workers = {hours:.2f} h of training "
          f"(load average before {' '.join(load_before)}, after {' '.join(load_after)})")
    if args.json:
        args.json.write_text(json.dumps({
            "torch": torch.__version__, "threads": config.recipe.cpu_threads, "workers": args.workers,
            "steps_per_epoch": k, "batch_size": config.batch_size, "seeds": len(config.seeds),
            "policies": list(config.policies), "epochs": epochs, "evaluations_per_run": evaluations,
            "load_average_before": load_before, "load_average_after": load_after,
            "epochs_measured": rows, "estimated_hours": round(hours, 2)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
