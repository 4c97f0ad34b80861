"""What MLflow records of a run, declared: the kinds of tracked datasets and how each table becomes metrics.

Each tracked catalog entry says ``metadata: tracking: {log: <kind>, ...}``; :data:`TRACKED`
has one row per kind (what it needs, what it promises); :func:`declaration_problems` refuses
a bad or orphaned declaration before a run, and :func:`missing_from_record` is what a test
checks a run's MLflow record against. The hook that logs (:mod:`.tracking`) dispatches on
these rows. See docs/tracking.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

#: The per-epoch columns of ``training_history`` logged as ``<column>/<ordering>``.
HISTORY_METRICS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "mean_distance", "learning_rate")
#: The learning-curve columns of ``batch_selection.learning_curves`` logged per (policy, seed).
CURVE_METRICS = ("val_accuracy", "val_loss", "train_loss")
#: The per-run results of ``batch_selection.run_results`` logged once per (policy, seed).
RESULT_METRICS = ("final_val_accuracy", "test_accuracy", "test_loss", "steps", "seconds", "probe_seconds",
                  "total_seconds")


@dataclass(frozen=True)
class Tracked:
    """One kind of tracked dataset: a row of :data:`TRACKED`, named by ``metadata.tracking.log`` of a catalog entry.

    ``method`` is the :class:`RunTracking` method called with ``(dataset name, data, declaration)``;
    ``needs`` the keys the entry's declaration must give (``label``: the ordering its metric keys
    and artifacts are named after; ``artifact_path``: where its files go in the run's artifacts);
    ``metrics`` and ``child_metrics`` what it logs in the run and in its nested runs, and
    ``artifact`` whether it logs files under ``artifact_path`` (what :func:`missing_from_record`
    checks).
    """

    method: str
    what: str
    needs: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    child_metrics: tuple[str, ...] = ()
    artifact: bool = False


#: Every kind of tracked dataset; a catalog entry points to one with ``metadata: tracking: {log: <kind>}``.
TRACKED: dict[str, Tracked] = {
    "training_history": Tracked(
        "_log_training", "each training's per-epoch curves <measure>/<label>.seed_<S> and their seed mean "
        "<measure>/<label> (step = epoch)", needs=("label",), metrics=HISTORY_METRICS),
    "trained_model": Tracked(
        "_log_models", "each seed's trained weights under <artifact_path>/<training run name>",
        needs=("label", "artifact_path"), artifact=True),
    "noise_units": Tracked(
        "_log_noise_units", "mean_noise_units/<ordering>.seed_<S> per epoch and their seed mean",
        metrics=("mean_noise_units",)),
    "claims": Tracked(
        "_log_claims", "the claim table as a JSON table artifact, and per claim, ordering and phase its "
        "effect, difference and Holm p", needs=("artifact_path",),
        metrics=("claim_rank_biserial", "claim_difference", "claim_p_holm"), artifact=True),
    "file": Tracked("_log_file", "the saved file or folder as artifacts", needs=("artifact_path",), artifact=True),
    "table": Tracked("_log_table", "the table as a JSON table artifact", needs=("artifact_path",), artifact=True),
    "selection_curves": Tracked(
        "_keep_selection_curves", "batch_selection's learning curves, logged with its results"),
    "selection_results": Tracked(
        "_log_selection_runs", "one nested run per (policy, seed): its learning curve, steps to the target "
        "and final results", child_metrics=CURVE_METRICS + RESULT_METRICS),
}
#: The keys a declaration may have.
DECLARATION_KEYS = ("log", "label", "artifact_path")


# ---------------------------------------------------------------------- tables -> metrics


def history_metrics(label: str, history: pd.DataFrame) -> list[tuple[str, float, int]]:
    """``(key, value, step)`` of every finite per-epoch number of a ``training_history``, step = epoch."""
    return [(f"{column}/{label}", float(row[column]), int(row["epoch"]))
            for _, row in history.iterrows() for column in HISTORY_METRICS
            if column in history and finite(row[column])]


def noise_unit_metrics(noise_units: pd.DataFrame) -> list[tuple[str, float, int]]:
    """``mean_noise_units/<ordering>.seed_<S>`` per epoch (the mean noise-unit z of the epoch's batches
    in that seed's run) and ``mean_noise_units/<ordering>``, their mean over the seeds."""
    if noise_units.empty:
        return []
    table = noise_units if "seed" in noise_units else noise_units.assign(seed=0)
    per_seed = table.groupby(["ordering", "seed", "epoch"])["noise_z"].mean()
    metrics = [(f"mean_noise_units/{training_label(ordering, seed)}", float(value), int(epoch))
               for (ordering, seed, epoch), value in per_seed.items() if finite(value)]
    seed_means = per_seed.groupby(level=["ordering", "epoch"]).mean()
    metrics += [(f"mean_noise_units/{ordering}", float(value), int(epoch))
                for (ordering, epoch), value in seed_means.items() if finite(value)]
    return metrics


def claim_metrics(claims: pd.DataFrame) -> list[tuple[str, float, int]]:
    """Per tested claim, ordering and phase: its primary effect (rank-biserial), mean difference and Holm p."""
    metrics = []
    for _, row in claims.iterrows():
        # one "/" only: the MLflow UI makes one chart section per prefix before the last "/"
        where = f"{row['claim_id']}.{row['ordering']}.phase_{int(row['phase'])}"
        for column in ("rank_biserial", "difference", "p_holm"):
            if finite(row.get(column)):
                metrics.append((f"claim_{column}/{where}", float(row[column]), 0))
    return metrics


def selection_curve_metrics(curve: pd.DataFrame) -> list[tuple[str, float, int]]:
    """A (policy, seed) learning curve, step = optimizer step."""
    return [(column, float(row[column]), int(row["step"])) for _, row in curve.sort_values("step").iterrows()
            for column in CURVE_METRICS if column in curve and finite(row[column])]


def training_label(ordering: str, seed: int) -> str:
    """``intensity.seed_0``: one (ordering, seed) training in metric keys and tags."""
    return f"{ordering}.seed_{seed}"


def training_run_names(history: pd.DataFrame) -> dict[int, str]:
    """``{seed: run name}`` of a ``training_history`` (seed 0 for a table without seeds)."""
    if "run_name" not in history or history.empty:
        return {}
    table = history if "seed" in history else history.assign(seed=0)
    names = table.dropna(subset=["run_name"]).groupby("seed", sort=True)["run_name"].last()
    return {int(seed): str(name) for seed, name in names.items()}


def seed_rows(table: pd.DataFrame, seed: int) -> pd.DataFrame:
    return table.loc[table["seed"] == seed] if "seed" in table else table


def seed_mean(history: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """Per epoch, the mean over seeds of each column (NaN where a seed has none)."""
    present = [column for column in columns if column in history]
    return history.groupby("epoch", sort=True)[present].mean().reset_index()


# ---------------------------------------------------------------------- the declarations


def declaration_of(entry: Mapping[str, Any]) -> dict[str, str] | None:
    """``metadata.tracking`` of one catalog entry (None: the dataset is not tracked)."""
    metadata = entry.get("metadata") if isinstance(entry, Mapping) else None
    declaration = metadata.get("tracking") if isinstance(metadata, Mapping) else None
    return dict(declaration) if isinstance(declaration, Mapping) else declaration


def tracked_entries(catalog_conf: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """``{entry name or pattern: declaration}`` of every catalog entry that declares tracking."""
    return {name: declaration for name, entry in catalog_conf.items()
            if not name.startswith("_") and (declaration := declaration_of(entry)) is not None}


def declaration_problems(catalog_conf: Mapping[str, Any], produced: Iterable[str] | None = None) -> list[str]:
    """What is wrong with the catalog's tracking declarations; ``[]`` when nothing is.

    Every declaration names a kind of :data:`TRACKED` and gives the keys that kind needs;
    every kind is pointed to by at least one entry (an entry renamed or dropped without its
    declaration leaves its kind behind). With ``produced`` (the datasets the registered
    pipelines write), every declaring entry must also be one of them (or a pattern one
    matches): a pipeline output renamed away from its entry would otherwise never be saved,
    so never tracked.
    """
    from parse import parse

    problems, used = [], set()
    entries = tracked_entries(catalog_conf)
    for name, declaration in entries.items():
        if not isinstance(declaration, Mapping) or declaration.get("log") not in TRACKED:
            kind = declaration.get("log") if isinstance(declaration, Mapping) else declaration
            problems.append(f"'{name}' declares tracking {kind!r}, which is not a kind of TRACKED "
                            f"({', '.join(TRACKED)}); write `tracking: {{log: <kind>}}`")
            continue
        kind = declaration["log"]
        used.add(kind)
        unknown = sorted(set(declaration) - set(DECLARATION_KEYS))
        missing = [key for key in TRACKED[kind].needs if not isinstance(declaration.get(key), str)]
        if unknown:
            problems.append(f"'{name}' declares unknown tracking keys {unknown} (known: {', '.join(DECLARATION_KEYS)})")
        if missing:
            problems.append(f"'{name}' is tracked as {kind!r}, which needs {missing}")
    problems += [f"no catalog entry declares tracking {kind!r} ({TRACKED[kind].what}): the entry that did was "
                 "renamed or removed without its metadata" for kind in TRACKED if kind not in used]
    if produced is not None:
        produced = set(produced)
        for name in entries:
            if name not in produced and not any(parse(name, output) is not None for output in produced):
                problems.append(f"'{name}' declares tracking but no pipeline writes a dataset of that name")
    return problems


def missing_from_record(client: Any, run_id: str, declaration: Mapping[str, str]) -> list[str]:
    """The metrics and artifacts ``declaration`` promises that the MLflow run ``run_id`` lacks.

    A metric with a ``label`` is ``<metric>/<label>`` (or ``<metric>/<label>.seed_<S>``), one
    without any ``<metric>/...``; an artifact is the declared ``artifact_path``; child metrics
    are looked for in the run's nested runs.
    """
    tracked = TRACKED[declaration["log"]]
    run = client.get_run(run_id)
    missing = []
    label = declaration.get("label")
    for metric in tracked.metrics:
        prefix = f"{metric}/{label}" if label else f"{metric}/"
        if not any(key == prefix or key.startswith(f"{prefix}.seed_" if label else prefix) for key in run.data.metrics):
            missing.append(f"metric {prefix}{'' if label else '...'}")
    if tracked.artifact:
        path = declaration["artifact_path"]
        parent = path.rsplit("/", 1)[0] if "/" in path else None
        if path not in {artifact.path for artifact in client.list_artifacts(run_id, parent)}:
            missing.append(f"artifact {path}")
    if tracked.child_metrics:
        children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
        logged = {key for child in children for key in child.data.metrics}
        missing += [f"metric {metric} of a nested run" for metric in tracked.child_metrics if metric not in logged]
    return missing


def finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
