"""Image metrics that order the training set (the paper's section 3.2), in one registry.

Knows nothing of Kedro. Every metric is a plain function registered with
:func:`register_metric`; :data:`METRICS` holds them in registration order, which
is the order of the orderings (Kedro namespaces) in every pipeline. Adding a
metric takes one function and one registration in this file (see
``docs/adding_a_metric.md``).

A score function takes the images as a ``uint8`` array ``N x H x W x 3`` (RGB,
NHWC) and the metric's options (its registered defaults overlaid with the
parameters under ``score_metrics.<name>``) and returns a table of ``N`` rows in
image order: column ``score`` (the primary value, used by batch summaries) plus
every other column named in the metric's ``sort_columns``. :func:`score_images`
checks the options, decides whether the metric can run at all (before any work),
calls the function and adds ``image_id``.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pandas as pd

if TYPE_CHECKING:  # torch and lpips load lazily: only the perceptual metric needs them
    import lpips
    import torch

logger = logging.getLogger(__name__)

ScoreFunction = Callable[[np.ndarray, Mapping[str, Any]], pd.DataFrame]
UnavailableReason = Callable[[Mapping[str, Any]], "str | None"]


class MetricConfigError(ValueError):
    """Parameters of a metric that cannot be used; the message names the parameter and the fix."""


class MetricUnavailableError(RuntimeError):
    """A metric that cannot run here (e.g. missing pretrained weights) while its ``strict`` option is on."""


@dataclass(frozen=True)
class Metric:
    """One registered metric: how to score images and how its scores sort."""

    name: str
    score: ScoreFunction
    description: str
    sort_columns: tuple[str, ...] = ("score",)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    # Returns why the metric cannot run with these options (None: it can); checked before any work.
    unavailable_reason: UnavailableReason | None = None

    @property
    def score_columns(self) -> tuple[str, ...]:
        """Columns of the metric's score table, in order."""
        extra = tuple(column for column in self.sort_columns if column != "score")
        return ("image_id", "score", *extra)

    def resolve_options(self, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
        """The registered defaults overlaid with ``overrides``; unknown keys are an error."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "(none)"
            raise MetricConfigError(
                f"Unknown parameter(s) score_metrics.{self.name}.{unknown[0]}"
                + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                + f". The metric '{self.name}' accepts: {allowed}. Remove or rename it in "
                "conf/<env>/parameters_score_metrics.yml."
            )
        return {**self.defaults, **overrides}

    def empty_scores(self) -> pd.DataFrame:
        """A zero-row score table with this metric's columns and dtypes."""
        columns: dict[str, pd.Series] = {"image_id": pd.Series([], dtype="int64")}
        for column in self.score_columns[1:]:
            columns[column] = pd.Series([], dtype="float64")
        return pd.DataFrame(columns)


METRICS: dict[str, Metric] = {}


def register_metric(
    name: str,
    *,
    description: str,
    sort_columns: tuple[str, ...] = ("score",),
    defaults: Mapping[str, Any] | None = None,
    unavailable_reason: UnavailableReason | None = None,
) -> Callable[[ScoreFunction], ScoreFunction]:
    """Decorator: register the decorated function as metric ``name`` (appended to :data:`METRICS`).

    ``sort_columns``: the score-table columns the images sort by, most significant
    first (ties are then broken by ``image_id``). ``defaults``: every option the
    metric accepts, with its default; parameters may override only these keys.
    ``unavailable_reason``: optional check, run before any work, that returns why
    the metric cannot run (a metric with a ``strict`` option then raises instead of
    being skipped).
    """

    def decorator(function: ScoreFunction) -> ScoreFunction:
        if name in METRICS:
            raise ValueError(f"Metric '{name}' is registered twice; metric names must be unique.")
        if not name.isidentifier():
            raise ValueError(f"Metric name '{name}' must be a Python identifier (it becomes a Kedro namespace).")
        METRICS[name] = Metric(
            name=name,
            score=function,
            description=description,
            sort_columns=tuple(sort_columns),
            defaults=dict(defaults or {}),
            unavailable_reason=unavailable_reason,
        )
        return function

    return decorator


# --------------------------------------------------------------------------- option checks


def _require_int(options: Mapping[str, Any], metric: str, key: str, minimum: int) -> int:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise MetricConfigError(
            f"score_metrics.{metric}.{key} must be an integer >= {minimum}, got {value!r}. "
            "Fix it in conf/<env>/parameters_score_metrics.yml."
        )
    return int(value)


def _require_number(options: Mapping[str, Any], metric: str, key: str, minimum: float) -> float:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not value >= minimum:
        raise MetricConfigError(
            f"score_metrics.{metric}.{key} must be a number >= {minimum}, got {value!r}. "
            "Fix it in conf/<env>/parameters_score_metrics.yml."
        )
    return float(value)


# --------------------------------------------------------------------------- M1: intensity


@register_metric("intensity", description="M1: sum of all pixel values over all three channels (uint8 scale).")
def intensity_score(images: np.ndarray, options: Mapping[str, Any]) -> pd.DataFrame:
    """Sum of every pixel value of every channel; exact (integer sum, stored as float64)."""
    totals = images.reshape(len(images), -1).sum(axis=1, dtype=np.int64)
    return pd.DataFrame({"score": totals.astype(np.float64)})


# --------------------------------------------------------------------------- M2: colour


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """RGB rows in [0, 255] (``N x 3``, float) -> HSV rows: hue in degrees [0, 360), saturation and value in [0, 1].

    The usual hexcone formulas: value = max / 255, saturation = (max - min) / max
    (0 for black), hue from the largest channel (red wins ties, then green); a
    grey (max == min) has hue 0.
    """
    rgb = np.asarray(rgb, dtype=np.float64)
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    high = rgb.max(axis=1)
    low = rgb.min(axis=1)
    delta = high - low
    safe_delta = np.where(delta > 0, delta, 1.0)
    hue_sector = np.where(
        high == r,
        ((g - b) / safe_delta) % 6.0,
        np.where(high == g, (b - r) / safe_delta + 2.0, (r - g) / safe_delta + 4.0),
    )
    hue = np.where(delta > 0, 60.0 * hue_sector, 0.0)
    hue = np.where(hue >= 360.0, hue - 360.0, hue)  # (-tiny) % 6 can round up to exactly 6
    saturation = np.where(high > 0, delta / np.where(high > 0, high, 1.0), 0.0)
    value = high / 255.0
    return np.stack([hue, saturation, value], axis=1)


@register_metric(
    "color",
    description="M2: mean RGB colour as HSV (hue in degrees [0, 360), saturation and value in [0, 1]).",
    sort_columns=("hue", "saturation", "value"),
)
def color_score(images: np.ndarray, options: Mapping[str, Any]) -> pd.DataFrame:
    """Mean colour of the image converted to HSV; ``score`` is the hue (the most significant sort key)."""
    n = len(images)
    # OpenCV's row reduction sums the three channels of all images in one pass, ~8x faster than
    # numpy's strided mean; float64 sums of uint8 values are exact.
    channel_sums = cv2.reduce(np.ascontiguousarray(images).reshape(n, -1, 3), 1, cv2.REDUCE_SUM, dtype=cv2.CV_64F)
    mean_rgb = channel_sums.reshape(n, 3) / (images.shape[1] * images.shape[2])
    hsv = rgb_to_hsv(mean_rgb)
    return pd.DataFrame({"score": hsv[:, 0], "hue": hsv[:, 0], "saturation": hsv[:, 1], "value": hsv[:, 2]})


# --------------------------------------------------------------------------- M3: edges

EDGES_DEFAULTS = {
    # OpenCV's customary Canny thresholds on the 0-255 gradient scale.
    "low_threshold": 100.0,
    "high_threshold": 200.0,
    "aperture_size": 3,  # Sobel kernel size: 3, 5 or 7
    "l2_gradient": False,  # False: |gx| + |gy| (OpenCV's default); True: sqrt(gx^2 + gy^2)
    # Gaussian blur before Canny: odd kernel size, 0 = no blur (the paper runs Canny on the image itself).
    "blur_kernel_size": 0,
    "blur_sigma": 0.0,  # 0: OpenCV derives sigma from the kernel size
}


@register_metric(
    "edges",
    description="M3: number of Canny edge pixels of the grayscale image.",
    defaults=EDGES_DEFAULTS,
)
def edges_score(images: np.ndarray, options: Mapping[str, Any]) -> pd.DataFrame:
    """Count of pixels Canny marks as edges on the grayscale image (the paper's sum over the Canny map / 255)."""
    low = _require_number(options, "edges", "low_threshold", 0.0)
    high = _require_number(options, "edges", "high_threshold", 0.0)
    if low > high:
        raise MetricConfigError(
            f"score_metrics.edges.low_threshold ({low}) exceeds high_threshold ({high}); "
            "swap them or lower low_threshold."
        )
    aperture = _require_int(options, "edges", "aperture_size", 3)
    if aperture not in (3, 5, 7):
        raise MetricConfigError(f"score_metrics.edges.aperture_size must be 3, 5 or 7, got {aperture}.")
    blur = _require_int(options, "edges", "blur_kernel_size", 0)
    if blur and blur % 2 == 0:
        raise MetricConfigError(
            f"score_metrics.edges.blur_kernel_size must be 0 (no blur) or odd, got {blur}."
        )
    sigma = _require_number(options, "edges", "blur_sigma", 0.0)
    l2 = bool(options["l2_gradient"])

    n, h, w, _ = images.shape
    # One colour conversion for all images: stack them as one tall image.
    gray = cv2.cvtColor(np.ascontiguousarray(images).reshape(n * h, w, 3), cv2.COLOR_RGB2GRAY).reshape(n, h, w)
    edge_maps = np.empty_like(gray)
    # OpenCV's thread pool costs more than it saves on 32x32 images: one thread is ~3x faster.
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        for i in range(n):  # Canny's hysteresis is per image; borders must not touch a neighbour
            image = cv2.GaussianBlur(gray[i], (blur, blur), sigma) if blur else gray[i]
            cv2.Canny(image, low, high, edges=edge_maps[i], apertureSize=aperture, L2gradient=l2)
    finally:
        cv2.setNumThreads(threads)
    counts = np.count_nonzero(edge_maps.reshape(n, -1), axis=1)
    return pd.DataFrame({"score": counts.astype(np.float64)})


# --------------------------------------------------------------------------- M4: perceptual (LPIPS)

# torchvision's file for AlexNet's ImageNet weights (AlexNet_Weights.IMAGENET1K_V1), as its cache names it.
ALEXNET_WEIGHTS_FILENAME = "alexnet-owt-7be5be79.pth"

PERCEPTUAL_DEFAULTS = {
    # Local file with torchvision's AlexNet ImageNet state dict; null: torchvision's cache,
    # <torch.hub.get_dir()>/checkpoints/alexnet-owt-7be5be79.pth (i.e. under $TORCH_HOME).
    "backbone_weights": None,
    # true: missing weights are an error before any work; false: the metric is skipped with a warning.
    "strict": False,
    # Side length the images (and the average image) are bilinearly upsampled to before LPIPS;
    # None = native 32x32, as in the paper (which feeds the images to LPIPS as they are). 64 is
    # the patch size LPIPS's linear layers were fitted on and gives AlexNet's conv3-conv5 3x3
    # instead of 1x1 feature maps, at about 4x the cost.
    "upsample_to": None,
    "batch_size": 500,
    "device": "cpu",  # cpu | cuda | auto (cuda when available)
}


def alexnet_weights_path(options: Mapping[str, Any]) -> Path:
    """Where the AlexNet ImageNet weights are looked for: the parameter, else torchvision's cache."""
    if options.get("backbone_weights"):
        return Path(options["backbone_weights"]).expanduser()
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS_FILENAME


def _perceptual_settings(options: Mapping[str, Any]) -> tuple[int, int | None, str]:
    """Checked ``batch_size``, ``upsample_to`` and ``device`` of the perceptual metric."""
    batch_size = _require_int(options, "perceptual", "batch_size", 1)
    upsample_to = options["upsample_to"]
    if upsample_to is not None:
        upsample_to = _require_int(options, "perceptual", "upsample_to", 32)
    if not isinstance(options["strict"], bool):
        raise MetricConfigError(f"score_metrics.perceptual.strict must be true or false, got {options['strict']!r}.")
    device = str(options["device"])
    if device not in ("cpu", "cuda", "auto"):
        raise MetricConfigError(f"score_metrics.perceptual.device must be cpu, cuda or auto, got {device!r}.")
    return batch_size, upsample_to, device


def perceptual_unavailable_reason(options: Mapping[str, Any]) -> str | None:
    """Why LPIPS cannot run (None: the AlexNet weights are there). A named file that is missing is an error."""
    _perceptual_settings(options)  # bad options are an error even where the metric would be skipped
    path = alexnet_weights_path(options)
    if path.is_file():
        return None
    if options.get("backbone_weights"):
        raise MetricConfigError(
            f"score_metrics.perceptual.backbone_weights names '{path}', which does not exist. "
            "Point it at torchvision's AlexNet ImageNet weights file "
            f"({ALEXNET_WEIGHTS_FILENAME}) or set it to null to use torchvision's cache."
        )
    return (
        f"AlexNet ImageNet weights for LPIPS not found at {path} (torchvision's cache; "
        "this machine cannot download them). Fix: copy torchvision's "
        f"{ALEXNET_WEIGHTS_FILENAME} (from https://download.pytorch.org/models/{ALEXNET_WEIGHTS_FILENAME}) "
        "into $TORCH_HOME/hub/checkpoints/, or set score_metrics.perceptual.backbone_weights to "
        "a local copy."
    )


def _lpips_with_backbone(backbone_state: Mapping[str, torch.Tensor] | None) -> lpips.LPIPS:
    """LPIPS (AlexNet, v0.1 linear weights from the lpips wheel) without any download.

    ``pnet_rand=True`` makes lpips build AlexNet randomly initialised instead of
    asking torchvision for the pretrained weights (which would download them);
    the ImageNet features are then copied in from ``backbone_state``.
    """
    import lpips

    with warnings.catch_warnings():
        # lpips calls torchvision's deprecated `pretrained=` argument.
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(pretrained=True, net="alex", version="0.1", pnet_rand=True, verbose=False)
    if backbone_state is not None:
        # lpips keeps AlexNet's `features.<i>` layers as `slice<k>.<i>`.
        target = model.net.state_dict()
        missing = [f"features.{key.split('.', 1)[1]}" for key in target
                   if f"features.{key.split('.', 1)[1]}" not in backbone_state]
        if missing:
            raise MetricConfigError(
                f"The AlexNet weights file lacks {missing[0]} (and {len(missing) - 1} more keys); "
                "score_metrics.perceptual.backbone_weights must hold torchvision's AlexNet state dict "
                f"({ALEXNET_WEIGHTS_FILENAME})."
            )
        model.net.load_state_dict({key: backbone_state[f"features.{key.split('.', 1)[1]}"] for key in target})
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_lpips_alexnet(weights_path: str | Path) -> lpips.LPIPS:
    """The real LPIPS metric: AlexNet with its ImageNet weights from ``weights_path`` plus lpips' v0.1 layers."""
    import torch

    try:
        state = torch.load(Path(weights_path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same advice
        raise MetricConfigError(
            f"Cannot read AlexNet weights from '{weights_path}' ({error}). It must be torchvision's "
            f"{ALEXNET_WEIGHTS_FILENAME}; fix score_metrics.perceptual.backbone_weights or the cached file."
        ) from error
    return _lpips_with_backbone(state)


def lpips_with_random_backbone_not_pretrained(seed: int = 0) -> lpips.LPIPS:
    """NOT LPIPS: the same network with a randomly initialised AlexNet. For timing and code-path tests only."""
    import torch

    torch.manual_seed(seed)
    return _lpips_with_backbone(None)


def _resolve_device(name: str) -> torch.device:
    from best_minibatch.training.runtime import resolve_device

    try:
        return resolve_device(name)
    except ValueError as error:
        raise MetricConfigError(f"score_metrics.perceptual.device: {error}; use cpu or auto.") from error


def _to_lpips_input(images: np.ndarray, upsample_to: int | None, device: torch.device) -> torch.Tensor:
    """uint8 (or float) NHWC in [0, 255] -> float32 NCHW in [-1, 1] (LPIPS's input range), optionally upsampled."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    x = x.permute(0, 3, 1, 2).to(torch.float32).div_(127.5).sub_(1.0)
    if upsample_to is not None and upsample_to != x.shape[-1]:
        x = F.interpolate(x, size=(upsample_to, upsample_to), mode="bilinear", align_corners=False)
    return x


def lpips_distances_to_reference(
    model: lpips.LPIPS,
    images: np.ndarray,
    reference: np.ndarray,
    *,
    batch_size: int = 500,
    upsample_to: int | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """LPIPS distance of every image (uint8 ``N x H x W x 3``) to one ``reference`` image (``H x W x 3``, 0-255 floats)."""
    import torch

    target = _resolve_device(device)
    model = model.to(target)
    reference_input = _to_lpips_input(reference[None].astype(np.float32), upsample_to, target)
    distances = np.empty(len(images), dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = _to_lpips_input(images[start:start + batch_size], upsample_to, target)
            # lpips broadcasts the single reference over the batch.
            distances[start:start + len(batch)] = model(batch, reference_input).flatten().double().cpu().numpy()
    return distances


@register_metric(
    "perceptual",
    description="M4: LPIPS (AlexNet, v0.1) distance between each image and the training set's average image.",
    defaults=PERCEPTUAL_DEFAULTS,
    unavailable_reason=perceptual_unavailable_reason,
)
def perceptual_score(images: np.ndarray, options: Mapping[str, Any]) -> pd.DataFrame:
    """LPIPS distance to the average image (pixel-wise mean over all scored images), computed in batches."""
    batch_size, upsample_to, device = _perceptual_settings(options)
    _resolve_device(device)
    path = alexnet_weights_path(options)
    model = load_lpips_alexnet(path)
    average_image = images.mean(axis=0, dtype=np.float64)
    started = time.perf_counter()
    distances = lpips_distances_to_reference(
        model, images, average_image, batch_size=batch_size, upsample_to=upsample_to, device=device
    )
    logger.info(
        "LPIPS (AlexNet from %s) scored %d images in %.1f s", path, len(images), time.perf_counter() - started
    )
    return pd.DataFrame({"score": distances})


# --------------------------------------------------------------------------- random control


@register_metric(
    "random",
    description="Null control: a seeded uniform random score in [0, 1) per image.",
    defaults={"seed": 0},
)
def random_score(images: np.ndarray, options: Mapping[str, Any]) -> pd.DataFrame:
    """Uniform [0, 1) scores from ``numpy.random.default_rng(seed)``, one per image in image order."""
    seed = _require_int(options, "random", "seed", 0)
    return pd.DataFrame({"score": np.random.default_rng(seed).random(len(images))})


# --------------------------------------------------------------------------- driver


def metric_options(name: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Options of metric ``name`` from the ``score_metrics`` parameters (defaults overlaid)."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(METRICS))
    if unknown:
        raise MetricConfigError(
            f"score_metrics.{unknown[0]} is not a registered metric (known: {', '.join(METRICS)}). "
            "Remove it from conf/<env>/parameters_score_metrics.yml or register the metric in "
            "best_minibatch/metrics.py."
        )
    if name not in METRICS:
        raise MetricConfigError(f"Unknown metric '{name}'; registered metrics: {', '.join(METRICS)}.")
    return METRICS[name].resolve_options(params.get(name))


def metric_availability(name: str, params: Mapping[str, Any] | None) -> str | None:
    """Why metric ``name`` cannot run with these parameters (None: it can). Raises in strict mode.

    Cheap: reads no images. Call it before any work (e.g. at the start of a run)
    to make a strict metric fail early.
    """
    options = metric_options(name, params)
    metric = METRICS[name]
    if metric.unavailable_reason is None:
        return None
    reason = metric.unavailable_reason(options)
    if reason is not None and options.get("strict", False):
        raise MetricUnavailableError(
            f"Metric '{name}' cannot run and score_metrics.{name}.strict is true: {reason} "
            f"(Or set score_metrics.{name}.strict to false to skip the metric with a warning.)"
        )
    return reason


def score_images(
    name: str,
    images: np.ndarray,
    image_ids: Sequence[int] | np.ndarray,
    params: Mapping[str, Any] | None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score ``images`` (uint8 ``N x H x W x 3``) with metric ``name``.

    Returns the score table (``image_id`` + the metric's score columns, one row per
    image in input order) and the status ``{"metric", "status": "ok"|"skipped",
    "reason"}``. A metric that cannot run (e.g. LPIPS without its AlexNet weights)
    logs one loud warning and returns a zero-row table with status ``skipped``;
    with its ``strict`` option it raises :class:`MetricUnavailableError` instead.
    Every check happens before any scoring.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"Expected uint8 images of shape N x H x W x 3, got {images.dtype} {images.shape}.")
    ids = np.asarray(image_ids, dtype=np.int64)
    if ids.shape != (len(images),):
        raise ValueError(f"Got {len(ids)} image ids for {len(images)} images; they must match one to one.")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("image_ids contain duplicates; every scored image needs its own id.")
    options = metric_options(name, params)  # rejects unknown metrics and options
    metric = METRICS[name]
    reason = metric_availability(name, params)
    if reason is not None:
        logger.warning(
            "\n%s\nMETRIC '%s' SKIPPED: %s\nIts orderings will be empty in every later table and report.\n%s",
            "!" * 78, name, reason, "!" * 78,
        )
        return metric.empty_scores(), {"metric": name, "status": "skipped", "reason": reason}

    started = time.perf_counter()
    scores = metric.score(images, options)
    missing = [column for column in metric.score_columns[1:] if column not in scores.columns]
    if missing or len(scores) != len(images):
        raise RuntimeError(
            f"Metric '{name}' returned {len(scores)} rows and lacks columns {missing}; "
            f"its function must return {len(images)} rows with columns {list(metric.score_columns[1:])}."
        )
    table = scores.loc[:, list(metric.score_columns[1:])].astype("float64").reset_index(drop=True)
    if not np.isfinite(table.to_numpy()).all():
        raise RuntimeError(f"Metric '{name}' produced non-finite scores; check its inputs and options.")
    table.insert(0, "image_id", ids)
    logger.info("Scored %d images with '%s' in %.2f s", len(images), name, time.perf_counter() - started)
    return table, {"metric": name, "status": "ok", "reason": None}


def combine_scores(image_ids: Sequence[int] | np.ndarray, tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per image id, one column per metric (``<metric>`` for single-column metrics, else
    ``<metric>_<column>`` per sort column, e.g. ``color_hue``). A skipped metric's columns are NaN."""
    combined = pd.DataFrame({"image_id": np.asarray(image_ids, dtype=np.int64)})
    for name, table in tables.items():
        metric = METRICS[name]
        keyed = table.set_index("image_id")
        for column in metric.sort_columns:
            label = name if metric.sort_columns == ("score",) else f"{name}_{column}"
            combined[label] = combined["image_id"].map(keyed[column]).astype("float64")
    return combined
