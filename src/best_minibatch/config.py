"""One style for every parameter section: typed configs that check themselves when built.

Knows nothing of Kedro. Each section (``training``, ``gradient_training``,
``batch_selection``, ...) has a frozen dataclass with a ``from_params``
classmethod that reads its YAML mapping through a :class:`Section`, which
refuses unknown keys (suggesting the closest known one) and checks each value's
type and range. Every problem is a :class:`ConfigError` naming the parameter's
full path and the fix, so a message reads the same whichever section it comes
from; :func:`every_problem` lists every problem of a section at once. Checks that
span sections (the batch size both experiments must share) live in
:mod:`best_minibatch.kedro_glue.run_checks`, which the run checks (``kedro_glue.hooks.RunChecks``)
call to build every section a run reads before its first node.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np


class ConfigError(ValueError):
    """A parameter that cannot work; the message names it (``section.key``) and the fix."""

    def __init__(self, key: str, problem: str, fix: str, where: str | None = None) -> None:
        self.key = key
        where = f" ({where})" if where else ""
        super().__init__(f"Parameter {key}: {problem}. {fix}{where}".rstrip())


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)


def closest(key: str, known: Iterable[str]) -> str:
    """``" Did you mean 'x'?"`` for the known key closest to a misspelled one, else ``""``."""
    match = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
    return f" Did you mean '{match[0]}'?" if match else ""


class Section:
    """A parameter mapping at ``path`` with a fixed set of known keys.

    ``error_type`` lets a section raise its own subclass of :class:`ConfigError`
    (for callers that catch one experiment's errors).
    """

    def __init__(self, params: Any, path: str, known: Iterable[str], error_type: type[ConfigError] = ConfigError,
                 where: str | Callable[[str], str | None] | None = None) -> None:
        self.path, self.error_type, self.where = path, error_type, where
        self.known = frozenset(known)
        if params is None:
            params = {}
        if not isinstance(params, Mapping):
            raise self.error("", f"expected a mapping, got {params!r}", "Write it as a YAML mapping.")
        unknown = sorted(map(str, set(params) - self.known))
        if unknown:
            raise self.error(unknown[0], "unknown parameter",
                             f"Known parameters: {', '.join(sorted(self.known))}.{closest(unknown[0], self.known)}")
        self.params = dict(params)

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if name else self.path

    def error(self, name: str, problem: str, fix: str) -> ConfigError:
        """``where`` (when a function) names the file that sets this key (a layered configuration)."""
        where = self.where(self.key(name)) if callable(self.where) else self.where
        return self.error_type(self.key(name), problem, fix, where)

    def __contains__(self, name: str) -> bool:
        return name in self.params

    def get(self, name: str, default: Any = None) -> Any:
        return self.params.get(name, default)

    def section(self, name: str, known: Iterable[str]) -> Section:
        return Section(self.params.get(name), self.key(name), known, self.error_type, self.where)

    # ------------------------------------------------------------------ typed reads

    def integer(self, name: str, default: Any, minimum: int, fix: str, *, optional: bool = False) -> int | None:
        value = self.params.get(name, default)
        if optional and value is None:
            return None
        if not is_int(value) or value < minimum:
            kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer of at least {minimum}")
            raise self.error(name, f"must be {kind}{' or null' if optional else ''}, got {value!r}", fix)
        return int(value)

    def number(self, name: str, default: Any, fix: str, *, low: float = -math.inf, high: float = math.inf,
               low_open: bool = False, high_open: bool = False) -> float:
        value = self.params.get(name, default)
        if not is_number(value) or value < low or value > high or (low_open and value == low) or (
                high_open and value == high):
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            if high == math.inf:
                expected = "a positive number" if low == 0 and low_open else "a non-negative number" if low == 0 \
                    else f"a number of at least {low:g}"
            else:
                expected = f"a number in {left}{low:g}, {high:g}{right}"
            raise self.error(name, f"must be {expected}, got {value!r}", fix)
        return float(value)

    def boolean(self, name: str, default: bool, fix: str = "Use true or false.") -> bool:
        value = self.params.get(name, default)
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false, got {value!r}", fix)
        return value

    def text(self, name: str, default: Any, fix: str, *, optional: bool = False) -> str | None:
        """A non-empty string (``optional``: or null)."""
        value = self.params.get(name, default)
        if optional and value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.error(name, f"must be a non-empty text{' or null' if optional else ''}, got {value!r}", fix)
        return value

    def required(self, name: str, fix: str) -> None:
        """Refuse a section without ``name`` (read it with a typed read afterwards)."""
        if name not in self.params:
            raise self.error(name, "is missing", fix)

    def seeds(self, name: str, default: Any, fix: str) -> tuple[int, ...]:
        """A non-empty list of distinct non-negative integers (the one reader of every ``seeds`` list)."""
        seeds = self.params.get(name, default)
        if (not isinstance(seeds, (list, tuple)) or not seeds
                or any(not is_int(s) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds)):
            raise self.error(name, f"expected a non-empty list of distinct non-negative integers, got {seeds!r}", fix)
        return tuple(int(s) for s in seeds)

    def choice(self, name: str, default: Any, choices: Iterable[Any]) -> Any:
        value = self.params.get(name, default)
        choices = tuple(choices)
        if value not in choices:
            raise self.error(name, f"unknown value {value!r}",
                             f"Use one of {', '.join(map(str, choices))}.{closest(str(value), map(str, choices))}")
        return value


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any] | None) -> dict[str, Any]:
    """``override`` laid over ``base``, mapping by mapping (as Kedro's soft merge of environments)."""
    merged = dict(base)
    for key, value in (override or {}).items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def every_problem(build: Callable[[Any], Any], params: Any, path: str, also: Iterable[str] = ()) -> Any:
    """``build(params)``, or a ValueError listing every problem of the section, not only the first.

    A section's config stops at its first bad key. Each time it does, the key it names
    (:attr:`ConfigError.key`, under ``path``) is taken out -- it falls back to its default --
    and the section is built again with every other key as given, until it builds, the
    problem names no key that was given, or it names a key taken out (a required one).
    Every message is listed once, joined by ``"\n  - "`` (the run checks list them one per
    line); ``also`` adds problems found outside ``build``. The error raised is of the first
    problem's class.
    """
    config, errors = _build_without_bad_keys(build, params, path)
    problems = list(also)
    for error in errors:
        problems.extend(p for p in str(error).split("\n  - ") if p not in problems)
    if not problems:
        return config
    if not errors:
        raise ValueError("\n  - ".join(problems))
    first = errors[0]
    if [str(first)] == problems:
        raise first
    # The first error's class (a caller may catch it) and attributes, every problem in its message.
    combined = type(first).__new__(type(first))
    combined.__dict__.update(first.__dict__)
    combined.args = ("\n  - ".join(problems),)
    raise combined from first


def despite_bad_keys(build: Callable[[Any], Any], params: Any, path: str) -> Any:
    """``build(params)`` with its bad keys at their defaults (None when it cannot be built so).

    For checks of other sections that read this one: its own check reports the bad keys,
    and a good ``batch_size`` is still read when ``tie_seed`` is bad.
    """
    return _build_without_bad_keys(build, params, path)[0]


def _build_without_bad_keys(build: Callable[[Any], Any], params: Any, path: str) -> tuple[Any, list[ValueError]]:
    """The config built once every bad key is taken out (None: it cannot be), and the errors on the way."""
    remaining = _copy_mappings(params)
    errors: list[ValueError] = []
    removed: set[str | None] = set()
    for _ in range(_count_keys(params) + 1):
        try:
            return build(remaining), errors
        except ValueError as error:  # a ConfigError names its key; any other problem ends the search
            if errors and getattr(error, "key", None) in removed:
                break  # a required key taken out is missing now: no problem of the user's
            errors.append(error)
            removed.add(getattr(error, "key", None))
            if not isinstance(error, ConfigError) or not _remove(remaining, error.key, path):
                break
    return None, errors


def _copy_mappings(params: Any) -> Any:
    return {k: _copy_mappings(v) for k, v in params.items()} if isinstance(params, Mapping) else params


def _count_keys(params: Any) -> int:
    return sum(1 + _count_keys(v) for v in params.values()) if isinstance(params, Mapping) else 0


def _remove(params: Any, key: str, path: str) -> bool:
    """Remove ``key`` (``<path>.a.b``, or ``<path>.a.b[0]...``) from ``params``; whether it was there."""
    if not key.startswith(f"{path}.") or not isinstance(params, dict):
        return False
    parts = key[len(path) + 1:].split("[")[0].split(".")
    for part in parts[:-1]:
        params = params.get(part)
        if not isinstance(params, dict):
            return False
    return params.pop(parts[-1], _MISSING) is not _MISSING


_MISSING = object()
