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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pandas as pd

from best_minibatch.config import Section
from best_minibatch.metrics import perceptual
from best_minibatch.metrics.options import (
    MetricConfigError,
    MetricOptionError,
    MetricUnavailableError,
    metrics_section,
    options_section,
)

logger = logging.getLogger(__name__)

__all__ = ["METRICS", "Metric", "MetricConfigError", "MetricOptionError", "MetricUnavailableError", "register_metric",
           "score_images", "metric_options", "all_metric_options", "metric_availability", "combine_scores",
           "uninformative_reason"]

ScoreFunction = Callable[[np.ndarray, Mapping[str, Any]], pd.DataFrame]
UnavailableReason = Callable[[Mapping[str, Any]], "str | None"]
Provenance = Callable[[Mapping[str, Any]], "dict[str, Any] | None"]
DegenerateExplanation = Callable[[np.ndarray], "str | None"]
OptionsReader = Callable[[Section], "dict[str, Any]"]


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
    # Returns what the scores rest on (e.g. pretrained weights: source, sha256) for the status record.
    provenance: Provenance | None = None
    # Given the images, says why this metric may carry no information of its own on them (e.g. colour on
    # grayscale images); quoted when the scores turn out constant or ordered like another metric's.
    explain_degenerate: DegenerateExplanation | None = None
    # A null control: its scores carry no information about the images, so its orderings are the reference
    # every claim is gated on, and each training seed trains a batching of its own (docs/analysis.md).
    control: bool = False
    # Reads every option from the metric's section (``score_metrics.<name>``, defaults filled in), each
    # checked (``Section``'s typed reads); None: the options are taken as given.
    read_options: OptionsReader | None = None

    @property
    def score_columns(self) -> tuple[str, ...]:
        """Columns of the metric's score table, in order."""
        extra = tuple(column for column in self.sort_columns if column != "score")
        return ("image_id", "score", *extra)

    def resolve_options(self, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
        """The registered defaults overlaid with ``overrides``, each checked; unknown keys are an error."""
        section = options_section(self.name, overrides, self.defaults)
        return dict(self.read_options(section)) if self.read_options else dict(section.params)

    def empty_scores(self) -> pd.DataFrame:
        """A zero-row score table with this metric's columns and dtypes."""
        columns: dict[str, pd.Series] = {"image_id": pd.Series([], dtype="int64")}
        for column in self.score_columns[1:]:
            columns[column] = pd.Series([], dtype="float64")
        return pd.DataFrame(columns)


METRICS: dict[str, Metric] = {}

#: ``<metric>_stratified`` is the class-stratified ordering of ``<metric>`` (best_minibatch.batches.orderings).
STRATIFIED_SUFFIX = "_stratified"


def register_metric(
    name: str,
    *,
    description: str,
    sort_columns: tuple[str, ...] = ("score",),
    defaults: Mapping[str, Any] | None = None,
    unavailable_reason: UnavailableReason | None = None,
    provenance: Provenance | None = None,
    explain_degenerate: DegenerateExplanation | None = None,
    control: bool = False,
    options: OptionsReader | None = None,
) -> Callable[[ScoreFunction], ScoreFunction]:
    """Decorator: register the decorated function as metric ``name`` (appended to :data:`METRICS`).

    ``sort_columns``: the score-table columns the images sort by, most significant
    first (ties are then broken by ``image_id``). ``defaults``: every option the
    metric accepts, with its default; parameters may override only these keys.
    ``unavailable_reason``: optional check, run before any work, that returns why
    the metric cannot run (a metric with a ``strict`` option then raises instead of
    being skipped). ``provenance``: optional, returns what the scores rest on (for
    instance pretrained weights and their sha256), kept in the metric's status.
    ``explain_degenerate``: optional, given the images returns why the metric may
    carry no information of its own on them; :func:`uninformative_reason` quotes it.
    ``control``: the metric is a null control (random scores): its orderings gate the claims and
    each training seed trains its own batching of them. ``options``: reads and checks every option
    from the metric's :class:`~best_minibatch.config.Section` (``score_metrics.<name>``, defaults
    filled in) and returns them; the score function then gets them checked, before any work.
    """

    def decorator(function: ScoreFunction) -> ScoreFunction:
        if name in METRICS:
            raise ValueError(f"Metric '{name}' is registered twice; metric names must be unique.")
        if not name.isidentifier():
            raise ValueError(f"Metric name '{name}' must be a Python identifier (it becomes a Kedro namespace).")
        if name.endswith(STRATIFIED_SUFFIX):
            raise ValueError(f"Metric name '{name}' must not end in '{STRATIFIED_SUFFIX}': that names the metric's "
                             "class-stratified ordering.")
        METRICS[name] = Metric(
            name=name,
            score=function,
            description=description,
            sort_columns=tuple(sort_columns),
            defaults=dict(defaults or {}),
            unavailable_reason=unavailable_reason,
            provenance=provenance,
            explain_degenerate=explain_degenerate,
            control=control,
            read_options=options,
        )
        return function

    return decorator


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


def color_on_grayscale_images(images: np.ndarray) -> str | None:
    """Why the colour metric says nothing of its own on grayscale images (None when some pixel has colour)."""
    red, green, blue = images[..., 0], images[..., 1], images[..., 2]
    if np.array_equal(red, green) and np.array_equal(green, blue):
        return ("hue and saturation are undefined on grayscale images: every pixel has R = G = B, so hue and "
                "saturation are 0 and the colour ordering sorts by brightness alone")
    return None


@register_metric(
    "color",
    description="M2: mean RGB colour as HSV (hue in degrees [0, 360), saturation and value in [0, 1]).",
    sort_columns=("hue", "saturation", "value"),
    explain_degenerate=color_on_grayscale_images,
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


def edges_options(section: Section) -> dict[str, Any]:
    """``score_metrics.edges``, every option checked."""
    low = section.number("low_threshold", None, "Use e.g. 100 (OpenCV's customary value).", low=0)
    high = section.number("high_threshold", None, "Use e.g. 200 (OpenCV's customary value).", low=0)
    if low > high:
        raise section.error("low_threshold", f"{low:g} exceeds high_threshold ({high:g})",
                            "Swap them or lower low_threshold.")
    aperture = section.integer("aperture_size", None, 3, "Use 3, 5 or 7 (the Sobel kernel size).")
    if aperture not in (3, 5, 7):
        raise section.error("aperture_size", f"must be 3, 5 or 7, got {aperture}", "Use 3 (OpenCV's default).")
    blur = section.integer("blur_kernel_size", None, 0, "Use 0 (no blur) or an odd size such as 3.")
    if blur and blur % 2 == 0:
        raise section.error("blur_kernel_size", f"must be 0 (no blur) or odd, got {blur}", "Use e.g. 3 or 5.")
    return {
        "low_threshold": low,
        "high_threshold": high,
        "aperture_size": aperture,
        "l2_gradient": section.boolean("l2_gradient", None),
        "blur_kernel_size": blur,
        "blur_sigma": section.number("blur_sigma", None, "Use 0 (derived from the kernel size) or e.g. 1.", low=0),
    }


@register_metric(
    "edges",
    description="M3: number of Canny edge pixels of the grayscale image.",
    defaults=EDGES_DEFAULTS,
    options=edges_options,
)
def edges_score(images: np.ndarray, options: Mapping[str, Any]) -> pd.DataFrame:
    """Count of pixels Canny marks as edges on the grayscale image (the paper's sum over the Canny map / 255)."""
    low, high, aperture = options["low_threshold"], options["high_threshold"], options["aperture_size"]
    blur, sigma, l2 = options["blur_kernel_size"], options["blur_sigma"], options["l2_gradient"]

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

register_metric(
    "perceptual",
    description="M4: LPIPS (AlexNet, v0.1) distance between each image and the training set's average image.",
    defaults=perceptual.PERCEPTUAL_DEFAULTS,
    options=perceptual.perceptual_options,
    unavailable_reason=perceptual.perceptual_unavailable_reason,
    provenance=perceptual.perceptual_provenance,
)(perceptual.perceptual_score)


# --------------------------------------------------------------------------- random control


@register_metric(
    "random",
    description="Null control: a seeded uniform random score in [0, 1) per image.",
    defaults={"seed": 0},
    control=True,
    options=lambda section: {"seed": section.integer("seed", None, 0, "Use e.g. 0.")},
)
def random_score(images: np.ndarray, options: Mapping[str, Any]) -> pd.DataFrame:
    """Uniform [0, 1) scores from ``numpy.random.default_rng(seed)``, one per image in image order."""
    return pd.DataFrame({"score": np.random.default_rng(options["seed"]).random(len(images))})


# --------------------------------------------------------------------------- driver


def metric_options(name: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Options of metric ``name`` from the ``score_metrics`` parameters (defaults overlaid), each checked.

    The one reader of ``score_metrics``: its keys are the registered metrics, each metric's
    options are read by its registered ``options`` reader.
    """
    section = metrics_section(params, METRICS)
    if name not in METRICS:
        raise MetricConfigError(f"Unknown metric '{name}'; registered metrics: {', '.join(METRICS)}.")
    return METRICS[name].resolve_options(section.get(name))


def all_metric_options(params: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Every registered metric's checked options (``config.every_problem`` lists all the section's problems)."""
    return {name: metric_options(name, params) for name in METRICS}


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


def sort_ranks(table: pd.DataFrame, sort_columns: Sequence[str]) -> pd.Series:
    """Each image's rank under ``sort_columns`` (most significant first), tied images sharing one rank.

    Indexed by ``image_id``. Two metrics with equal ranks for every image put the images in
    the same batches whatever breaks their ties (``sort_batches`` breaks them by a seeded
    key of each image, the same for every metric).
    """
    keys = [table[column].to_numpy() for column in sort_columns]
    order = np.lexsort(keys[::-1])
    changes = np.zeros(len(table), dtype=bool)
    for key in keys:
        ordered = key[order]
        changes[1:] |= ordered[1:] != ordered[:-1]
    ranks = np.empty(len(table), dtype=np.int64)
    ranks[order] = np.cumsum(changes)
    return pd.Series(ranks, index=table["image_id"].to_numpy())


def uninformative_reason(
    name: str, table: pd.DataFrame, others: Mapping[str, pd.DataFrame], images: np.ndarray | None = None
) -> str | None:
    """Why metric ``name``'s scores carry no information of their own on these images (None: they do).

    Two cases: every image has the same sort key (the batches would follow the
    tie-break alone), or the images sort exactly as under another metric of ``others``,
    ties included (:func:`sort_ranks`; score tables of the same images; empty ones,
    skipped metrics, are ignored), so its batches would be that metric's. The metric's ``explain_degenerate`` hook, given
    ``images``, adds the reason in words (e.g. colour on grayscale images).
    """
    metric = METRICS[name]

    def explained(text: str) -> str:
        note = metric.explain_degenerate(images) if metric.explain_degenerate and images is not None else None
        return f"carries no information of its own on this data: {note}; {text}" if note else \
            f"carries no information of its own on this data: {text}"

    if len(table) < 2:
        return None
    keys = table.loc[:, list(metric.sort_columns)]
    if (keys.nunique(dropna=False) <= 1).all():
        return explained(f"all {len(table)} images have the same score, so its batches would follow the "
                         "tie-break alone")
    ranks = sort_ranks(table, metric.sort_columns)
    for other, other_table in others.items():
        columns = METRICS[other].sort_columns if other in METRICS else ()
        if other == name or len(other_table) != len(table) or not set(columns) <= set(other_table.columns):
            continue
        other_ranks = sort_ranks(other_table, columns)
        if not other_ranks.index.sort_values().equals(ranks.index.sort_values()):
            continue  # another image set (e.g. an older run's table): not comparable
        if (other_ranks.reindex(ranks.index).to_numpy() == ranks.to_numpy()).all():
            return explained(f"it orders the {len(table)} images exactly as '{other}' does, so its batches "
                             f"would be {other}'s (kept: {other})")
    return None


def _loud_skip_warning(name: str, reason: str) -> None:
    logger.warning(
        "\n%s\nMETRIC '%s' SKIPPED: %s\nIts orderings will be empty in every later table and report.\n%s",
        "!" * 78, name, reason, "!" * 78,
    )


def score_images(
    name: str,
    images: np.ndarray,
    image_ids: Sequence[int] | np.ndarray,
    params: Mapping[str, Any] | None,
    compare_with: Mapping[str, pd.DataFrame] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score ``images`` (uint8 ``N x H x W x 3``) with metric ``name``.

    Returns the score table (``image_id`` + the metric's score columns, one row per
    image in input order) and the status ``{"metric", "status": "ok"|"skipped",
    "reason"}`` (plus ``"provenance"`` for a metric that records one, e.g. the
    perceptual metric's weights). A metric that cannot run (e.g. LPIPS without its
    AlexNet weights) logs one loud warning and returns a zero-row table with status
    ``skipped``; with its ``strict`` option it raises :class:`MetricUnavailableError`
    instead. Every such check happens before any scoring.

    ``compare_with``: when given (the pipeline passes the score tables of the metrics
    registered before this one, on the same images), the scores are screened: a
    metric whose scores carry no information of their own (:func:`uninformative_reason`:
    one score for every image, or ordered exactly like one of these tables) is
    skipped the same way, with that reason. ``None`` scores without screening.
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
        _loud_skip_warning(name, reason)
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
    status: dict[str, Any] = {"metric": name, "status": "ok", "reason": None}
    if metric.provenance is not None:
        status["provenance"] = metric.provenance(options)
    reason = None if compare_with is None else uninformative_reason(name, table, compare_with, images)
    if reason is not None:
        _loud_skip_warning(name, reason)
        return metric.empty_scores(), {**status, "status": "skipped", "reason": reason}
    return table, status


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
