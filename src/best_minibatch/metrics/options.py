"""Errors and the parameter section shared by every metric (Kedro-free, no torch)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from best_minibatch.config import ConfigError, Section

#: Where a run's metric options are written.
WHERE = "conf/<env>/parameters_score_metrics.yml"


class MetricConfigError(ValueError):
    """Parameters of a metric that cannot be used; the message names the parameter and the fix."""


class MetricOptionError(ConfigError, MetricConfigError):
    """A ``score_metrics`` parameter that cannot work (a :class:`~best_minibatch.config.ConfigError`)."""


class MetricUnavailableError(RuntimeError):
    """A metric that cannot run here (e.g. missing pretrained weights) while its ``strict`` option is on."""


def options_section(metric: str, overrides: Any, defaults: Mapping[str, Any]) -> Section:
    """``score_metrics.<metric>``: only the registered options are known; every read falls back to its default."""
    section = Section(overrides, f"score_metrics.{metric}", defaults, MetricOptionError, WHERE)
    section.params = {**defaults, **section.params}
    return section


def metrics_section(params: Any, metrics: Iterable[str]) -> Section:
    """The ``score_metrics`` section: one key per registered metric."""
    return Section(params, "score_metrics", metrics, MetricOptionError, WHERE)
