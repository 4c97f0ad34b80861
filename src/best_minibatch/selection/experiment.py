"""Batch selection: does training on the "best" mini-batches converge faster than shuffling?

Knows nothing of Kedro. This module holds the six policies compared by the
``batch_selection`` pipeline (the paper's open question, section 5, future work
2) and the training loop that runs them; ``selection_stats.py`` holds the
statistics and the report. ``docs/batch_selection.md`` states every policy
precisely.

Every policy answers one question per epoch: which ``K`` mini-batches (arrays of
``m`` image ids) to take the epoch's ``K`` optimizer steps on, where ``K =
floor(N / m)`` for the ``N`` training images (the training images minus a held-out
validation split). All policies therefore take exactly the same number of steps
per epoch and in total; a policy that trains on a subset of batches cycles
through that subset. Only training image ids are ever returned (the runner
checks this on every epoch).

* ``shuffle`` - a fresh random partition every epoch (the usual baseline).
* ``fixed_random`` - the ``random`` ordering's batches, in the same order every
  epoch (the paper's null: ``net_normal`` without shuffling).
* ``random_subset`` - per phase, a random subset (drawn per seed) of those
  batches, as many as ``learned`` keeps, cycled: the control for training on a
  fraction of the batches, without choosing which.
* ``paper_advice`` - per phase, the union of the batches that section 5
  recommends, taken from each metric's sorted batching.
* ``learned`` - per phase, the batches of one metric's ordering that
  ``distance_analysis`` found closest to the full gradient (in noise units).
* ``oracle`` - at each epoch start, probes a fresh random partition at the
  current parameters and trains on the batches closest to their mean gradient.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from best_minibatch.training.runtime import deterministic_algorithms
from best_minibatch.analysis.statistics import EXTREMES, UPPER_QUARTILE, group_mask
from best_minibatch.batches.batching import assign_batches
from best_minibatch.data.images import augment, batch_generator, to_model_input
from best_minibatch.training.models import MODELS
from best_minibatch.training.probing import EpochGradients, batch_gradient

logger = logging.getLogger(__name__)

PARAMS_NAME = "batch_selection"
POLICIES = ("shuffle", "fixed_random", "random_subset", "paper_advice", "learned", "oracle")
BASELINE = "shuffle"
#: Trains on a random subset of the batches, as many as ``learned`` keeps: separates "fewer distinct
#: images" from "worse batches" for the policies that train on a fraction of the batches.
CONTROL = "random_subset"
DEVICES = ("auto", "cpu", "cuda")
GIB = 2**30

#: Batch groups the paper's advice can keep, by rank position ``(k + 0.5) / K`` along the sorted order.
#: They are the groups ``distance_analysis`` tests the paper's claims on (``analysis.group_mask``).
ADVICE_GROUPS = ("upper_quartile", "lower_quartile", "middle_80", "extremes", "all")
#: Per-batch measures of ``distance_analysis`` where smaller means closer to the full gradient.
CLOSENESS_MEASURES = ("noise_z_mean", "noise_ratio_mean", "distance_mean", "relative_distance_mean")

CURVE_COLUMNS = [
    "seed", "policy", "epoch", "phase", "learning_rate", "step", "passes", "probe_passes",
    "seconds", "probe_seconds", "train_loss", "val_loss", "val_accuracy",
]
RESULT_COLUMNS = [
    "seed", "policy", "steps", "passes", "probe_passes", "seconds", "probe_seconds",
    "final_val_accuracy", "test_loss", "test_accuracy", "distinct_images_trained",
]
POOL_COLUMNS = ["policy", "phase", "pool_batch", "source_ordering", "source_batch", "position", "image_ids"]


class SelectionConfigError(ValueError):
    """A ``batch_selection`` parameter that cannot work; the message names it and the fix."""


class SelectionDataError(ValueError):
    """Input tables that do not fit the experiment (missing orderings, empty pools, foreign ids)."""


def _config_error(key: str, problem: str, fix: str) -> SelectionConfigError:
    return SelectionConfigError(
        f"Parameter {PARAMS_NAME}.{key}: {problem}. {fix} "
        "(conf/<env>/parameters_batch_selection.yml)"
    )


def policy_rng(seed: int, policy: str, *names: object) -> np.random.Generator:
    """A generator that depends on the seed and the names only (stable across runs and policy order)."""
    key = "/".join(map(str, (policy, *names)))
    return np.random.default_rng([int(seed), zlib.crc32(key.encode())])


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Phase:
    epochs: int
    learning_rate: float


@dataclass(frozen=True)
class TrainingRecipe:
    """The recipe every policy shares: same model, batch size, schedule, optimizer, augmentation."""

    phases: tuple[Phase, ...]
    batch_size: int
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = False
    evaluations_per_epoch: int = 1
    eval_batch_size: int = 1000

    @property
    def num_epochs(self) -> int:
        return sum(p.epochs for p in self.phases)

    @property
    def num_phases(self) -> int:
        return len(self.phases)

    def epoch_plan(self) -> list[tuple[int, int, float]]:
        """``(epoch, phase, learning_rate)`` for epochs 1..E (phases 1-based)."""
        plan = []
        for phase, spec in enumerate(self.phases, start=1):
            plan.extend((len(plan) + 1, phase, spec.learning_rate) for _ in range(spec.epochs))
        return plan


@dataclass(frozen=True)
class SelectionConfig:
    """Every ``batch_selection`` parameter, checked when built (before any output is written)."""

    seeds: tuple[int, ...]
    policies: tuple[str, ...]
    validation_fraction: float
    validation_seed: int
    target_validation_accuracy: float
    model_name: str
    model_options: Mapping[str, Any]
    recipe: TrainingRecipe
    device: str
    deterministic: bool
    fixed_ordering: str
    paper_first_phase: Mapping[str, str]
    paper_later_phases: Mapping[str, str]
    learned_ordering: str
    learned_measure: str
    learned_keep_fraction: float
    oracle_keep_fraction: float
    oracle_candidates: int | None
    oracle_memory_cap_gb: float
    confidence: float
    alpha: float
    cpu_threads: int | None = None
    progress_bar: bool = True

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "SelectionConfig":
        """Parse and check the ``batch_selection`` parameters dict."""
        if not isinstance(params, Mapping):
            raise _config_error("", f"expected a mapping, got {type(params).__name__}", "Write it as a YAML mapping.")
        known = {"seeds", "policies", "validation", "target_validation_accuracy", "model", "training",
                 "fixed_random", "paper_advice", "learned", "oracle", "statistics", "progress_bar"}
        if unknown := sorted(set(params) - known):
            raise _config_error(unknown[0], "unknown parameter", f"Known parameters: {', '.join(sorted(known))}.")

        seeds = params.get("seeds")
        if (not isinstance(seeds, (list, tuple)) or not seeds
                or any(not _is_int(s) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds)):
            raise _config_error("seeds", f"expected a list of distinct non-negative integers, got {seeds!r}",
                                "Use e.g. [0, 1, 2, 3, 4] (at least 5 for the issue's protocol).")
        policies = params.get("policies", list(POLICIES))
        if not isinstance(policies, (list, tuple)) or not policies:
            raise _config_error("policies", f"expected a non-empty list, got {policies!r}",
                                f"Choose from {', '.join(POLICIES)}.")
        if bad := [p for p in policies if p not in POLICIES]:
            raise _config_error("policies", f"unknown policies {bad}", f"Choose from {', '.join(POLICIES)}.")
        if BASELINE not in policies:
            raise _config_error("policies", f"the baseline '{BASELINE}' is missing",
                                "Every comparison is against shuffle; keep it in the list.")
        if len(set(policies)) != len(policies):
            raise _config_error("policies", f"lists a policy twice: {policies!r}", "List each policy once.")
        if CONTROL in policies and "fixed_random" not in policies:
            raise _config_error("policies", f"'{CONTROL}' is listed without 'fixed_random'",
                                f"{CONTROL} draws its batches from fixed_random's ordering, whose batches are only "
                                "prepared when fixed_random runs; list fixed_random too.")

        validation = _section(params, "validation", {"fraction", "seed"})
        fraction = validation.get("fraction", 0.2)
        if not _is_number(fraction) or not 0 < fraction < 1:
            raise _config_error("validation.fraction", f"must be a number in (0, 1), got {fraction!r}",
                                "Use e.g. 0.2 (a fifth of each class is held out).")
        validation_seed = validation.get("seed", 0)
        if not _is_int(validation_seed) or validation_seed < 0:
            raise _config_error("validation.seed", f"must be a non-negative integer, got {validation_seed!r}",
                                "Use e.g. 12345.")

        target = params.get("target_validation_accuracy")
        if not _is_number(target) or not 0 < target < 1:
            raise _config_error("target_validation_accuracy", f"must be a number in (0, 1), got {target!r}",
                                "Fix it before the run, e.g. 0.45 (see docs/batch_selection.md for how).")

        # Options per model (only the named model's apply), as in gradient_training: environments merge
        # softly, so a single `options` block of the base model would leak into conf/paper's model.
        model = _section(params, "model", {"name", *MODELS})
        model_name = model.get("name", "small_cnn")
        if not isinstance(model_name, str) or not model_name:
            raise _config_error("model.name", f"expected a model name, got {model_name!r}", "Use e.g. small_cnn.")
        if model_name not in MODELS:
            raise _config_error("model.name", f"unknown model {model_name!r}", f"Use one of {', '.join(sorted(MODELS))}.")
        for name in sorted(set(model) - {"name"}):
            if model[name] is not None and not isinstance(model[name], Mapping):
                raise _config_error(f"model.{name}", f"expected a mapping of {name}'s options, got {model[name]!r}",
                                    "Use e.g. {width: 16}.")
        model_options = model.get(model_name) or {}
        accepted = set(inspect.signature(MODELS[model_name]).parameters) - {"num_classes"}
        if unknown_options := sorted(set(model_options) - accepted):
            raise _config_error(f"model.{model_name}.{unknown_options[0]}", f"{model_name} does not take this option",
                                f"It takes {sorted(accepted) or 'no options'}.")

        training = _section(params, "training", {"batch_size", "phases", "momentum", "weight_decay", "augment",
                                                 "evaluations_per_epoch", "eval_batch_size", "device",
                                                 "deterministic", "cpu_threads"})
        recipe = _parse_recipe(training)
        device = training.get("device", "auto")
        if device not in DEVICES:
            raise _config_error("training.device", f"unknown device {device!r}", f"Use one of {', '.join(DEVICES)}.")
        if device == "cuda" and not torch.cuda.is_available():
            raise _config_error("training.device", "cuda was asked for but no CUDA device is visible",
                                "Use auto (CUDA when present, else CPU) or cpu.")
        deterministic = training.get("deterministic", True)
        if not isinstance(deterministic, bool):
            raise _config_error("training.deterministic", f"must be true or false, got {deterministic!r}",
                                "Use true for bit-for-bit CPU reruns.")

        threads = training.get("cpu_threads")
        if threads is not None and (not _is_int(threads) or threads < 1):
            raise _config_error("training.cpu_threads", f"must be null or a positive integer, got {threads!r}",
                                "null keeps torch's default; 1 or 2 on the 2-core machine.")

        fixed = _section(params, "fixed_random", {"ordering"})
        fixed_ordering = fixed.get("ordering", "random")
        if not isinstance(fixed_ordering, str):
            raise _config_error("fixed_random.ordering", f"expected an ordering name, got {fixed_ordering!r}",
                                "Use random (the null control).")

        advice = _section(params, "paper_advice", {"first_phase", "later_phases"})
        first = _parse_advice(advice.get("first_phase", {"intensity": "upper_quartile",
                                                          "perceptual": "upper_quartile"}), "first_phase")
        later = _parse_advice(advice.get("later_phases", {m: "middle_80" for m in
                                                           ("intensity", "color", "edges", "perceptual")}),
                              "later_phases")

        learned = _section(params, "learned", {"ordering", "measure", "keep_fraction"})
        learned_ordering = learned.get("ordering", "intensity")
        if not isinstance(learned_ordering, str):
            raise _config_error("learned.ordering", f"expected an ordering name, got {learned_ordering!r}",
                                "Use one of the metrics, e.g. intensity.")
        measure = learned.get("measure", "noise_z_mean")
        if measure not in CLOSENESS_MEASURES:
            raise _config_error("learned.measure", f"unknown or not distance-like measure {measure!r}",
                                f"Use one of {', '.join(CLOSENESS_MEASURES)} (smaller = closer).")
        learned_keep = _fraction(learned, "learned", "keep_fraction", 0.25)

        oracle = _section(params, "oracle", {"keep_fraction", "candidates", "memory_cap_gb"})
        oracle_keep = _fraction(oracle, "oracle", "keep_fraction", 0.25)
        candidates = oracle.get("candidates")
        if candidates is not None and (not _is_int(candidates) or candidates < 1):
            raise _config_error("oracle.candidates", f"must be null or a positive integer, got {candidates!r}",
                                "null probes every batch of a fresh random partition (K candidates).")
        memory_cap = oracle.get("memory_cap_gb", 2.0)
        if not _is_number(memory_cap) or memory_cap < 0:
            raise _config_error("oracle.memory_cap_gb", f"must be a non-negative number, got {memory_cap!r}",
                                "Gradients beyond it are buffered in a scratch file; use e.g. 2.")

        statistics = _section(params, "statistics", {"confidence", "alpha"})
        confidence = statistics.get("confidence", 0.95)
        alpha = statistics.get("alpha", 0.05)
        for key, value in (("confidence", confidence), ("alpha", alpha)):
            if not _is_number(value) or not 0 < value < 1:
                raise _config_error(f"statistics.{key}", f"must be in (0, 1), got {value!r}", "Use 0.95 and 0.05.")
        progress_bar = params.get("progress_bar", True)
        if not isinstance(progress_bar, bool):
            raise _config_error("progress_bar", f"must be true or false, got {progress_bar!r}", "Use true.")

        return cls(
            seeds=tuple(int(s) for s in seeds), policies=tuple(policies),
            validation_fraction=float(fraction), validation_seed=int(validation_seed),
            target_validation_accuracy=float(target), model_name=model_name, model_options=dict(model_options),
            recipe=recipe, device=device, deterministic=deterministic, fixed_ordering=fixed_ordering,
            paper_first_phase=first, paper_later_phases=later, learned_ordering=learned_ordering,
            learned_measure=measure, learned_keep_fraction=learned_keep, oracle_keep_fraction=oracle_keep,
            oracle_candidates=None if candidates is None else int(candidates),
            oracle_memory_cap_gb=float(memory_cap), confidence=float(confidence), alpha=float(alpha),
            cpu_threads=None if threads is None else int(threads), progress_bar=progress_bar,
        )

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)


def _section(params: Mapping[str, Any], key: str, allowed: set[str]) -> Mapping[str, Any]:
    section = params.get(key) or {}
    if not isinstance(section, Mapping):
        raise _config_error(key, f"expected a mapping, got {section!r}", "Write it as a YAML mapping.")
    if unknown := sorted(set(section) - allowed):
        raise _config_error(f"{key}.{unknown[0]}", "unknown parameter", f"Known: {', '.join(sorted(allowed))}.")
    return section


def _fraction(section: Mapping[str, Any], name: str, key: str, default: float) -> float:
    value = section.get(key, default)
    if not _is_number(value) or not 0 < value <= 1:
        raise _config_error(f"{name}.{key}", f"must be a number in (0, 1], got {value!r}", "Use e.g. 0.25.")
    return float(value)


def kept_count(keep_fraction: float, num_batches: int) -> int:
    """How many of ``num_batches`` a policy keeping ``keep_fraction`` trains on: ``round(f K)``, at least 1.

    One rule for ``learned``, ``random_subset`` (with ``learned``'s fraction) and
    the oracle (of its candidates), so equal fractions keep equal counts.
    """
    return max(1, int(round(keep_fraction * num_batches)))


def _parse_recipe(training: Mapping[str, Any]) -> TrainingRecipe:
    batch_size = training.get("batch_size")
    if not _is_int(batch_size) or batch_size < 2:
        raise _config_error("training.batch_size", f"must be an integer >= 2, got {batch_size!r}",
                            "Use e.g. 64 (BatchNorm needs at least 2 images per batch).")
    phases = training.get("phases")
    if not isinstance(phases, (list, tuple)) or not phases:
        raise _config_error("training.phases", f"expected a list of {{epochs, lr}}, got {phases!r}",
                            "Write e.g. [{epochs: 4, lr: 0.05}, {epochs: 2, lr: 0.005}].")
    parsed = []
    for i, phase in enumerate(phases):
        if not isinstance(phase, Mapping) or set(phase) != {"epochs", "lr"}:
            raise _config_error(f"training.phases[{i}]", f"expected {{epochs: N, lr: X}}, got {phase!r}",
                                "Each phase needs exactly the keys epochs and lr.")
        if not _is_int(phase["epochs"]) or phase["epochs"] < 1:
            raise _config_error(f"training.phases[{i}].epochs", f"must be a positive integer, got {phase['epochs']!r}",
                                "Set how many epochs the phase lasts.")
        if not _is_number(phase["lr"]) or phase["lr"] <= 0:
            raise _config_error(f"training.phases[{i}].lr", f"must be a positive number, got {phase['lr']!r}",
                                "Set the phase's learning rate, e.g. 0.05.")
        parsed.append(Phase(int(phase["epochs"]), float(phase["lr"])))
    for key, default in (("momentum", 0.9), ("weight_decay", 5e-4)):
        value = training.get(key, default)
        if not _is_number(value) or value < 0:
            raise _config_error(f"training.{key}", f"must be a non-negative number, got {value!r}",
                                "The paper's recipe uses momentum 0.9 and weight decay 5e-4.")
    augment_flag = training.get("augment", False)
    if not isinstance(augment_flag, bool):
        raise _config_error("training.augment", f"must be true or false, got {augment_flag!r}", "Use false or true.")
    for key, default in (("evaluations_per_epoch", 1), ("eval_batch_size", 1000)):
        value = training.get(key, default)
        if not _is_int(value) or value < 1:
            raise _config_error(f"training.{key}", f"must be a positive integer, got {value!r}", "Use e.g. 2 or 1000.")
    return TrainingRecipe(
        phases=tuple(parsed), batch_size=int(batch_size),
        momentum=float(training.get("momentum", 0.9)), weight_decay=float(training.get("weight_decay", 5e-4)),
        augment=augment_flag, evaluations_per_epoch=int(training.get("evaluations_per_epoch", 1)),
        eval_batch_size=int(training.get("eval_batch_size", 1000)),
    )


def _parse_advice(advice: Any, key: str) -> dict[str, str]:
    if not isinstance(advice, Mapping) or not advice:
        raise _config_error(f"paper_advice.{key}", f"expected a non-empty mapping ordering -> group, got {advice!r}",
                            f"Write e.g. {{intensity: upper_quartile}}; groups: {', '.join(ADVICE_GROUPS)}.")
    for ordering, group in advice.items():
        if group not in ADVICE_GROUPS:
            raise _config_error(f"paper_advice.{key}.{ordering}", f"unknown group {group!r}",
                                f"Use one of {', '.join(ADVICE_GROUPS)}.")
    return dict(advice)


# --------------------------------------------------------------------------- validation split


def stratified_validation_split(image_index: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Hold out ``round(fraction * n_c)`` training images of every class ``c`` for validation.

    Returns one row per training image of ``image_index``: ``image_id``, ``label``
    and ``subset`` (``train`` or ``validation``), sorted by ``image_id``. The draw
    depends on ``seed`` and the class only. Every class keeps at least one image
    on each side; a class with fewer than two images is an error.
    """
    missing = [c for c in ("image_id", "split", "label") if c not in image_index.columns]
    if missing:
        raise SelectionDataError(f"image_index lacks columns {missing}; see docs/data_flow.md (ingest_cifar).")
    train = image_index.loc[image_index["split"] == "train", ["image_id", "label"]].sort_values("image_id")
    if len(train) == 0:
        raise SelectionDataError("image_index has no training images (split == 'train'); run ingest_cifar first.")
    subset = np.full(len(train), "train", dtype=object)
    labels = train["label"].to_numpy()
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            raise SelectionDataError(
                f"Class {label} has {len(members)} training image(s); a stratified validation split needs at "
                "least 2 per class. Use a larger sample (ingest_cifar.source)."
            )
        n_validation = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        chosen = policy_rng(seed, "validation", int(label)).permutation(members)[:n_validation]
        subset[chosen] = "validation"
    return pd.DataFrame({"image_id": train["image_id"].to_numpy(np.int64), "label": labels.astype(np.int64),
                         "subset": subset.astype(str)})


def subset_ids(split: pd.DataFrame, subset: str) -> np.ndarray:
    """Sorted image ids of ``subset`` (``train`` or ``validation``) in a split table."""
    return np.sort(split.loc[split["subset"] == subset, "image_id"].to_numpy(np.int64))


# --------------------------------------------------------------------------- fixed orderings


def ordering_batches(scores: pd.DataFrame, ordering: str, train_ids: np.ndarray, batch_size: int) -> np.ndarray:
    """One metric's fixed batching of the training images: ``K x m`` image ids, batch 0 = lowest metric.

    ``scores`` (``{ordering}.image_scores``) restricted to ``train_ids`` go through
    ``batching.assign_batches``, the same sort-and-cut as ``sort_batches``: sorted
    by the metric's ``sort_columns``, ties by ``image_id``, cut into ``K = floor(N / m)``
    batches, the ``N - K m`` images with the largest keys dropped.
    """
    if len(scores) == 0:
        raise SelectionDataError(f"Ordering '{ordering}' has no scores (its metric was skipped).")
    present = np.isin(train_ids, scores["image_id"].to_numpy(np.int64))
    if not present.all():
        raise SelectionDataError(
            f"{ordering}.image_scores lacks {int((~present).sum())} training images (e.g. id "
            f"{int(train_ids[~present][0])}); rerun score_metrics on the same ingest_cifar output."
        )
    restricted = scores.loc[scores["image_id"].isin(train_ids)].reset_index(drop=True)
    if len(restricted) < batch_size:
        raise SelectionDataError(f"{len(restricted)} training images cannot fill one batch of {batch_size}.")
    assignments = assign_batches(restricted, ordering, batch_size)
    k = int(assignments["batch"].max()) + 1
    return assignments.sort_values(["batch", "position"])["image_id"].to_numpy(np.int64).reshape(k, batch_size)


def rank_positions(num_batches: int) -> np.ndarray:
    """Position of batch ``k`` along its sorted order: ``(k + 0.5) / K`` (the analysis' ``batch_position``)."""
    return (np.arange(num_batches) + 0.5) / num_batches


def advice_mask(num_batches: int, group: str) -> np.ndarray:
    """Which of an ordering's ``K`` batches belong to ``group`` (see :data:`ADVICE_GROUPS`).

    ``upper_quartile`` and ``extremes`` are exactly ``distance_analysis``'s groups
    (position > 0.75; position < 0.10 or > 0.90); ``middle_80`` is the complement
    of ``extremes`` and ``lower_quartile`` mirrors ``upper_quartile``.
    """
    positions = rank_positions(num_batches)
    if group == "upper_quartile":
        return group_mask(positions, UPPER_QUARTILE)
    if group == "lower_quartile":
        return group_mask(1.0 - positions, UPPER_QUARTILE)
    if group == "extremes":
        return group_mask(positions, EXTREMES)
    if group == "middle_80":
        return ~group_mask(positions, EXTREMES)
    if group == "all":
        return np.ones(num_batches, dtype=bool)
    raise SelectionConfigError(f"Unknown batch group {group!r}; use one of {', '.join(ADVICE_GROUPS)}.")


# --------------------------------------------------------------------------- pools of the static policies


def _pool_rows(policy: str, phase: int, ordering: str, batches: np.ndarray, chosen: np.ndarray) -> list[dict]:
    positions = rank_positions(len(batches))
    return [
        {"policy": policy, "phase": phase, "source_ordering": ordering, "source_batch": int(k),
         "position": float(positions[k]), "image_ids": batches[k].astype(np.int64)}
        for k in np.flatnonzero(chosen)
    ]


def _pool_table(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=[c for c in POOL_COLUMNS if c != "pool_batch"])
    table.insert(2, "pool_batch", table.groupby(["policy", "phase"]).cumcount().astype(np.int64))
    return table[POOL_COLUMNS]


def fixed_order_pool(orderings: Mapping[str, np.ndarray], ordering: str, num_phases: int) -> pd.DataFrame:
    """The ``fixed_random`` policy's batches: all of ``ordering``'s batches in their order, every phase."""
    if ordering not in orderings:
        raise SelectionDataError(
            f"fixed_random needs ordering '{ordering}' (batch_selection.fixed_random.ordering), which has no "
            f"scores here; available: {sorted(orderings)}."
        )
    batches = orderings[ordering]
    rows = []
    for phase in range(1, num_phases + 1):
        rows += _pool_rows("fixed_random", phase, ordering, batches, np.ones(len(batches), dtype=bool))
    return _pool_table(rows)


def paper_advice_pool(
    orderings: Mapping[str, np.ndarray],
    first_phase: Mapping[str, str],
    later_phases: Mapping[str, str],
    num_phases: int,
    skipped: Mapping[str, str] | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """The ``paper_advice`` policy's batches per phase, and notes on metrics that could not be used.

    Phase 1 keeps, from each ordering named in ``first_phase``, the batches of its
    group (default: the upper quartile of intensity and of perceptual distance);
    later phases do the same with ``later_phases`` (default: the middle 80% of
    every metric, i.e. the extremes dropped). The phase's pool is the union of
    the kept batches of all orderings. An ordering without scores (a skipped
    metric, ``skipped`` gives the reason) is left out and noted; a phase whose
    pool ends up empty is an error.
    """
    skipped = dict(skipped or {})
    missing: dict[str, list[str]] = {}
    rows: list[dict] = []
    for phase in range(1, num_phases + 1):
        advice = first_phase if phase == 1 else later_phases
        phase_rows: list[dict] = []
        for ordering, group in advice.items():
            if ordering not in orderings:
                where = "phase 1" if phase == 1 else "later phases"
                if where not in missing.setdefault(ordering, []):
                    missing[ordering].append(where)
                continue
            batches = orderings[ordering]
            phase_rows += _pool_rows("paper_advice", phase, ordering, batches, advice_mask(len(batches), group))
        if not phase_rows:
            raise SelectionDataError(
                f"paper_advice has no batches in phase {phase}: none of {sorted(advice)} is available. Fix "
                "batch_selection.paper_advice or provide those metrics' scores."
            )
        rows += phase_rows
    notes = [
        f"paper_advice: ordering '{ordering}' is not available ({skipped.get(ordering, 'no scores')}); its "
        f"{' and '.join(where)} pool is built from the other metrics' batches."
        for ordering, where in missing.items()
    ]
    return _pool_table(rows), notes


def learned_pool(
    batches: np.ndarray,
    batch_statistics: pd.DataFrame,
    ordering: str,
    measure: str,
    keep_fraction: float,
    num_phases: int,
) -> tuple[pd.DataFrame, list[str]]:
    """The ``learned`` policy's batches per phase: the re-cut batches whose rank position was closest.

    ``batch_statistics`` is ``distance_analysis``'s per ordering/phase/batch table
    (``ordering``, ``phase``, ``batch``, ``measure``, optionally ``batch_position``).
    It was computed on batches of all training images, whereas ``batches`` are
    re-cut from the non-validation images, so batches are matched by rank
    position along the sorted order: each re-cut batch gets the measure linearly
    interpolated at its position ``(k + 0.5) / K`` from the analysed batches'
    positions. The ``round(keep_fraction * K)`` (at least 1) re-cut batches with
    the smallest value are kept (ties by rank). Phase ``p`` uses the analysis'
    phase ``p``; phases beyond the analysis' last use its last phase (noted).
    """
    missing = [c for c in ("ordering", "phase", "batch", measure) if c not in batch_statistics.columns]
    if missing:
        raise SelectionDataError(
            f"The distance_analysis batch table lacks columns {missing} (has {list(batch_statistics.columns)}); "
            "rerun distance_analysis or change batch_selection.learned.measure."
        )
    table = batch_statistics.loc[batch_statistics["ordering"] == ordering]
    if len(table) == 0:
        available = sorted(batch_statistics["ordering"].unique())
        raise SelectionDataError(
            f"distance_analysis has no batches of ordering '{ordering}' (batch_selection.learned.ordering); "
            f"it has {available}. Choose one of them (a skipped metric has no distances)."
        )
    notes: list[str] = []
    analysed_phases = sorted(int(p) for p in table["phase"].unique())
    k = len(batches)
    positions = rank_positions(k)
    n_keep = kept_count(keep_fraction, k)
    rows: list[dict] = []
    for phase in range(1, num_phases + 1):
        source_phase = phase if phase in analysed_phases else analysed_phases[-1]
        if source_phase != phase:
            notes.append(f"learned: phase {phase} has no distance_analysis phase; it uses phase {source_phase}.")
        part = table.loc[table["phase"] == source_phase].sort_values("batch")
        if "batch_position" in part.columns:
            analysed_positions = part["batch_position"].to_numpy(np.float64)
        else:
            analysed_positions = rank_positions(len(part))
        values = part[measure].to_numpy(np.float64)
        finite = np.isfinite(values)
        if not finite.any():
            raise SelectionDataError(f"distance_analysis' {measure} of '{ordering}' phase {source_phase} is all NaN.")
        estimated = np.interp(positions, analysed_positions[finite], values[finite])
        chosen_order = np.lexsort((np.arange(k), estimated))[:n_keep]
        chosen = np.zeros(k, dtype=bool)
        chosen[chosen_order] = True
        rows += _pool_rows("learned", phase, ordering, batches, chosen)
    return _pool_table(rows), notes


def random_subset_pools(batches: np.ndarray, keep_fraction: float, num_phases: int, seed: int) -> dict[int, np.ndarray]:
    """The ``random_subset`` control's batches: ``{phase: P x m}``, a random ``P``-subset of ``batches`` per phase.

    ``P = kept_count(keep_fraction, K)`` of the ``K`` batches (in the pipeline:
    the fixed-random ordering's batches and ``learned.keep_fraction``, so ``P``
    is exactly the count ``learned`` keeps). The subset of each phase is drawn
    independently, uniformly without replacement, from a generator of the seed
    and the phase only: the same for a seed on every rerun, different between
    seeds (so the control averages over random subsets rather than testing one).
    """
    batches = np.asarray(batches, dtype=np.int64)
    n_keep = kept_count(keep_fraction, len(batches))
    pools = {}
    for phase in range(1, num_phases + 1):
        chosen = policy_rng(seed, CONTROL, "subset", phase).choice(len(batches), size=n_keep, replace=False)
        pools[phase] = batches[np.sort(chosen)]
    return pools


def pools_by_phase(pools: pd.DataFrame, policy: str) -> dict[int, np.ndarray]:
    """``{phase: P x m image ids}`` of one policy from the pool table (rows in ``pool_batch`` order)."""
    part = pools.loc[pools["policy"] == policy].sort_values(["phase", "pool_batch"])
    if len(part) == 0:
        raise SelectionDataError(f"The batch pool table has no rows for policy '{policy}'.")
    return {int(phase): np.stack([np.asarray(ids, dtype=np.int64) for ids in group["image_ids"]])
            for phase, group in part.groupby("phase", sort=True)}


# --------------------------------------------------------------------------- policies

#: Gradient probe handed to policies: ``C x m`` image ids -> ``C`` distances of each batch's gradient
#: (at the current parameters) to the mean of the ``C`` gradients.
ProbeFn = Callable[[np.ndarray], np.ndarray]


class BatchPolicy:
    """A rule that picks the ``steps_per_epoch`` batches of every epoch."""

    name: str = ""
    #: Whether :meth:`epoch_batches` uses the gradient probe (its cost is counted).
    probes: bool = False

    def __init__(self, steps_per_epoch: int, batch_size: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = batch_size

    def epoch_batches(self, epoch: int, phase: int, probe: ProbeFn | None = None) -> np.ndarray:
        """The epoch's batches as a ``steps_per_epoch x batch_size`` array of image ids."""
        raise NotImplementedError


def random_partition(train_ids: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of ``train_ids`` cut into ``floor(N / m)`` batches (the remainder is dropped)."""
    k = len(train_ids) // batch_size
    return rng.permutation(train_ids)[: k * batch_size].reshape(k, batch_size)


class ShufflePolicy(BatchPolicy):
    """A fresh random partition of the training images every epoch."""

    name = "shuffle"

    def __init__(self, train_ids: np.ndarray, batch_size: int, seed: int) -> None:
        super().__init__(len(train_ids) // batch_size, batch_size)
        self.train_ids = np.asarray(train_ids, dtype=np.int64)
        self.rng = policy_rng(seed, self.name)

    def epoch_batches(self, epoch: int, phase: int, probe: ProbeFn | None = None) -> np.ndarray:
        return random_partition(self.train_ids, self.batch_size, self.rng)


class FixedOrderPolicy(BatchPolicy):
    """The same batches in the same order every epoch."""

    name = "fixed_random"

    def __init__(self, batches: np.ndarray) -> None:
        super().__init__(len(batches), batches.shape[1])
        self.batches = np.asarray(batches, dtype=np.int64)

    def epoch_batches(self, epoch: int, phase: int, probe: ProbeFn | None = None) -> np.ndarray:
        return self.batches.copy()


class PoolCycler:
    """Visits a pool of batches in random order, reshuffling the visit order each time it is used up.

    Successive calls continue where the last one stopped, so over an epoch
    boundary every pool batch is used equally often (to within one visit).
    """

    def __init__(self, pool: np.ndarray, rng: np.random.Generator) -> None:
        self.pool = pool
        self.rng = rng
        self._queue = np.zeros(0, dtype=np.int64)

    def take(self, count: int) -> np.ndarray:
        chosen = []
        while count > 0:
            if len(self._queue) == 0:
                self._queue = self.rng.permutation(len(self.pool))
            n = min(count, len(self._queue))
            chosen.append(self._queue[:n])
            self._queue = self._queue[n:]
            count -= n
        return self.pool[np.concatenate(chosen)]


class PoolPolicy(BatchPolicy):
    """Per phase, ``steps_per_epoch`` batches cycled from that phase's pool (``paper_advice``, ``learned``, ``random_subset``)."""

    def __init__(self, name: str, pools: Mapping[int, np.ndarray], steps_per_epoch: int, seed: int) -> None:
        batch_sizes = {p.shape[1] for p in pools.values()}
        if len(batch_sizes) != 1:
            raise SelectionDataError(f"Policy '{name}' has pools of different batch sizes {sorted(batch_sizes)}.")
        super().__init__(steps_per_epoch, batch_sizes.pop())
        self.name = name
        self.pools = dict(pools)
        self.seed = seed
        self._cyclers: dict[int, PoolCycler] = {}

    def epoch_batches(self, epoch: int, phase: int, probe: ProbeFn | None = None) -> np.ndarray:
        if phase not in self.pools:
            raise SelectionDataError(f"Policy '{self.name}' has no pool for phase {phase}.")
        if phase not in self._cyclers:
            self._cyclers[phase] = PoolCycler(self.pools[phase], policy_rng(self.seed, self.name, "phase", phase))
        return self._cyclers[phase].take(self.steps_per_epoch)


def closest_batches(distances: np.ndarray, keep: int) -> np.ndarray:
    """Indices of the ``keep`` smallest distances, closest first (ties by index)."""
    distances = np.asarray(distances, dtype=np.float64)
    if not np.isfinite(distances).all():
        bad = int(np.flatnonzero(~np.isfinite(distances))[0])
        raise FloatingPointError(f"The probed gradient of candidate batch {bad} is not finite.")
    return np.lexsort((np.arange(len(distances)), distances))[:keep]


class OraclePolicy(BatchPolicy):
    """Gradient matching: probe candidates at the epoch's start, train on the closest to their mean.

    Each epoch draws a fresh random partition of the training images (``K``
    batches; ``candidates`` of them if set), asks the probe for every candidate's
    distance to the candidates' mean gradient (the full gradient when all ``K``
    are probed), keeps the ``round(keep_fraction * C)`` closest (at least 1) and
    cycles through them in random order for the epoch's ``K`` steps. The probe
    costs ``C`` forward and backward passes per epoch, counted by the runner.
    """

    name = "oracle"
    probes = True

    def __init__(self, train_ids: np.ndarray, batch_size: int, seed: int, keep_fraction: float,
                 candidates: int | None = None) -> None:
        super().__init__(len(train_ids) // batch_size, batch_size)
        self.train_ids = np.asarray(train_ids, dtype=np.int64)
        self.num_candidates = self.steps_per_epoch if candidates is None else min(candidates, self.steps_per_epoch)
        self.keep = kept_count(keep_fraction, self.num_candidates)
        self.seed = seed
        self.rng = policy_rng(seed, self.name)
        #: The last epoch's candidate distances and kept indices (for logs and tests).
        self.last_distances: np.ndarray | None = None
        self.last_kept: np.ndarray | None = None

    def epoch_batches(self, epoch: int, phase: int, probe: ProbeFn | None = None) -> np.ndarray:
        if probe is None:
            raise ValueError("The oracle policy needs a gradient probe.")
        candidates = random_partition(self.train_ids, self.batch_size, self.rng)[: self.num_candidates]
        distances = np.asarray(probe(candidates), dtype=np.float64)
        if distances.shape != (len(candidates),):
            raise ValueError(f"The probe returned {distances.shape} distances for {len(candidates)} candidates.")
        kept = closest_batches(distances, self.keep)
        self.last_distances, self.last_kept = distances, kept
        return PoolCycler(candidates[kept], policy_rng(self.seed, self.name, "cycle", epoch)).take(
            self.steps_per_epoch
        )


def build_policy(
    name: str,
    config: SelectionConfig,
    seed: int,
    train_ids: np.ndarray,
    pools: pd.DataFrame,
) -> BatchPolicy:
    """The policy ``name`` for one seed, from the split's training ids and the pool table."""
    m = config.recipe.batch_size
    steps = len(train_ids) // m
    if name == "shuffle":
        return ShufflePolicy(train_ids, m, seed)
    if name == "oracle":
        return OraclePolicy(train_ids, m, seed, config.oracle_keep_fraction, config.oracle_candidates)
    by_phase = pools_by_phase(pools, "fixed_random" if name == CONTROL else name)
    if name in ("fixed_random", CONTROL):
        batches = by_phase[min(by_phase)]
        if len(batches) != steps:
            raise SelectionDataError(f"fixed_random has {len(batches)} batches, the baseline takes {steps} steps.")
        if name == "fixed_random":
            return FixedOrderPolicy(batches)
        subsets = random_subset_pools(batches, config.learned_keep_fraction, config.recipe.num_phases, seed)
        logger.info("batch_selection: %s, seed %d, trains per phase on %d of the %d batches of %s's ordering",
                    CONTROL, seed, len(subsets[1]), steps, config.fixed_ordering)
        return PoolPolicy(CONTROL, subsets, steps, seed)
    if name in ("paper_advice", "learned"):
        return PoolPolicy(name, by_phase, steps, seed)
    raise SelectionConfigError(f"Unknown policy {name!r}; use one of {', '.join(POLICIES)}.")


# --------------------------------------------------------------------------- gradient probe


def probe_distances(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_batches: int,
    memory_cap_bytes: float = float("inf"),
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
) -> np.ndarray:
    """Distances ``||g_k - g_mean||`` of each batch's gradient at ``model``'s current parameters.

    As ``net_compare`` does: a separate copy of the model (parameters and
    BatchNorm buffers), in training mode (batch statistics), takes one forward
    and backward pass per batch and no update, so ``model`` is left untouched.
    The mean over the batches stands for the full gradient. Gradients are
    buffered exactly by ``probing.EpochGradients`` (spilling past
    ``memory_cap_bytes``) and the distances are exact float64.
    """
    probe = copy.deepcopy(model)
    for p in probe.parameters():
        p.grad = None
    probe.train()
    params = [p for p in probe.parameters() if p.requires_grad]
    num_params = sum(p.numel() for p in params)
    with EpochGradients(num_batches, num_params, params[0].dtype, params[0].device, memory_cap_bytes) as buffer:
        for inputs, targets in batches:
            buffer.append(batch_gradient(probe, inputs, targets, loss_fn).detach())
        return np.asarray(buffer.measures()["distance"], dtype=np.float64)


# --------------------------------------------------------------------------- training one policy


@dataclass
class ImageData:
    """Model-ready tensors: every training-split image (train and validation subsets), and the test split."""

    inputs: torch.Tensor  # N x 3 x H x W floats (normalised), rows = image_index rows of the train split
    labels: torch.Tensor  # N int64
    row_of_id: Mapping[int, int] | np.ndarray  # image_id -> row (an array when ids are 0..N-1)
    train_ids: np.ndarray
    validation_ids: np.ndarray
    test_inputs: torch.Tensor
    test_labels: torch.Tensor

    def rows(self, image_ids: np.ndarray) -> torch.Tensor:
        ids = np.asarray(image_ids, dtype=np.int64)
        if isinstance(self.row_of_id, np.ndarray):
            return torch.from_numpy(self.row_of_id[ids])
        return torch.tensor([self.row_of_id[int(i)] for i in ids.ravel()], dtype=torch.int64).view(ids.shape)

    @classmethod
    def from_tables(cls, image_index: pd.DataFrame, split: pd.DataFrame, train_images: torch.Tensor,
                    test_images: torch.Tensor, device: torch.device | str = "cpu") -> "ImageData":
        """Convert the uint8 NHWC tensors once (``images.to_model_input``) and map ids to rows."""
        train_index = image_index.loc[image_index["split"] == "train"]
        test_index = image_index.loc[image_index["split"] == "test"].sort_values("row")
        if len(train_index) != train_images.shape[0] or len(test_index) != test_images.shape[0]:
            raise SelectionDataError(
                f"image_index lists {len(train_index)} train / {len(test_index)} test images but the tensors hold "
                f"{train_images.shape[0]} / {test_images.shape[0]}; use one ingest_cifar run's outputs."
            )
        ids = train_index["image_id"].to_numpy(np.int64)
        rows = train_index["row"].to_numpy(np.int64)
        row_of_id = np.full(int(ids.max()) + 1, -1, dtype=np.int64)
        row_of_id[ids] = rows
        labels = np.full(train_images.shape[0], -1, dtype=np.int64)
        labels[rows] = train_index["label"].to_numpy(np.int64)
        split_ids = split["image_id"].to_numpy(np.int64)
        if not np.isin(split_ids, ids).all():
            raise SelectionDataError("The validation split names images that are not training images of image_index.")
        device = torch.device(device)
        return cls(
            inputs=to_model_input(train_images).to(device),
            labels=torch.from_numpy(labels).to(device),
            row_of_id=row_of_id,
            train_ids=subset_ids(split, "train"),
            validation_ids=subset_ids(split, "validation"),
            test_inputs=to_model_input(test_images).to(device),
            test_labels=torch.from_numpy(test_index["label"].to_numpy(np.int64).copy()).to(device),
        )


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode (restores its previous mode)."""
    was_training = model.training
    model.eval()
    total_loss = 0.0
    correct = 0
    for start in range(0, len(labels), batch_size):
        outputs = model(inputs[start:start + batch_size])
        targets = labels[start:start + batch_size]
        total_loss += float(nn.functional.cross_entropy(outputs.double(), targets, reduction="sum"))
        correct += int((outputs.argmax(dim=1) == targets).sum())
    model.train(was_training)
    return total_loss / len(labels), correct / len(labels)


def _evaluation_steps(steps_per_epoch: int, evaluations: int) -> set[int]:
    """0-based step indices within an epoch after which to evaluate (the last step always)."""
    return {max(0, int(round(steps_per_epoch * j / evaluations)) - 1) for j in range(1, evaluations + 1)}


def train_with_policy(
    policy: BatchPolicy,
    model: nn.Module,
    data: ImageData,
    recipe: TrainingRecipe,
    seed: int,
    memory_cap_bytes: float = float("inf"),
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Train ``model`` (already initialised, on its device) for the recipe's epochs on the policy's batches.

    SGD with momentum and weight decay, the learning rate set per phase. Before
    the first step and ``evaluations_per_epoch`` times per epoch the model is
    evaluated on the validation images; the clock (``seconds``) counts training
    steps and gradient probing only, not evaluations. ``passes`` counts forward +
    backward passes of one batch: optimizer steps plus the oracle's probes.
    Returns the curve (one row per evaluation, :data:`CURVE_COLUMNS`) and the
    run's results (:data:`RESULT_COLUMNS`; test accuracy is measured once, at the end).
    """
    device = data.inputs.device
    allowed = data.train_ids
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.phases[0].learning_rate,
                                momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    validation_rows = data.rows(data.validation_ids).to(device)
    validation_inputs, validation_labels = data.inputs[validation_rows], data.labels[validation_rows]

    def probe(candidates: np.ndarray) -> np.ndarray:
        def tensors():
            for ids in candidates:
                rows = data.rows(ids).to(device)
                yield data.inputs[rows], data.labels[rows]
        return probe_distances(model, tensors(), len(candidates), memory_cap_bytes)

    state = {"step": 0, "probe_passes": 0, "seconds": 0.0, "probe_seconds": 0.0}
    curve: list[dict[str, Any]] = []
    trained = np.zeros(0, dtype=np.int64)

    def record(epoch: int, phase: int, lr: float, train_loss: float) -> None:
        val_loss, val_accuracy = evaluate(model, validation_inputs, validation_labels, recipe.eval_batch_size)
        curve.append({"seed": seed, "policy": policy.name, "epoch": epoch, "phase": phase, "learning_rate": lr,
                      "step": state["step"], "passes": state["step"] + state["probe_passes"],
                      "probe_passes": state["probe_passes"], "seconds": state["seconds"],
                      "probe_seconds": state["probe_seconds"], "train_loss": train_loss,
                      "val_loss": val_loss, "val_accuracy": val_accuracy})

    record(0, 1, recipe.phases[0].learning_rate, float("nan"))
    model.train()
    for epoch, phase, lr in recipe.epoch_plan():
        for group in optimizer.param_groups:
            group["lr"] = lr
        _sync(device)
        started = time.perf_counter()
        batches = policy.epoch_batches(epoch, phase, probe if policy.probes else None)
        _sync(device)
        if policy.probes:  # the oracle's probing is part of its wall-clock
            elapsed = time.perf_counter() - started
            state["probe_seconds"] += elapsed
            state["seconds"] += elapsed
            state["probe_passes"] += getattr(policy, "num_candidates", 0)
        _check_schedule(policy, batches, allowed, epoch)
        trained = np.union1d(trained, np.unique(batches))
        evaluate_after = _evaluation_steps(len(batches), recipe.evaluations_per_epoch)
        losses: list[torch.Tensor] = []
        started = time.perf_counter()
        for k, ids in enumerate(batches):
            rows = data.rows(ids).to(device)
            inputs, targets = data.inputs[rows], data.labels[rows]
            if recipe.augment:
                inputs = augment(inputs.cpu(), batch_generator(seed, epoch, k)).to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            state["step"] += 1
            if k in evaluate_after:
                mean_loss = float(torch.stack(losses).double().mean())
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(
                        f"Policy '{policy.name}', seed {seed}, epoch {epoch}: the training loss is not finite. "
                        "Lower the learning rates in batch_selection.training.phases."
                    )
                _sync(device)
                state["seconds"] += time.perf_counter() - started
                record(epoch, phase, lr, mean_loss)
                losses = []
                started = time.perf_counter()
        if on_epoch is not None:
            on_epoch(curve[-1])
    test_loss, test_accuracy = evaluate(model, data.test_inputs, data.test_labels, recipe.eval_batch_size)
    results = {"seed": seed, "policy": policy.name, "steps": state["step"],
               "passes": state["step"] + state["probe_passes"], "probe_passes": state["probe_passes"],
               "seconds": state["seconds"], "probe_seconds": state["probe_seconds"],
               "final_val_accuracy": curve[-1]["val_accuracy"], "test_loss": test_loss,
               "test_accuracy": test_accuracy, "distinct_images_trained": len(trained)}
    return pd.DataFrame(curve, columns=CURVE_COLUMNS), results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_schedule(policy: BatchPolicy, batches: np.ndarray, allowed: np.ndarray, epoch: int) -> None:
    """Every policy takes exactly the baseline's steps, on training (never validation or test) images."""
    expected = (policy.steps_per_epoch, policy.batch_size)
    if batches.shape != expected:
        raise RuntimeError(f"Policy '{policy.name}' gave {batches.shape} batches in epoch {epoch}; expected {expected}.")
    foreign = ~np.isin(batches, allowed)
    if foreign.any():
        raise RuntimeError(
            f"Policy '{policy.name}' picked image {int(batches[foreign][0])} in epoch {epoch}, which is not a "
            "training image of the split (validation and test images must never be trained on)."
        )




def describe_setup(config: SelectionConfig, split: pd.DataFrame, results: pd.DataFrame | None = None) -> dict[str, str]:
    """The experiment's setup in words, for the report."""
    n_train = int((split["subset"] == "train").sum())
    n_validation = int((split["subset"] == "validation").sum())
    m = config.recipe.batch_size
    k = n_train // m
    candidates = k if config.oracle_candidates is None else min(config.oracle_candidates, k)
    phases = ", ".join(f"{p.epochs} x lr {p.learning_rate:g}" for p in config.recipe.phases)
    options = "".join(f", {key}={value}" for key, value in config.model_options.items())
    setup = {
        "model": f"{config.model_name}{options}",
        "images": f"{n_train} training, {n_validation} validation (stratified, held out from the training split)",
        "batches": f"{m} images, {k} optimizer steps per epoch for every policy "
                   f"({n_train - k * m} images left out of each epoch)",
        "schedule": f"{config.recipe.num_epochs} epochs in phases {phases}; SGD momentum {config.recipe.momentum:g}, "
                    f"weight decay {config.recipe.weight_decay:g}; augmentation {'on' if config.recipe.augment else 'off'}",
        "seeds": f"{len(config.seeds)} per policy ({', '.join(map(str, config.seeds))})",
        "target": f"validation accuracy {config.target_validation_accuracy:.3f}",
        "policies": ", ".join(config.policies),
        "learned": f"per phase the {kept_count(config.learned_keep_fraction, k)} of {config.learned_ordering}'s "
                   f"{k} batches ({config.learned_keep_fraction:.0%}) with the lowest {config.learned_measure}",
        "oracle": f"keeps the {config.oracle_keep_fraction:.0%} closest of "
                  f"{'all' if config.oracle_candidates is None else config.oracle_candidates} probed candidates "
                  f"({kept_count(config.oracle_keep_fraction, candidates)} of {candidates} per epoch)",
        "device": str(config.resolved_device()),
    }
    if CONTROL in config.policies:
        setup[CONTROL] = (f"per phase a random {kept_count(config.learned_keep_fraction, k)} of "
                          f"{config.fixed_ordering}'s {k} batches (learned's count), drawn per seed and phase")
        setup["device"] = setup.pop("device")
    if results is not None and len(results):
        setup["total training time"] = f"{results['seconds'].sum() / 60:.1f} min over {len(results)} runs"
    return setup


@dataclass
class ExperimentResults:
    curves: pd.DataFrame
    results: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def run_experiment(
    config: SelectionConfig,
    data: ImageData,
    pools: pd.DataFrame,
    model_factory: Callable[[], nn.Module],
) -> ExperimentResults:
    """Every seed x policy run. Seeds are the outer loop so that a change in machine load hits all policies.

    For a seed every policy starts from the same initial weights
    (``torch.manual_seed(seed)`` before ``model_factory()``), so results pair by seed.
    """
    device = data.inputs.device
    curves, results = [], []
    runs = [(seed, name) for seed in config.seeds for name in config.policies]
    with deterministic_algorithms(config.deterministic, device), _progress(config.progress_bar, len(runs)) as advance:
        for i, (seed, name) in enumerate(runs, start=1):
            torch.manual_seed(seed)
            model = model_factory().to(device)
            policy = build_policy(name, config, seed, data.train_ids, pools)
            curve, result = train_with_policy(policy, model, data, config.recipe, seed,
                                              config.oracle_memory_cap_gb * GIB)
            curves.append(curve)
            results.append(result)
            logger.info(
                "batch_selection run %d/%d: seed %d, %s: %d steps (+%d probe passes) in %.1f s (probing %.1f s) | "
                "final val acc %.3f | test acc %.3f",
                i, len(runs), seed, name, result["steps"], result["probe_passes"], result["seconds"],
                result["probe_seconds"], result["final_val_accuracy"], result["test_accuracy"],
            )
            advance()
    return ExperimentResults(pd.concat(curves, ignore_index=True),
                             pd.DataFrame(results, columns=RESULT_COLUMNS))


@contextlib.contextmanager
def _progress(enabled: bool, total: int):
    """A rich progress bar over runs on Kedro's console; a no-op when output is not a terminal."""
    import rich
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = rich.get_console()
    if not enabled or not console.is_terminal:
        yield lambda: None
        return
    with Progress(TextColumn("batch_selection runs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("runs", total=total)
        yield lambda: bar.advance(task)
