"""``gradient_training``'s result tables: the rows a run accumulates, and what it publishes.

Knows nothing of Kedro. :class:`Progress` holds the rows completed so far as plain
lists (what a checkpoint stores); a finished run becomes a :class:`ProbeResults`
(one seed) and an ordering's seeds one :class:`OrderingResults`, whose tables have
the columns below (schemas: docs/data_flow.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from best_minibatch.training.probing import GRADIENT_MEASURES

#: ``position``: the step of its epoch at which the batch was trained (its batch number in a fixed order).
DISTANCE_ROW_KEYS = ("epoch", "phase", "learning_rate", "batch", *GRADIENT_MEASURES, "full_grad_norm", "position")
NULL_ROW_KEYS = ("epoch", "phase", "learning_rate", "draw", *GRADIENT_MEASURES, "full_grad_norm")
HISTORY_NUMERIC = ["epoch", "phase", "learning_rate", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                   "mean_distance", "seconds", "full_grad_norm", "gradients_kept", "gradient_variance_trace",
                   "n_train", "batch_size"]

DISTANCE_COLUMNS = ["ordering", "seed", "batching", "epoch", "phase", "learning_rate", "batch", "distance", "cosine_similarity",
                    "relative_distance", "grad_norm", "full_grad_norm", "position"]
#: The same-parameter null: random batches probed at the same epoch-start parameters, against the same ∇_e.
NULL_COLUMNS = ["ordering", "seed", "epoch", "phase", "learning_rate", "draw", "distance", "cosine_similarity",
                "relative_distance", "grad_norm", "full_grad_norm"]
HISTORY_COLUMNS = ["ordering", "seed", "epoch", "phase", "learning_rate", "train_loss", "train_accuracy", "test_loss",
                   "test_accuracy", "mean_distance", "seconds", "full_grad_norm", "run_name", "gradients_kept",
                   "gradient_variance_trace", "n_train", "batch_size"]


@dataclass
class Progress:
    """Rows and history completed so far, as plain lists (what a checkpoint stores)."""

    distances: dict[str, list] = field(default_factory=lambda: {c: [] for c in DISTANCE_ROW_KEYS})
    history: dict[str, list] = field(default_factory=lambda: {c: [] for c in HISTORY_NUMERIC})
    # the same-parameter null's rows (epochs x draws)
    null: dict[str, list] = field(default_factory=lambda: {c: [] for c in NULL_ROW_KEYS})
    # epoch -> CRC-32 of each spilled gradient (checkpoints.tensor_checksum), to verify the files on resume
    gradient_checksums: dict[int, list[int]] = field(default_factory=dict)

    def to_state(self) -> dict[str, Any]:
        return {
            "distances": {c: torch.tensor(v, dtype=torch.float64 if isinstance(v[0], float) else torch.int64)
                          if v else torch.zeros(0) for c, v in self.distances.items()},
            "history": {c: torch.tensor(v, dtype=torch.float64) for c, v in self.history.items()},
            "null": {c: torch.tensor(v, dtype=torch.float64) for c, v in self.null.items()},
            "gradient_checksums": {f"{e:03d}": torch.tensor(v, dtype=torch.int64)
                                   for e, v in self.gradient_checksums.items()},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Progress:
        """The progress a checkpoint of :data:`~best_minibatch.gradient_training.store.CHECKPOINT_FORMAT` holds."""
        progress = cls()
        for c in progress.distances:
            progress.distances[c] = state["distances"][c].tolist()
        for c in progress.history:
            progress.history[c] = state["history"][c].tolist()
        for c, v in state["null"].items():
            progress.null[c] = [int(x) for x in v.tolist()] if c in ("epoch", "phase", "draw") else v.tolist()
        for e, v in state["gradient_checksums"].items():
            progress.gradient_checksums[int(e)] = v.tolist()
        return progress

    @staticmethod
    def append_epoch(rows: dict[str, list], plan: Any, index: str, measures: Mapping[str, Any],
                     full_grad_norm: float) -> None:
        """Add one epoch's rows to ``rows`` (distances or null): ``index`` numbers them 0..n-1 (``batch``,
        ``draw``), ``measures`` holds each of GRADIENT_MEASURES per row."""
        count = len(measures["distance"])
        rows["epoch"] += [plan.epoch] * count
        rows["phase"] += [plan.phase] * count
        rows["learning_rate"] += [plan.learning_rate] * count
        rows[index] += list(range(count))
        for c in GRADIENT_MEASURES:
            rows[c] += measures[c].tolist()
        rows["full_grad_norm"] += [full_grad_norm] * count

    @classmethod
    def missing_keys(cls, state: Mapping[str, Any]) -> list[str]:
        """What a checkpoint lacks of the progress this version writes (one written by an older version)."""
        progress = cls()
        missing = [k for k in ("distances", "history", "null", "gradient_checksums") if k not in state]
        for key, rows in (("distances", progress.distances), ("history", progress.history)):
            if key in state:
                missing += [f"{key}.{c}" for c in rows if c not in state[key]]
        return missing


@dataclass
class ProbeResults:
    """Everything a finished run (one ordering, one seed) publishes; every table has a ``seed`` column."""

    ordering: str
    run_name: str
    distances: pd.DataFrame
    distance_matrix: torch.Tensor
    history: pd.DataFrame
    model_state: dict[str, torch.Tensor]
    null_distances: pd.DataFrame = dataclasses.field(default_factory=lambda: null_frame("", 0, {}))
    seed: int = 0

    @classmethod
    def empty(cls, ordering: str, run_name: str = "") -> ProbeResults:
        return cls(ordering, run_name, empty_distance_table(), torch.zeros(0, 0, dtype=torch.float64),
                   empty_history_table(), {}, null_frame("", 0, {}))


@dataclass
class OrderingResults:
    """One ordering's runs over every seed, as the pipeline publishes them.

    The tables are the seeds' tables one after another (in the order of
    ``gradient_training.seeds``; the ``seed`` column tells them apart);
    ``distance_matrix`` stacks the seeds' ``E x K`` matrices into ``S x E x K``
    (float64, ``0 x 0 x 0`` for a skipped ordering); ``model_states`` maps each seed
    to its final ``net_normal`` state dict (``{}`` for a skipped ordering;
    :func:`flat_model_states` is how it is saved).
    """

    ordering: str
    seeds: tuple[int, ...]
    distances: pd.DataFrame
    distance_matrix: torch.Tensor
    history: pd.DataFrame
    model_states: dict[int, dict[str, torch.Tensor]]
    null_distances: pd.DataFrame

    @classmethod
    def from_runs(cls, ordering: str, results: list[ProbeResults]) -> OrderingResults:
        if not results:
            empty = ProbeResults.empty(ordering)
            return cls(ordering, (), empty.distances, torch.zeros(0, 0, 0, dtype=torch.float64), empty.history, {},
                       empty.null_distances)
        return cls(
            ordering, tuple(r.seed for r in results),
            pd.concat([r.distances for r in results], ignore_index=True),
            torch.stack([r.distance_matrix for r in results]),
            pd.concat([r.history for r in results], ignore_index=True),
            {r.seed: r.model_state for r in results},
            pd.concat([r.null_distances for r in results], ignore_index=True),
        )


def flat_model_states(states: Mapping[int, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every seed's state dict in one flat dict of tensors (the project's tensor format), keyed
    ``seed=<S>/<state-dict key>``; :func:`seed_model_states` reverses it."""
    return {f"seed={seed}/{key}": tensor for seed, state in states.items() for key, tensor in state.items()}


def seed_model_states(flat: Mapping[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """``{seed: state_dict}`` from a saved ``{ordering}.trained_model`` (:func:`flat_model_states`)."""
    states: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in flat.items():
        prefix, _, key = name.partition("/")
        if not prefix.startswith("seed=") or not key:
            raise ValueError(f"'{name}' is not a key of a trained_model of seeds ('seed=<S>/<state-dict key>'); "
                             "rerun gradient_training to rewrite the file.")
        states.setdefault(int(prefix.removeprefix("seed=")), {})[key] = tensor
    return states


def empty_distance_table() -> pd.DataFrame:
    return distance_frame("", 0, {c: [] for c in ("epoch", "phase", "learning_rate", "batch", *GRADIENT_MEASURES,
                                                   "full_grad_norm", "position")})


def empty_history_table() -> pd.DataFrame:
    return history_frame("", 0, "", {c: [] for c in HISTORY_NUMERIC})


def distance_frame(ordering: str, seed: int, rows: Mapping[str, Any], batching: int = 0) -> pd.DataFrame:
    frame = pd.DataFrame({
        "ordering": pd.Series([ordering] * len(rows["epoch"]), dtype=object),
        "seed": np.full(len(rows["epoch"]), seed, dtype=np.int64),
        "batching": np.full(len(rows["epoch"]), batching, dtype=np.int64),
        "epoch": np.asarray(rows["epoch"], dtype=np.int64),
        "phase": np.asarray(rows["phase"], dtype=np.int64),
        "learning_rate": np.asarray(rows["learning_rate"], dtype=np.float64),
        "batch": np.asarray(rows["batch"], dtype=np.int64),
        **{c: np.asarray(rows[c], dtype=np.float64) for c in (*GRADIENT_MEASURES, "full_grad_norm")},
        "position": np.asarray(rows["position"], dtype=np.int64),
    })
    return frame[DISTANCE_COLUMNS]


def null_frame(ordering: str, seed: int, rows: Mapping[str, Any]) -> pd.DataFrame:
    n = len(rows.get("epoch", []))
    frame = pd.DataFrame({
        "ordering": pd.Series([ordering] * n, dtype=object),
        "seed": np.full(n, seed, dtype=np.int64),
        **{c: np.asarray(rows.get(c, []), dtype=np.int64) for c in ("epoch", "phase", "draw")},
        **{c: np.asarray(rows.get(c, []), dtype=np.float64)
           for c in ("learning_rate", *GRADIENT_MEASURES, "full_grad_norm")},
    })
    return frame[NULL_COLUMNS]


def history_frame(ordering: str, seed: int, run_name: str, rows: Mapping[str, Any]) -> pd.DataFrame:
    n = len(rows["epoch"])
    frame = pd.DataFrame({c: np.asarray(rows[c], dtype=np.float64) for c in HISTORY_NUMERIC})
    for c in ("epoch", "phase", "n_train", "batch_size"):
        frame[c] = frame[c].astype(np.int64)
    frame["gradients_kept"] = frame["gradients_kept"].astype(bool)
    frame["ordering"] = pd.Series([ordering] * n, dtype=object)
    frame["seed"] = np.full(n, seed, dtype=np.int64)
    frame["run_name"] = pd.Series([run_name] * n, dtype=object)
    return frame[HISTORY_COLUMNS]
