"""Errors and option checks shared by every metric (Kedro-free, no torch)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


class MetricConfigError(ValueError):
    """Parameters of a metric that cannot be used; the message names the parameter and the fix."""


class MetricUnavailableError(RuntimeError):
    """A metric that cannot run here (e.g. missing pretrained weights) while its ``strict`` option is on."""


def require_int(options: Mapping[str, Any], metric: str, key: str, minimum: int) -> int:
    """``options[key]`` as an int of at least ``minimum``, else :class:`MetricConfigError` naming the parameter."""
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise MetricConfigError(
            f"score_metrics.{metric}.{key} must be an integer >= {minimum}, got {value!r}. "
            "Fix it in conf/<env>/parameters_score_metrics.yml."
        )
    return int(value)


def require_number(options: Mapping[str, Any], metric: str, key: str, minimum: float) -> float:
    """``options[key]`` as a float of at least ``minimum``, else :class:`MetricConfigError` naming the parameter."""
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not value >= minimum:
        raise MetricConfigError(
            f"score_metrics.{metric}.{key} must be a number >= {minimum}, got {value!r}. "
            "Fix it in conf/<env>/parameters_score_metrics.yml."
        )
    return float(value)


def require_bool(options: Mapping[str, Any], metric: str, key: str) -> bool:
    """``options[key]`` when it is true or false, else :class:`MetricConfigError` naming the parameter."""
    value = options[key]
    if not isinstance(value, bool):
        raise MetricConfigError(f"score_metrics.{metric}.{key} must be true or false, got {value!r}.")
    return value
