"""``batch_selection``'s parameters: the policies, the split, the statistics, over the shared recipe.

Knows nothing of Kedro. :meth:`SelectionConfig.from_params` reads the
``batch_selection`` section in the project's one parameter style
(:class:`best_minibatch.config.Section`) and trains with the shared
``training`` recipe, overridden by ``batch_selection.training``.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from best_minibatch.config import ConfigError, Section
from best_minibatch.training.recipe import TrainingRecipe

PARAMS_NAME = "batch_selection"
WHERE = "conf/<env>/parameters_batch_selection.yml"
POLICIES = ("shuffle", "class_balanced", "class_balanced_fixed", "fixed_random", "random_subset", "paper_advice",
            "learned", "oracle")
#: Batches holding (as nearly as the batch size allows) the same number of images of every class.
CLASS_BALANCED = ("class_balanced", "class_balanced_fixed")
BASELINE = "shuffle"
#: Trains on a random subset of the batches, as many as ``learned`` keeps: separates "fewer distinct
#: images" from "worse batches" for the policies that train on a fraction of the batches.
CONTROL = "random_subset"

#: Batch groups the paper's advice can keep, by rank position ``(k + 0.5) / K`` along the sorted order.
#: They are the groups ``distance_analysis`` tests the paper's claims on (``analysis.group_mask``).
ADVICE_GROUPS = ("upper_quartile", "lower_quartile", "middle_80", "extremes", "all")
#: Per-batch measures of ``distance_analysis`` where smaller means closer to the full gradient.
CLOSENESS_MEASURES = ("noise_z_mean", "noise_ratio_mean", "distance_mean", "relative_distance_mean")

#: ``seconds``: the loop's clock (training steps, drawing the epoch's batches, the oracle's probing);
#: ``total_seconds``: that plus the policy's up-front selection cost (``upfront_seconds``: the
#: measured seconds of the analysis whose distances ``learned`` uses), the wall-clock the
#: equal-wall-clock comparison reads.
CURVE_COLUMNS = [
    "seed", "policy", "epoch", "phase", "learning_rate", "step", "passes", "probe_passes",
    "seconds", "probe_seconds", "total_seconds", "train_loss", "val_loss", "val_accuracy",
]
RESULT_COLUMNS = [
    "seed", "policy", "steps", "passes", "probe_passes", "seconds", "probe_seconds", "upfront_seconds",
    "selection_seconds", "total_seconds", "final_val_accuracy", "test_loss", "test_accuracy",
    "distinct_images_trained",
]
POOL_COLUMNS = ["policy", "phase", "pool_batch", "source_ordering", "source_batch", "position", "image_ids"]
KNOWN = ("seeds", "policies", "validation", "target_validation_accuracy", "training", "fixed_random",
         "paper_advice", "learned", "oracle", "statistics")


class SelectionConfigError(ConfigError):
    """A ``batch_selection`` parameter that cannot work; the message names it and the fix."""


class SelectionDataError(ValueError):
    """Input tables that do not fit the experiment (missing orderings, empty pools, foreign ids)."""


def policy_rng(seed: int, policy: str, *names: object) -> np.random.Generator:
    """A generator that depends on the seed and the names only (stable across runs and policy order)."""
    key = "/".join(map(str, (policy, *names)))
    return np.random.default_rng([int(seed), zlib.crc32(key.encode())])


def kept_count(keep_fraction: float, num_batches: int) -> int:
    """How many of ``num_batches`` a policy keeping ``keep_fraction`` trains on: ``round(f K)``, at least 1.

    One rule for ``learned``, ``random_subset`` (with ``learned``'s fraction) and
    the oracle (of its candidates), so equal fractions keep equal counts.
    """
    return max(1, int(round(keep_fraction * num_batches)))


@dataclass(frozen=True)
class SelectionConfig:
    """Every ``batch_selection`` parameter, checked when built (before any output is written).

    ``recipe.batch_size`` is resolved: the recipe's own, else ``sort_batches.batch_size``.
    """

    seeds: tuple[int, ...]
    policies: tuple[str, ...]
    validation_fraction: float
    validation_seed: int
    target_validation_accuracy: float
    recipe: TrainingRecipe
    fixed_ordering: str
    paper_first_phase: Mapping[str, str]
    paper_later_phases: Mapping[str, str]
    learned_ordering: str
    learned_measure: str
    learned_keep_fraction: float
    learned_charge_distance_seconds: bool
    oracle_keep_fraction: float
    oracle_candidates: int | None
    oracle_memory_cap_gb: float
    confidence: float
    alpha: float

    @property
    def batch_size(self) -> int:
        return int(self.recipe.batch_size)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], training: Mapping[str, Any] | None = None,
                    sort_batch_size: int | None = None) -> SelectionConfig:
        """Parse and check the ``batch_selection`` section over the shared ``training`` recipe."""
        section = Section(params, PARAMS_NAME, KNOWN, SelectionConfigError, WHERE)
        seeds = section.seeds("seeds", None, "Use e.g. [0, 1, 2, 3, 4] (at least 5 for the issue's protocol).")
        policies = _policies(section)
        validation = section.section("validation", ("fraction", "seed"))
        fraction = validation.number("fraction", 0.2, "Use e.g. 0.2 (a fifth of each class is held out).",
                                     low=0, high=1, low_open=True, high_open=True)
        validation_seed = validation.integer("seed", 0, 0, "Use e.g. 12345.")
        target = section.number("target_validation_accuracy", None,
                                "Fix it before the run, e.g. 0.45 (see docs/batch_selection.md for how).",
                                low=0, high=1, low_open=True, high_open=True)
        recipe = TrainingRecipe.from_params(training, section.get("training") or {},
                                            override_path=f"{PARAMS_NAME}.training",
                                            error_type=SelectionConfigError, where=WHERE)
        batch_size = recipe.batch_size if recipe.batch_size is not None else sort_batch_size
        if batch_size is None:
            raise section.error("training.batch_size", "no batch size is known",
                                "Set sort_batches.batch_size (the recipe's batch_size: null follows it).")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 2:
            raise section.error("training.batch_size", f"must be an integer >= 2, got {batch_size!r}",
                                "Use e.g. 64 (BatchNorm needs at least 2 images per batch).")
        recipe = dataclasses.replace(recipe, batch_size=int(batch_size))

        fixed = section.section("fixed_random", ("ordering",))
        fixed_ordering = fixed.get("ordering", "random")
        if not isinstance(fixed_ordering, str):
            raise fixed.error("ordering", f"expected an ordering name, got {fixed_ordering!r}",
                              "Use random (the null control).")
        advice = section.section("paper_advice", ("first_phase", "later_phases"))
        first = _advice(advice, "first_phase", {"intensity": "upper_quartile", "perceptual": "upper_quartile"})
        later = _advice(advice, "later_phases", {m: "middle_80" for m in ("intensity", "color", "edges", "perceptual")})
        learned = section.section("learned", ("ordering", "measure", "keep_fraction", "charge_distance_seconds"))
        learned_ordering = learned.get("ordering", "intensity")
        if not isinstance(learned_ordering, str):
            raise learned.error("ordering", f"expected an ordering name, got {learned_ordering!r}",
                                "Use one of the metrics, e.g. intensity.")
        measure = learned.get("measure", "noise_z_mean")
        if measure not in CLOSENESS_MEASURES:
            raise learned.error("measure", f"unknown or not distance-like measure {measure!r}",
                                f"Use one of {', '.join(CLOSENESS_MEASURES)} (smaller = closer).")
        oracle = section.section("oracle", ("keep_fraction", "candidates", "memory_cap_gb"))
        statistics = section.section("statistics", ("confidence", "alpha"))
        return cls(
            seeds=seeds, policies=policies,
            validation_fraction=fraction, validation_seed=validation_seed, target_validation_accuracy=target,
            recipe=recipe, fixed_ordering=fixed_ordering, paper_first_phase=first, paper_later_phases=later,
            learned_ordering=learned_ordering, learned_measure=measure,
            learned_keep_fraction=_fraction(learned, "keep_fraction"),
            learned_charge_distance_seconds=learned.boolean("charge_distance_seconds", True),
            oracle_keep_fraction=_fraction(oracle, "keep_fraction"),
            oracle_candidates=oracle.integer("candidates", None, 1, "null probes every batch of a fresh random "
                                             "partition (K candidates).", optional=True),
            oracle_memory_cap_gb=oracle.number("memory_cap_gb", 2.0, "Gradients beyond it are buffered in a "
                                               "scratch file; use e.g. 2.", low=0),
            confidence=statistics.number("confidence", 0.95, "Use 0.95.", low=0, high=1, low_open=True,
                                         high_open=True),
            alpha=statistics.number("alpha", 0.05, "Use 0.05.", low=0, high=1, low_open=True, high_open=True),
        )


def _policies(section: Section) -> tuple[str, ...]:
    policies = section.get("policies", list(POLICIES))
    if not isinstance(policies, (list, tuple)) or not policies:
        raise section.error("policies", f"expected a non-empty list, got {policies!r}",
                            f"Choose from {', '.join(POLICIES)}.")
    if bad := [p for p in policies if p not in POLICIES]:
        raise section.error("policies", f"unknown policies {bad}", f"Choose from {', '.join(POLICIES)}.")
    if BASELINE not in policies:
        raise section.error("policies", f"the baseline '{BASELINE}' is missing",
                            "Every comparison is against shuffle; keep it in the list.")
    if len(set(policies)) != len(policies):
        raise section.error("policies", f"lists a policy twice: {policies!r}", "List each policy once.")
    if CONTROL in policies and "fixed_random" not in policies:
        raise section.error("policies", f"'{CONTROL}' is listed without 'fixed_random'",
                            f"{CONTROL} draws its batches from fixed_random's ordering, whose batches are only "
                            "prepared when fixed_random runs; list fixed_random too.")
    return tuple(policies)


def _fraction(section: Section, key: str) -> float:
    return section.number(key, 0.25, "Use e.g. 0.25.", low=0, high=1, low_open=True)


def _advice(section: Section, key: str, default: Mapping[str, str]) -> dict[str, str]:
    advice = section.get(key, default)
    if not isinstance(advice, Mapping) or not advice:
        raise section.error(key, f"expected a non-empty mapping ordering -> group, got {advice!r}",
                            f"Write e.g. {{intensity: upper_quartile}}; groups: {', '.join(ADVICE_GROUPS)}.")
    for ordering, group in advice.items():
        if group not in ADVICE_GROUPS:
            raise section.error(f"{key}.{ordering}", f"unknown group {group!r}",
                                f"Use one of {', '.join(ADVICE_GROUPS)}.")
    return dict(advice)
