"""`make gpu-check`: what this project's GPU work costs on the machine at hand, in one JSON file.

Steps (each one's failure is recorded in the JSON under its name, and the next step runs):

1. ``device``: the accelerator, torch/CUDA/cuDNN versions and the float32 math settings.
2. ``throughput``: forward+backward images/s of the model at the paper's batch (256), in
   float32 and in bf16 autocast, each in torch's default (NCHW-contiguous) layout and in
   channels-last; the faster layout per dtype is named. Inputs are real CIFAR-10 images
   already on the device, so data loading is not counted; no optimizer step.
3. ``probe_ratio``: seconds of one epoch of 20 batches with the gradient probe (net_compare's
   extra forward/backward per batch, the in-memory gradient buffer, the exact distances)
   against plain training of the same batches, both through the project's training engine
   (``GradientProbeRun``) with the ``paper`` environment's settings; the first epoch of each
   (cuDNN autotuning) is not counted.
   The same epochs with the batched probe (``training.probe_chunk: auto``) give
   ``batched_ratio``; ``probe_pass`` times the probe pass alone (K gradients at one set of
   parameters into the epoch's buffer), one batch at a time vs batched, in images/s.
4. ``probe_memory``: peak GPU memory of that probed run (model, probe copy, momentum,
   activations and the epoch's float32 gradients kept on the GPU), and the same arithmetic
   for the paper's 195 batches.
5. ``paper_run``: two epochs of the ``paper`` environment's gradient_training parameters
   (conf/paper over conf/base, merged key by key as Kedro's soft merge does) on 5,000 real
   training images (the embedded sample) in batches of the paper's size, evaluated on the
   sample's 1,000 test images, checkpoints and scratch files in a temporary folder.
   ``paper_run_dask`` (when more than one GPU is present, or with ``--cluster``): the same run
   once per GPU at the same time on the ``cuda`` Dask cluster of conf/base/dask.yml (dask-cuda,
   one worker per GPU, each training a task asking for ``GPU: 1``, as the project's Dask runner
   hands out its trainings); each training's seconds and the whole wall-clock. ``--cluster
   local`` runs it on two CPU worker processes (the test suite does).
6. ``time_estimate``: the paper's full run (150 epochs x 50,000 images, one training and one
   probe pass each) from the measured figures.

On a machine without CUDA (or with ``--device cpu``) the same steps run on the CPU with the
base environment's tiny model (small_cnn) and smaller batches, and the JSON says so
(``mode: cpu``); the test suite runs it that way. Kedro is not imported: this runs on a bare
GPU machine with torch, torchvision, numpy, pandas, PyYAML and OpenCV.

    PYTHONPATH=src python scripts/gpu_check.py --out data/08_reporting/gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Last, so that PYTHONPATH (or an installed copy) decides which best_minibatch is measured.
if str(PROJECT_ROOT / "src") not in sys.path:
    sys.path.append(str(PROJECT_ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

import best_minibatch  # noqa: E402,F401  (sets OMP_WAIT_POLICY before torch is imported)
from best_minibatch.config import deep_merge  # noqa: E402
from best_minibatch.data.cifar import read_image_dataset  # noqa: E402
from best_minibatch.data.images import to_model_input  # noqa: E402
from best_minibatch.data.tensor_io import GIB, write_text_atomically  # noqa: E402
from best_minibatch.gradient_training import (  # noqa: E402
    SPILL_DTYPES,
    GradientProbeRun,
    TrainingConfig,
    TrainingData,
    named_model_factory,
)
from best_minibatch.training.algorithm1 import GradientProbe  # noqa: E402
from best_minibatch.training.models import build_model  # noqa: E402
from best_minibatch.training.probing import EpochGradients  # noqa: E402

SAMPLE_ZIP = PROJECT_ROOT / "data" / "01_raw" / "cifar10-sample.zip"
CONF_DIR = PROJECT_ROOT / "conf"
DEFAULT_OUT = PROJECT_ROOT / "data" / "08_reporting" / "gpu_check.json"

# The paper's full run, for the time estimate (docs/paper_setup.md): 150 epochs of all of
# CIFAR-10 (195 batches of 256 = 49,920 images) per ordering, five orderings.
PAPER_EPOCHS = 150
PAPER_TRAIN_IMAGES = 50_000
PAPER_BATCHES = 195
PAPER_ORDERINGS = 5
# What docs/paper_setup.md assumed before any GPU had run the project.
ASSUMED_IMAGES_PER_S = 1_000.0


class GpuCheckError(ValueError):
    """Bad input (a path or a configuration); the message names the problem and the fix."""


# --------------------------------------------------------------------------- sizes per mode


def sizes_for(mode: str) -> dict[str, Any]:
    """How big each step is: the paper's sizes on CUDA, small ones for the CPU (the test suite)."""
    if mode == "cuda":
        return {"throughput_batch": 256, "throughput_warmup": 5, "throughput_steps": 10, "throughput_repeats": 3,
                "ratio_batches": 20, "ratio_epochs": 3, "paper_subset": 5000, "paper_epochs": 2}
    return {"throughput_batch": 64, "throughput_warmup": 2, "throughput_steps": 4, "throughput_repeats": 3,
            "ratio_batches": 20, "ratio_batch": 32, "ratio_epochs": 3, "paper_subset": 1000,
            "paper_batch": 64, "paper_epochs": 2}


# --------------------------------------------------------------------------- configuration


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise GpuCheckError(f"Configuration file not found: '{path}'. Run from a complete checkout of the "
                            "project (conf/base and conf/paper), or pass --conf-dir.")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise GpuCheckError(f"'{path}' is not valid YAML ({error}). Fix the file.") from error
    return loaded or {}


@dataclass(frozen=True)
class PaperParameters:
    """The ``paper`` environment's parameters this check uses, conf/paper over conf/base.

    Two layouts are read. In the current one, the SGD recipe (model, phases, augmentation,
    device, ...) is its own section ``training`` in parameters.yml and ``gradient_training``
    holds only the probe's run settings (with optional ``training`` overrides); in the layout
    before it (commit 38467b9, where the H200 figures in docs/results were measured) the recipe
    keys sat inside ``gradient_training`` and ``training`` is ``None``.
    """

    gradient_training: dict[str, Any]
    training: dict[str, Any] | None
    batch_size: int
    base_model: dict[str, Any]

    @property
    def recipe(self) -> dict[str, Any]:
        """The recipe keys as the paper run sees them (before this check's overrides)."""
        if self.training is None:
            return self.gradient_training
        return deep_merge(self.training, self.gradient_training.get("training") or {})

    def config(self, recipe_overrides: Mapping[str, Any], run_overrides: Mapping[str, Any]) -> TrainingConfig:
        """A TrainingConfig of these parameters with this check's overrides (recipe and run keys apart)."""
        if self.training is None:
            return TrainingConfig.from_params(deep_merge(self.gradient_training, {**recipe_overrides, **run_overrides}))
        run = deep_merge(self.gradient_training, {**run_overrides, "training": dict(recipe_overrides)})
        return TrainingConfig.from_params(run, self.training)


def recipe_of(config: TrainingConfig) -> Any:
    """The object holding the recipe's fields (model, model_options, augment, ...) in either layout."""
    return getattr(config, "recipe", config)


def _merged_section(conf_dir: Path, filename: str, section: str) -> dict[str, Any] | None:
    base = _read_yaml(conf_dir / "base" / filename)
    paper_path = conf_dir / "paper" / filename
    paper = _read_yaml(paper_path) if paper_path.exists() else {}
    if section not in base and section not in paper:
        return None
    return deep_merge(base.get(section) or {}, paper.get(section) or {})


def paper_parameters(conf_dir: Path, scratch: Path) -> PaperParameters:
    """Read the ``paper`` environment's gradient_training, training and sort_batches parameters.

    Runtime interpolations (``${runtime_params:...}``) are replaced by folders under
    ``scratch``, so nothing is written into the project.
    """
    params = _merged_section(conf_dir, "parameters_gradient_training.yml", "gradient_training") or {}
    for key, value in list(params.items()):
        if isinstance(value, str) and "${" in value:
            params[key] = str(scratch / key)
    training = _merged_section(conf_dir, "parameters.yml", "training")
    base_recipe = (_read_yaml(conf_dir / "base" / "parameters.yml").get("training") if training is not None
                   else _read_yaml(conf_dir / "base" / "parameters_gradient_training.yml").get("gradient_training"))
    base_model = (base_recipe or {}).get("model")
    if not isinstance(base_model, Mapping) or "name" not in base_model:
        raise GpuCheckError(f"No model found in conf/base ({'training' if training is not None else 'gradient_training'}"
                            ".model); the CPU check trains the base environment's model. Restore conf/base.")
    batch_size = (_merged_section(conf_dir, "parameters_sort_batches.yml", "sort_batches") or {}).get("batch_size")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise GpuCheckError(f"sort_batches.batch_size must be a positive integer in conf/base or conf/paper, "
                            f"got {batch_size!r}.")
    return PaperParameters(params, training, batch_size, dict(base_model))


def first_epochs(phases: list[Mapping[str, Any]], epochs: int) -> list[dict[str, Any]]:
    """The first ``epochs`` epochs of a phase schedule, as phases (``[{epochs, lr}, ...]``)."""
    taken, left = [], epochs
    for phase in phases:
        if left <= 0:
            break
        count = min(int(phase["epochs"]), left)
        taken.append({"epochs": count, "lr": phase["lr"]})
        left -= count
    return taken


def shortened_keep(keep: Any, epochs: int) -> Any:
    """``keep_gradients`` restricted to a run of ``epochs`` epochs (lists lose the later epochs)."""
    if isinstance(keep, (list, tuple)):
        return [e for e in keep if isinstance(e, int) and e <= epochs]
    return keep


# --------------------------------------------------------------------------- data


def load_images(sample: Path) -> dict[str, torch.Tensor]:
    """The embedded sample's images (uint8 NHWC) and labels, each split in row order."""
    dataset = read_image_dataset(sample)
    out = {}
    for split in ("train", "test"):
        rows = dataset.index[dataset.index["split"] == split].sort_values("row")
        out[f"{split}_images"] = dataset.images[split]
        out[f"{split}_labels"] = torch.tensor(rows["label"].to_numpy(np.int64))
    return out


def random_batches(count: int, batch: int, population: int, seed: int = 0) -> torch.Tensor:
    if count * batch > population:
        raise GpuCheckError(f"{count} batches of {batch} need {count * batch} images; only {population} are loaded.")
    order = torch.randperm(population, generator=torch.Generator().manual_seed(seed))
    return order[: count * batch].view(count, batch)


# --------------------------------------------------------------------------- steps


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "best_minibatch_source": str(Path(best_minibatch.__file__).resolve().parent),
        "git_commit": _git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "total_memory_gib": round(props.total_memory / GIB, 2),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            # float32 convolutions run in TF32 when this is on (torch's default); matmuls follow
            # float32_matmul_precision ("highest": no TF32).
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        })
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def _git_commit() -> str | None:
    """The checkout's commit (with ``+changes`` when its tracked files differ), or None outside git."""
    import subprocess

    if not (PROJECT_ROOT / ".git").exists():  # a copy inside another repository must not report that one's commit
        return None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if dirty else "")


def forward_backward_rate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, bf16: bool,
                          warmup: int, steps: int, repeats: int) -> dict[str, float]:
    """Images/s of forward + loss + backward (no optimizer step): best and median of ``repeats`` runs."""
    device = inputs.device
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()

    for _ in range(warmup):
        step()
    synchronize(device)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        rates.append(inputs.shape[0] * steps / (time.perf_counter() - started))
    return {"images_per_s_best": max(rates), "images_per_s_median": statistics.median(rates),
            "images_per_s_runs": rates}


def throughput(device: torch.device, model_name: str, model_options: Mapping[str, Any], images: torch.Tensor,
               labels: torch.Tensor, sizes: Mapping[str, Any]) -> dict[str, Any]:
    batch = sizes["throughput_batch"]
    rows = random_batches(1, batch, images.shape[0])[0]
    inputs = to_model_input(images[rows]).to(device)
    targets = labels[rows].to(device)
    torch.manual_seed(0)
    base = build_model(model_name, 10, **model_options).to(device).train()
    results = []
    previous_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # as the paper environment trains (deterministic: false)
    try:
        for layout in ("contiguous", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            model = copy.deepcopy(base).to(memory_format=fmt)
            x = inputs.contiguous(memory_format=fmt)
            for dtype in ("float32", "bf16_autocast"):
                print(f"  {model_name} batch {batch}, {dtype}, {layout} ...", flush=True)
                rate = forward_backward_rate(model, x, targets, dtype == "bf16_autocast", sizes["throughput_warmup"],
                                             sizes["throughput_steps"], sizes["throughput_repeats"])
                results.append({"dtype": dtype, "memory_format": layout, **rate})
                print(f"    {rate['images_per_s_best']:,.0f} images/s (best), "
                      f"{rate['images_per_s_median']:,.0f} (median)", flush=True)
            del model
    finally:
        torch.backends.cudnn.benchmark = previous_benchmark
    out: dict[str, Any] = {"model": model_name, "model_options": dict(model_options),
                           "num_params": sum(p.numel() for p in base.parameters()), "batch_size": batch,
                           "measures": "forward + cross-entropy + backward, no optimizer step, inputs on the device",
                           "cudnn_benchmark": device.type == "cuda", "warmup_steps": sizes["throughput_warmup"],
                           "steps_per_run": sizes["throughput_steps"], "runs": sizes["throughput_repeats"],
                           "results": results}
    for dtype in ("float32", "bf16_autocast"):
        rows_ = {r["memory_format"]: r["images_per_s_best"] for r in results if r["dtype"] == dtype}
        best = max(rows_, key=rows_.get)
        out[dtype] = {"images_per_s_contiguous": rows_["contiguous"],
                      "images_per_s_channels_last": rows_["channels_last"],
                      "faster_layout": best, "images_per_s_best_layout": rows_[best],
                      "channels_last_speedup": rows_["channels_last"] / rows_["contiguous"]}
    return out


def probe_ratio_and_memory(device: torch.device, paper: PaperParameters, model: Mapping[str, Any],
                           images: torch.Tensor, labels: torch.Tensor, batch: int, sizes: Mapping[str, Any],
                           scratch: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Plain vs probed epochs of ``ratio_batches`` batches through GradientProbeRun; peak memory of the probed run."""
    count, epochs = sizes["ratio_batches"], sizes["ratio_epochs"]
    data = TrainingData(images, labels, random_batches(count, batch, images.shape[0]))
    lr = paper.recipe["phases"][0]["lr"]
    config = paper.config({"model": dict(model), "phases": [{"epochs": epochs, "lr": lr}], "device": device.type,
                           "progress_bar": False},
                          {"checkpoint_dir": None, "keep_gradients": "none",
                           "gradient_buffer": {"scratch_dir": str(scratch / "ratio-scratch")}})
    recipe = recipe_of(config)
    factory = named_model_factory(config)
    # The batched probe (training.probe_chunk: auto): the same run, the K gradients taken several at a time.
    batched_config = paper.config({"model": dict(model), "phases": [{"epochs": epochs, "lr": lr}],
                                   "device": device.type, "progress_bar": False, "probe_chunk": "auto"},
                                  {"checkpoint_dir": None, "keep_gradients": "none",
                                   "gradient_buffer": {"scratch_dir": str(scratch / "ratio-scratch")}})
    seconds: dict[str, list[float]] = {}
    peak: dict[str, Any] = {}
    batched_distances = None
    for kind, probe, run_config in (("plain", False, config), ("probed", True, config),
                                    ("batched", True, batched_config)):
        print(f"  {kind}: {epochs} epochs of {count} batches of {batch} ...", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        run = GradientProbeRun(run_config, data, factory, "random", probe=probe)
        run.run()  # keep_gradients: none, so nothing is written
        seconds[kind] = run.results.history["seconds"].tolist()
        print(f"    seconds per epoch: {', '.join(f'{s:.3f}' for s in seconds[kind])}", flush=True)
        if kind == "batched":
            batched_distances = run.results.distances
        elif probe:
            num_params, itemsize = run.num_params, run.param_dtype.itemsize
            distances = run.results.distances
            if device.type == "cuda":
                peak = {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
                        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
                        "allocated_before_gib": before / GIB}
            else:
                peak = {"peak_allocated_gib": None, "peak_reserved_gib": None,
                        "peak_host_rss_gib": _peak_rss_bytes() / GIB}
    plain = statistics.mean(seconds["plain"][1:])
    probed = statistics.mean(seconds["probed"][1:])
    batched = statistics.mean(seconds["batched"][1:])
    images_per_epoch = count * batch
    # Both probes at the same parameters each epoch: their distances agree to rounding (float32 here).
    agreement = float(np.max(np.abs(batched_distances["distance"].to_numpy() - distances["distance"].to_numpy())
                             / distances["distance"].to_numpy()))
    ratio = {
        "model": recipe.model, "batches": count, "batch_size": batch, "epochs": epochs,
        "counted_epochs": f"2..{epochs} (epoch 1 holds cuDNN autotuning and first-call costs)",
        "settings": {"augment": recipe.augment, "bf16_autocast": recipe.bf16_autocast,
                     "deterministic": recipe.deterministic, "test_evaluation": False},
        "plain_epoch_seconds": seconds["plain"], "probe_epoch_seconds": seconds["probed"],
        "plain_seconds": plain, "probe_seconds": probed, "ratio": probed / plain,
        "plain_images_per_s": images_per_epoch / plain, "probe_images_per_s": images_per_epoch / probed,
        "batched_probe": "training.probe_chunk: auto (torch.func, the chunk chosen from free memory)",
        "batched_probe_epoch_seconds": seconds["batched"], "batched_probe_seconds": batched,
        "batched_ratio": batched / plain, "batched_probe_images_per_s": images_per_epoch / batched,
        "batched_distance_max_relative_difference": agreement,
        "distance_rows": len(distances),
        "distances_finite": bool(np.isfinite(distances["distance"].to_numpy()).all()),
    }
    buffer_bytes = count * num_params * itemsize
    memory = {
        "model": recipe.model, "num_params": num_params, "batches": count, "batch_size": batch,
        "gradient_buffer": "in memory, on the model's device" if device.type == "cuda" else "in memory (CPU)",
        "buffer_gib": buffer_bytes / GIB, **peak,
    }
    if device.type == "cuda":
        # Arithmetic, not measured: the same run with the paper's 195 batches holds 175 more rows.
        extra = (PAPER_BATCHES - count) * num_params * itemsize
        memory["paper_epoch_peak_allocated_gib_estimate"] = (peak["peak_allocated_gib"] * GIB + extra) / GIB
        memory["paper_epoch_buffer_gib"] = PAPER_BATCHES * num_params * itemsize / GIB
    return ratio, memory


def probe_pass(device: torch.device, model_name: str, model_options: Mapping[str, Any], images: torch.Tensor,
               labels: torch.Tensor, batch: int, sizes: Mapping[str, Any]) -> dict[str, Any]:
    """Images/s of Algorithm 1's probe pass alone: K gradients at one set of parameters, into the epoch's buffer.

    ``sequential``: one forward/backward per batch (the reference probe); ``batched``:
    ``vmap(grad)`` over chunks of batches (``probe_chunk: auto``). Best of
    ``throughput_repeats`` timed epochs after one warm-up epoch each; float32.
    """
    count = sizes["ratio_batches"]
    rows = random_batches(count, batch, images.shape[0], seed=1)
    batches = [(to_model_input(images[r]).to(device), labels[r].to(device)) for r in rows]
    torch.manual_seed(0)
    net_normal = build_model(model_name, 10, **model_options).to(device).train()
    num_params = sum(p.numel() for p in net_normal.parameters())
    out: dict[str, Any] = {"model": model_name, "num_params": num_params, "batches": count, "batch_size": batch,
                           "measures": "net_compare's K gradients at the epoch-start parameters, appended to an "
                                       "in-memory EpochGradients on the model's device, and the exact distances"}
    distances = {}
    for kind, chunk in (("sequential", 0), ("batched", "auto")):
        probe = GradientProbe(net_normal, count, lambda n: EpochGradients(n, num_params, torch.float32, device),
                              contextlib.nullcontext, chunk=chunk)
        rates = []
        for repeat in range(1 + sizes["throughput_repeats"]):
            synchronize(device)
            started = time.perf_counter()
            probe.start_epoch(None, net_normal)
            for k, (inputs, targets) in enumerate(batches):
                probe.after_step(None, k, inputs, targets)
            measures = probe.measures()
            synchronize(device)
            if repeat:  # the first epoch warms up (cuDNN autotuning, first-call costs)
                rates.append(count * batch / (time.perf_counter() - started))
        distances[kind] = measures["distance"]
        out[f"{kind}_images_per_s_runs"] = rates
        out[f"{kind}_images_per_s"] = max(rates)
        if chunk:
            out["batched_chunk"] = probe.batched.chunk
        print(f"  {kind}: {max(rates):,.0f} images/s (best)", flush=True)
        del probe
    out["speedup"] = out["batched_images_per_s"] / out["sequential_images_per_s"]
    out["distance_max_relative_difference"] = float(np.max(np.abs(distances["batched"] - distances["sequential"])
                                                           / distances["sequential"]))
    return out


def _peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def paper_run(device: torch.device, paper: PaperParameters, loaded: Mapping[str, torch.Tensor], batch: int,
              sizes: Mapping[str, Any], scratch: Path, model_override: Mapping[str, Any] | None) -> dict[str, Any]:
    """The paper environment's gradient_training, first ``paper_epochs`` epochs, on a subset of real images."""
    epochs, subset = sizes["paper_epochs"], sizes["paper_subset"]
    train_images, train_labels = loaded["train_images"], loaded["train_labels"]
    subset = min(subset, train_images.shape[0])
    count = subset // batch
    # A random subset in random batches (the sample's rows are grouped by class), as the random ordering.
    data = TrainingData(train_images, train_labels, random_batches(count, batch, train_images.shape[0]),
                        loaded["test_images"], loaded["test_labels"])
    recipe_overrides: dict[str, Any] = {"phases": first_epochs(paper.recipe["phases"], epochs),
                                        "device": device.type, "progress_bar": False}
    if model_override is not None:
        recipe_overrides["model"] = dict(model_override)
    run_overrides = {"keep_gradients": shortened_keep(paper.gradient_training.get("keep_gradients", "all"), epochs),
                     "checkpoint_dir": str(scratch / "checkpoints"), "gradients_dir": str(scratch / "gradients")}
    config = paper.config(recipe_overrides, run_overrides)
    recipe = recipe_of(config)
    run = GradientProbeRun(config, data, named_model_factory(config), "random", probe=True)
    print(f"  {recipe.model}: {epochs} epochs of {count} batches of {batch} "
          f"({count * batch} of a {subset}-image subset), test on {loaded['test_images'].shape[0]}, "
          f"kept epochs {list(config.kept_epochs)} ...", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    run.run()  # the run writes its kept gradients to the scratch folder, as in a kedro run
    files = list((scratch / "gradients").rglob("*.pt"))
    spilled, spilled_bytes = len(files), len(files) * run.num_params * SPILL_DTYPES[config.spill_dtype].itemsize
    wall = time.perf_counter() - started
    history = run.results.history
    columns = ["epoch", "learning_rate", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
               "mean_distance", "full_grad_norm", "seconds", "gradients_kept"]
    rows = [{c: (bool(v) if c == "gradients_kept" else float(v) if c != "epoch" else int(v))
             for c, v in row.items()} for row in history[columns].to_dict("records")]
    for row in rows:
        print(f"    epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.3f}, "
              f"test acc {row['test_accuracy']:.3f}, mean distance {row['mean_distance']:.4g}, "
              f"{row['seconds']:.2f} s", flush=True)
    out = {
        "model": recipe.model, "model_options": dict(recipe.model_options), "num_params": run.num_params,
        "train_images": count * batch, "batches": count, "batch_size": batch, "test_images": int(loaded["test_images"].shape[0]),
        "phases": recipe_overrides["phases"], "augment": recipe.augment, "bf16_autocast": recipe.bf16_autocast,
        "deterministic": recipe.deterministic, "eval_batch_size": recipe.eval_batch_size,
        "kept_epochs": list(config.kept_epochs), "spill_dtype": config.spill_dtype,
        "buffer_memory_cap_gb": config.buffer_memory_cap_gb,
        "overrides_of_paper_parameters": {**recipe_overrides, "keep_gradients": run_overrides["keep_gradients"]},
        "spilled_gradients": spilled, "spilled_gib": spilled_bytes / GIB,
        "spilled_gradients_note": "yielded to the caller (the Kedro node writes them); counted here, not written",
        "distance_rows": len(run.results.distances), "history": rows, "wall_seconds": wall,
    }
    if device.type == "cuda":
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    return out


def paper_run_on_cluster(kind: str, trainings: int, paper: PaperParameters, loaded: Mapping[str, torch.Tensor],
                         batch: int, sizes: Mapping[str, Any], scratch: Path,
                         model_override: Mapping[str, Any] | None) -> dict[str, Any]:
    """The same paper run, ``trainings`` times at once on a Dask cluster of ``kind`` (conf/base/dask.yml's kinds).

    ``cuda``: dask-cuda's one worker per GPU, each training a task asking for ``GPU: 1``, so
    every GPU trains one copy (the project's runner hands out its trainings the same way).
    ``local``: worker processes on the CPU (what the test suite can run). Each training has
    its own checkpoint folder. Reports each training's seconds and the whole wall-clock
    against the single training of ``paper_run``.
    """
    from best_minibatch.services.cluster import Cluster, ClusterConfig

    config = ClusterConfig.from_params({"cluster": kind, "local": {"n_workers": trainings}})
    print(f"  {trainings} trainings at once on a '{kind}' Dask cluster ...", flush=True)
    with Cluster(config) as cluster:
        workers = len(cluster.client.scheduler_info().get("workers", {}))
        resources = {"GPU": 1} if kind == "cuda" else None

        def one(index: int) -> dict[str, Any]:
            device = torch.device("cuda" if kind == "cuda" else "cpu")
            with contextlib.redirect_stdout(None):  # the workers' prints would interleave
                result = paper_run(device, paper, loaded, batch, sizes, scratch / f"training-{index}", model_override)
            return {"wall_seconds": result["wall_seconds"], "device": str(device),
                    "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                    "final_test_accuracy": result["history"][-1]["test_accuracy"]}

        started = time.perf_counter()
        futures = [cluster.client.submit(one, i, resources=resources, pure=False) for i in range(trainings)]
        results = cluster.client.gather(futures)
        wall = time.perf_counter() - started
    return {"cluster": kind, "workers": workers, "trainings": trainings, "per_training": results,
            "wall_seconds": wall,
            "note": "each training is paper_run's; the wall-clock includes shipping the images to the workers"}


def time_estimate(report: Mapping[str, Any]) -> dict[str, Any]:
    """The paper's full run from the measured figures (arithmetic; labelled with what each uses)."""
    passes = PAPER_EPOCHS * PAPER_TRAIN_IMAGES * 2  # one training and one probe pass per image and epoch
    out: dict[str, Any] = {
        "model": (report.get("throughput") or {}).get("model") or (report.get("probe_ratio") or {}).get("model"),
        "forward_backward_passes_per_ordering": passes, "orderings": PAPER_ORDERINGS,
        "assumed_images_per_s_before": ASSUMED_IMAGES_PER_S,
        "hours_per_ordering_at_assumed_rate": passes / ASSUMED_IMAGES_PER_S / 3600,
    }
    tp = report.get("throughput") or {}
    for dtype in ("float32", "bf16_autocast"):
        if isinstance(tp.get(dtype), Mapping):
            rate = tp[dtype]["images_per_s_contiguous"]  # the layout the training engine uses today
            out[f"{dtype}_images_per_s"] = rate
            out[f"{dtype}_hours_per_ordering"] = passes / rate / 3600
            out[f"{dtype}_hours_all_orderings"] = PAPER_ORDERINGS * passes / rate / 3600
    ratio = report.get("probe_ratio") or {}
    if isinstance(ratio.get("probe_seconds"), (int, float)):
        # The measured probed epoch (training step, probe pass, buffer, distances; no test evaluation)
        # scaled from its batches to the paper's 195.
        per_epoch = ratio["probe_seconds"] * PAPER_BATCHES / ratio["batches"]
        out["probed_epoch_seconds_paper_scale"] = per_epoch
        out["engine_hours_per_ordering"] = PAPER_EPOCHS * per_epoch / 3600
        out["engine_hours_all_orderings"] = PAPER_ORDERINGS * PAPER_EPOCHS * per_epoch / 3600
    return out


# --------------------------------------------------------------------------- driver


def run_step(report: dict[str, Any], name: str, fn: Callable[[], Any], device: torch.device,
             store: bool = True) -> Any:
    """Run one step and (``store``) put its result under ``name``; on failure record the error there
    and under ``errors``, and carry on (returns ``None``)."""
    print(f"[{name}]", flush=True)
    started = time.perf_counter()
    try:
        result = fn()
        if store:
            report[name] = result
    except Exception as error:  # noqa: BLE001 - every failure is recorded and the next step runs
        message = f"{type(error).__name__}: {error}"
        print(f"  FAILED: {message}", flush=True)
        report[name] = {"error": message, "traceback": traceback.format_exc()[-4000:]}
        report["errors"][name] = message
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result = None
    report.setdefault("step_seconds", {})[name] = time.perf_counter() - started
    return result


def check_out_path(out: Path) -> Path:
    """Refuse an output path that cannot be written, before any work."""
    out = out.absolute()
    if out.is_dir():
        raise GpuCheckError(f"--out '{out}' is a folder; give a file name such as '{out / 'gpu_check.json'}'.")
    if out.suffix != ".json":
        raise GpuCheckError(f"--out '{out}' must end in .json (the report is JSON).")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise GpuCheckError(f"Cannot write '{out}': '{parent}' is not a writable folder. Choose another --out.")
    return out


def write_json_atomically(report: Mapping[str, Any], out: Path) -> None:
    """The report as JSON, through the project's atomic writer (a reader never sees half a file)."""
    write_text_atomically(json.dumps(report, indent=2, default=_json_default, allow_nan=True) + "\n", out)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


def main(argv: list[str] | None = None) -> int:
    scratch_root = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # checkpoints, scratch; removed at the end
    try:
        return _check(argv, scratch_root)
    finally:
        shutil.rmtree(scratch_root, ignore_errors=True)


def _check(argv: list[str] | None, scratch_root: Path) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the JSON report (default {DEFAULT_OUT})")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when present, else the CPU with the tiny model")
    parser.add_argument("--conf-dir", type=Path, default=CONF_DIR, help="the project's conf/ (base and paper)")
    parser.add_argument("--sample", type=Path, default=SAMPLE_ZIP, help="the embedded CIFAR-10 sample zip")
    parser.add_argument("--cluster", choices=("auto", "none", "local", "cuda"), default="auto",
                        help="also run the paper run once per worker at once on a Dask cluster: auto = the cuda "
                             "cluster (one worker per GPU) when more than one GPU is present, else none; local = "
                             "two CPU worker processes (what the test suite runs)")
    args = parser.parse_args(argv)

    try:
        out = check_out_path(args.out)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise GpuCheckError("--device cuda was asked for but torch sees no CUDA device. "
                                "Use --device auto (the CPU check) or install torch built for your CUDA.")
        if not args.sample.is_file():
            raise GpuCheckError(f"The CIFAR-10 sample '{args.sample}' is missing. It is tracked in git: "
                                "restore it with `git checkout -- data/01_raw/cifar10-sample.zip`, or pass --sample.")
        mode = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
        device = torch.device(mode)
        paper = paper_parameters(args.conf_dir, scratch_root)
        model = paper.recipe.get("model") if mode == "cuda" else paper.base_model
        # The parameters must be valid as they are, and the model this check trains must build.
        paper.config({}, {})
        model_recipe = recipe_of(paper.config({"model": dict(model)}, {}))
    except (GpuCheckError, ValueError) as error:  # ValueError: the project's configuration errors
        print(f"gpu_check: {error}", file=sys.stderr)
        return 2

    sizes = sizes_for(mode)
    batch = paper.batch_size
    model_name, model_options = model_recipe.model, dict(model_recipe.model_options)
    note = ("CUDA: the paper's model and batch size." if mode == "cuda" else
            f"No CUDA (or --device cpu): every step ran on the CPU with the base environment's tiny model "
            f"({model_name} {model_options}) and smaller batches; the figures say nothing about a GPU.")
    print(f"gpu_check: mode {mode}. {note}", flush=True)
    report: dict[str, Any] = {"mode": mode, "note": note, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                              "sizes": sizes, "errors": {}}
    started = time.perf_counter()
    run_step(report, "device", lambda: device_info(device), device)
    loaded = run_step(report, "data", lambda: load_images(args.sample), device, store=False)
    if loaded is not None:
        report["data"] = {"sample": str(args.sample), **{k: list(v.shape) for k, v in loaded.items()}}
        # Throughput and the probe ratio need 20 x 256 images: the sample's train and test images together.
        pool_images = torch.cat([loaded["train_images"], loaded["test_images"]])
        pool_labels = torch.cat([loaded["train_labels"], loaded["test_labels"]])
        run_step(report, "throughput",
                 lambda: throughput(device, model_name, model_options, pool_images, pool_labels, sizes), device)
        ratio_batch = batch if mode == "cuda" else sizes["ratio_batch"]
        run_step(report, "probe_pass",
                 lambda: probe_pass(device, model_name, model_options, pool_images, pool_labels, ratio_batch, sizes),
                 device)
        both = run_step(report, "probe_ratio",
                        lambda: probe_ratio_and_memory(device, paper, model, pool_images, pool_labels, ratio_batch,
                                                       sizes, scratch_root), device, store=False)
        if both is not None:
            report["probe_ratio"], report["probe_memory"] = both
        else:
            report["probe_memory"] = {"error": "not measured: the probe_ratio step failed"}
        paper_batch = batch if mode == "cuda" else sizes["paper_batch"]
        run_step(report, "paper_run",
                 lambda: paper_run(device, paper, loaded, paper_batch, sizes, scratch_root,
                                   None if mode == "cuda" else paper.base_model), device)
        gpus = torch.cuda.device_count() if mode == "cuda" else 0
        kind = args.cluster if args.cluster != "auto" else ("cuda" if gpus > 1 else "none")
        if gpus > 1:
            report["paper_run_note"] = (f"{gpus} GPUs present: every step but paper_run_dask ran on the first one "
                                        "only.")
        if kind != "none":
            trainings = gpus if kind == "cuda" else 2
            run_step(report, "paper_run_dask",
                     lambda: paper_run_on_cluster(kind, trainings, paper, loaded, paper_batch, sizes, scratch_root,
                                                  None if mode == "cuda" else paper.base_model), device)
        run_step(report, "time_estimate", lambda: time_estimate(report), device)
    report["total_seconds"] = time.perf_counter() - started
    write_json_atomically(report, out)
    print(f"gpu_check: wrote {out} in {report['total_seconds']:.1f} s"
          + (f"; FAILED steps: {', '.join(report['errors'])}" if report["errors"] else "; every step ran"), flush=True)
    summary = report.get("time_estimate") or {}
    if mode == "cuda" and "float32_images_per_s" in summary:
        print(f"{model_name} float32 forward+backward: {summary['float32_images_per_s']:,.0f} images/s at batch {batch} "
              f"(replaces the assumed {ASSUMED_IMAGES_PER_S:,.0f}); paper run estimate "
              f"{summary['float32_hours_per_ordering']:.1f} h per ordering", flush=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
