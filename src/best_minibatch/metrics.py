"""Image metrics that order the training set (the paper's section 3.2), in one registry.

Knows nothing of Kedro. Every metric is a plain function registered with
:func:`register_metric`; :data:`METRICS` holds them in registration order, which
is the order of the orderings (Kedro namespaces) in every pipeline. Adding a
metric takes one function and one registration in this file (see
``docs/adding_a_metric.md``).

A score function takes the images as a ``uint8`` array ``N x H x W x 3`` (RGB,
NHWC) and the metric's options (its defaults overlaid with the parameters under
``score_metrics.<name>``) and returns a table with ``N`` rows in image order:
column ``score`` (the primary value, used by batch summaries) plus every other
column named in the metric's ``sort_columns``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

ScoreFunction = Callable[[np.ndarray, Mapping[str, Any]], pd.DataFrame]
UnavailableReason = Callable[[Mapping[str, Any]], "str | None"]


class MetricConfigError(ValueError):
    """Parameters of a metric that cannot be used; the message names the parameter and the fix."""


class MetricUnavailableError(RuntimeError):
    """A metric that cannot run on this machine (e.g. missing pretrained weights) in strict mode."""


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


METRICS: dict[str, Metric] = {}


def register_metric(
    name: str,
    *,
    description: str,
    sort_columns: tuple[str, ...] = ("score",),
    defaults: Mapping[str, Any] | None = None,
    unavailable_reason: UnavailableReason | None = None,
) -> Callable[[ScoreFunction], ScoreFunction]:
    """Decorator: register ``function`` as the metric ``name`` (appended to :data:`METRICS`)."""

    def decorator(function: ScoreFunction) -> ScoreFunction:
        if name in METRICS:
            raise ValueError(f"Metric '{name}' is registered twice; metric names must be unique.")
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


# --------------------------------------------------------------------------- metrics
# Placeholder registrations so that other modules can import the registry; the
# implementations follow in this file.


@register_metric("intensity", description="M1: sum of all pixel values over all three channels.")
def intensity_score(images: np.ndarray, options: Mapping[str, Any]) -> pd.DataFrame:
    raise NotImplementedError("intensity: implementation in progress")


@register_metric(
    "color",
    description="M2: mean RGB colour as HSV (hue in degrees [0, 360)); sorted by hue, saturation, value.",
    sort_columns=("hue", "saturation", "value"),
)
def color_score(images: np.ndarray, options: Mapping[str, Any]) -> pd.DataFrame:
    raise NotImplementedError("color: implementation in progress")


@register_metric("edges", description="M3: number of Canny edge pixels of the grayscale image.")
def edges_score(images: np.ndarray, options: Mapping[str, Any]) -> pd.DataFrame:
    raise NotImplementedError("edges: implementation in progress")


@register_metric(
    "perceptual",
    description="M4: LPIPS (AlexNet, v0.1) distance to the training set's average image.",
)
def perceptual_score(images: np.ndarray, options: Mapping[str, Any]) -> pd.DataFrame:
    raise NotImplementedError("perceptual: implementation in progress")


@register_metric("random", description="Null control: a seeded uniform random score per image.")
def random_score(images: np.ndarray, options: Mapping[str, Any]) -> pd.DataFrame:
    raise NotImplementedError("random: implementation in progress")
