"""MLflow tracking of every ``kedro run``, through the kedro-mlflow plugin (docs/tracking.md).

Kedro glue, registered in ``settings.py``. One ``kedro run`` is one MLflow run,
named after its pipelines and environment and tagged with the environment, the git
commit and the run names of the trainings it used. Everything logged comes from
the datasets the pipelines already save (the ``after_dataset_saved`` hook), never
from inside the core library. What a saved dataset logs is declared on its catalog
entry, ``metadata: tracking: {log: <kind>, ...}``, and each kind is one row of
:data:`TRACKED`; no dataset name is matched here, so a renamed entry keeps its
tracking, and ``tests/test_tracking.py`` fails when a declaration points nowhere or a
declared metric or artifact is missing from a run's record:

* parameters, flattened, by kedro-mlflow's own hook (``mlflow.yml``);
* per training (one per ordering and seed of ``gradient_training.seeds``) and epoch
  (step = epoch): ``train_loss``, ``train_accuracy``, ``test_loss``,
  ``test_accuracy``, ``mean_distance``, ``learning_rate`` (from
  ``<ordering>.training_history``) and ``mean_noise_units`` (the mean noise-unit z
  of the epoch's batches, from ``distance_noise_units``), named
  ``<measure>/<ordering>.seed_<S>``, and their mean over the seeds as
  ``<measure>/<ordering>``, so that the orderings are curves of one chart group;
* the claim verdicts as a table artifact, and per claim, ordering and phase its
  ``claim_rank_biserial/<claim>.<ordering>.phase_<k>``, ``claim_difference/...`` and ``claim_p_holm/...``;
* the report and the PNG figures (heat maps among them) as artifacts, and each
  training's model under its training run name;
* ``batch_selection``: one nested run per (policy, seed) with its validation
  curve (step = optimizer step), its steps to the target and its final accuracies.

A finished training found again by its hash (the training log says "complete;
reusing its results") is not logged again: its tags say ``reused`` and link to the
MLflow run that trained it.

Why this hook drives kedro-mlflow's ``MlflowHook`` instead of letting Kedro
register it (``DISABLE_HOOKS_FOR_PLUGINS`` in ``settings.py``):

* tracking must never fail a run: every call to the plugin and to MLflow is
  guarded; the first failure (an unwritable store, a server that is down) is
  one warning, and the run goes on untracked;
* ``enabled: false`` in ``mlflow.yml`` switches tracking off, and nothing is
  written to the store before the run's checks (``hooks.RunChecks``) have passed,
  so a refused run leaves no trace;
* a relative SQLite store is placed inside the project, wherever Kedro runs from;
* the experiment is tagged as model training (``mlflow.experimentKind``), so MLflow 3's
  UI opens it on runs and metrics, not on its GenAI view.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.framework.hooks import hook_impl

# Kedro imports the plugin anyway (its entry points) on every session. On import, MLflow warns that the
# plugin's pipeline model (unused here) lacks type hints, and forces that warning to show past any
# filter; recording the warnings of this import is the one way to keep it out of every run's log.
with warnings.catch_warnings(record=True):
    from kedro_mlflow.config.kedro_mlflow_config import KedroMlflowConfig
    from kedro_mlflow.framework.hooks.mlflow_hook import MlflowHook

from best_minibatch.kedro_glue.tracked import (
    HISTORY_METRICS,
    RESULT_METRICS,
    TRACKED,
    claim_metrics,
    declaration_of,
    declaration_problems,
    finite,
    history_metrics,
    noise_unit_metrics,
    seed_mean,
    seed_rows,
    selection_curve_metrics,
    training_label,
    training_run_names,
)

logger = logging.getLogger(__name__)

#: The logger and message of gradient_training that say a training was found by its hash.
TRAINING_LOGGER = "best_minibatch.gradient_training"
_FOUND = re.compile(r"^(?P<label>.+?): run '(?P<run_name>[^']+)' found in .*, "
                    r"(?P<what>complete; reusing its results|resuming after epoch (?P<epoch>\d+))$")
_METRICS_PER_CALL = 1000  # MLflow's log_batch limit
# Tag keys (MLflow tags are the links between runs: the UI filters and searches on them).
# {training} is "<ordering>.seed_<S>": one training run per (ordering, seed) of gradient_training.seeds.
TRAINING_TAG = "training_run.{training}"
STATUS_TAG = "training_run.{training}.status"
TRAINED_IN_TAG = "training_run.{training}.trained_in"
TRAINED, REUSED, READ = "trained", "reused", "read"


class TrackingConfigError(ValueError):
    """``mlflow.yml`` cannot be used; the message names the key and the fix."""


class RunTracking:
    """Kedro hooks: one MLflow run per ``kedro run``, logged from the datasets the run saves."""

    def __init__(self) -> None:
        self._config: Any = None  # kedro_mlflow's KedroMlflowConfig, when tracking is on
        self._context: Any = None
        self._save_version: str | None = None
        self._reset_run()

    def _reset_run(self) -> None:
        self._plugin: Any = None
        self._client: Any = None
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._catalog: Any = None
        self._declarations: dict[str, dict[str, str] | None] = {}  # dataset name -> its tracking declaration
        self._warned = False
        self._trainings: dict[tuple[str, int], dict[str, str]] = {}  # (ordering, seed) -> run_name, status
        self._found: dict[str, str] = {}  # training run name -> status, from the training log
        self._curves: pd.DataFrame | None = None
        self._log_handler: logging.Handler | None = None
        self._active = False
        self._own_run = False  # False when an MLflow run was open before `kedro run` (an orchestrator's)

    # ------------------------------------------------------------------ configuration

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        """Read ``mlflow.yml``; nothing is written anywhere until a run has passed its checks."""
        self._config, self._context = None, context
        conf = load_tracking_conf(context)
        enabled = conf.pop("enabled", True)
        if not isinstance(enabled, bool):
            raise TrackingConfigError(f"mlflow.yml: enabled must be true or false, got {enabled!r}. "
                                      "Write `enabled: false` to switch tracking off.")
        if not enabled:
            return
        problems = declaration_problems(load_catalog_conf(context))
        if problems:
            raise TrackingConfigError("The catalog's tracking declarations (metadata: tracking): " + "; ".join(problems)
                                      + ". The kinds and their keys are TRACKED in best_minibatch/tracking.py "
                                      "(docs/tracking.md).")
        from pydantic import ValidationError

        try:
            config = KedroMlflowConfig.model_validate(conf)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            raise TrackingConfigError(
                f"mlflow.yml: {problems}. Fix the key (the plugin's keys are listed in conf/base/mlflow.yml and "
                "docs/tracking.md), or write `enabled: false` to switch tracking off."
            ) from error
        if config.tracking.experiment.name == "Default" and "name" not in conf.get("tracking", {}).get(
                "experiment", {}):
            config.tracking.experiment.name = context._package_name or "best_minibatch"
        uri = config.server.mlflow_tracking_uri
        if uri is not None:
            config.server.mlflow_tracking_uri = project_sqlite_uri(uri, Path(context.project_path))
        experiment_options = config.tracking.experiment.create_experiment_kwargs
        experiment_options.artifact_location = artifact_location(uri, experiment_options.artifact_location)
        # As kedro-mlflow does, so that `kedro mlflow ui` and notebooks find the configuration.
        context.__setattr__("mlflow", config)
        self._config = config

    @hook_impl
    def after_catalog_created(self, save_version: str) -> None:
        self._save_version = save_version

    # ------------------------------------------------------------------ the run

    @hook_impl(trylast=True)  # after hooks.RunChecks: a refused run writes nothing to the store
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        self._reset_run()
        if self._config is None:
            return
        self._catalog = catalog
        self._active = True
        self._guard("start the MLflow run", self._start, run_params, pipeline, catalog)

    def _start(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        import mlflow

        config, context = self._config, self._context
        already_active = mlflow.active_run() is not None
        if not already_active:
            store = sqlite_path(config.server.mlflow_tracking_uri)
            if store is not None:
                store.parent.mkdir(parents=True, exist_ok=True)
            config.setup(context)  # tracking URI, experiment (created on first use)
        env = run_params.get("env") or _default_env()
        pipelines = run_params.get("pipeline_names") or ["__default__"]
        name = run_name(pipelines, run_params.get("namespaces"), env)
        if config.tracking.run.name is None:
            config.tracking.run.name = name
        plugin = MlflowHook()
        plugin.mlflow_config = config
        plugin._already_active_mlflow = already_active
        self._own_run = not already_active
        plugin.before_pipeline_run(run_params, pipeline, catalog)
        self._plugin = plugin
        self._run_id = plugin.run_id
        if self._run_id is None:  # the pipeline is listed in tracking.disable_tracking.pipelines
            return
        self._client = mlflow.MlflowClient(tracking_uri=mlflow.get_tracking_uri())
        self._experiment_id = self._client.get_run(self._run_id).info.experiment_id
        mark_model_training(self._client, self._experiment_id)
        commit, dirty = git_state([Path(context.project_path), Path(__file__).parent])
        tags = {"env": env, "pipelines": ",".join(pipelines), "git_commit": commit or "unknown",
                "git_dirty": str(dirty).lower() if commit else "unknown"}
        if run_params.get("namespaces"):
            tags["namespaces"] = ",".join(run_params["namespaces"])
        if commit:
            tags["mlflow.source.git.commit"] = commit
        self._client.log_batch(self._run_id, tags=_tags(tags))
        self._log_handler = _TrainingLogHandler(self._found)
        logging.getLogger(TRAINING_LOGGER).addHandler(self._log_handler)
        logger.info("MLflow run '%s' (%s) in %s", config.tracking.run.name, self._run_id,
                    config.server.mlflow_tracking_uri)

    @hook_impl
    def before_node_run(self, node: Any, catalog: Any, inputs: dict[str, Any], is_async: bool) -> None:
        if self._tracking():
            # The report's whole `parameters` input would log every parameter a second time under
            # "parameters."; each section is logged from the nodes that read it.
            params = {key: value for key, value in inputs.items() if key != "parameters"}
            self._guard("log the parameters", self._plugin.before_node_run, node, catalog, params, is_async)

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str, data: Any) -> None:
        """A training history read, not written, by this run names trainings it used."""
        if not self._tracking() or not isinstance(data, pd.DataFrame):
            return
        declaration = self._declared(dataset_name)
        if declaration is not None and declaration["log"] == "training_history":
            for seed, name in training_run_names(data).items():
                self._trainings.setdefault((declaration["label"], seed), {"run_name": name, "status": READ})

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any) -> None:
        if self._tracking():
            self._guard(f"log '{dataset_name}'", self._log_saved, dataset_name, data)

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        self._finish(lambda: self._plugin.after_pipeline_run(run_params, pipeline, catalog))

    @hook_impl
    def on_pipeline_error(self, error: Exception, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        self._finish(lambda: self._plugin.on_pipeline_error(error, run_params, pipeline, catalog))

    def _finish(self, end: Callable[[], None]) -> None:
        self._remove_log_handler()
        if self._tracking():
            self._guard("tag the trainings used", self._tag_trainings)
        if self._plugin is not None and self._active:
            self._guard("end the MLflow run", end)
            if self._own_run:
                self._guard("end the MLflow run", _close_run, self._run_id)
        self._active = False

    # ------------------------------------------------------------------ what each dataset logs

    def _declared(self, name: str) -> dict[str, str] | None:
        """The tracking declaration of a dataset's catalog entry (its pattern's, placeholders filled in)."""
        if name not in self._declarations:
            try:
                config = self._catalog.config_resolver.resolve_pattern(name)
            except Exception:  # a dataset the catalog cannot resolve declares nothing
                config = {}
            self._declarations[name] = declaration_of(config)
        return self._declarations[name]

    def _log_saved(self, name: str, data: Any) -> None:
        declaration = self._declared(name)
        if declaration is not None:
            getattr(self, TRACKED[declaration["log"]].method)(name, data, declaration)

    def _log_training(self, name: str, history: Any, declaration: Mapping[str, str]) -> None:
        """Each seed's curves (``<measure>/<ordering>.seed_<S>``) and, when every seed was trained in
        this run, their mean (``<measure>/<ordering>``); a reused training is only named (tags)."""
        if not isinstance(history, pd.DataFrame):
            return
        ordering = declaration["label"]
        names = training_run_names(history)
        for seed, run in names.items():
            status = self._found.get(run, TRAINED)
            self._trainings[(ordering, seed)] = {"run_name": run, "status": status}
            if status != REUSED:
                self._log_metrics(history_metrics(training_label(ordering, seed), seed_rows(history, seed)))
        if names and all(self._trainings[(ordering, seed)]["status"] != REUSED for seed in names):
            self._log_metrics(history_metrics(ordering, seed_mean(history, HISTORY_METRICS)))

    def _log_noise_units(self, name: str, data: Any, declaration: Mapping[str, str]) -> None:
        self._log_metrics(noise_unit_metrics(data))

    def _log_claims(self, name: str, data: Any, declaration: Mapping[str, str]) -> None:
        self._log_table(name, data, declaration)
        self._log_metrics(claim_metrics(data))

    def _log_table(self, name: str, data: Any, declaration: Mapping[str, str]) -> None:
        self._client.log_table(self._run_id, data=_json_safe(data), artifact_file=declaration["artifact_path"])

    def _log_file(self, name: str, data: Any, declaration: Mapping[str, str]) -> None:
        self._log_artifact(name, declaration["artifact_path"])

    def _keep_selection_curves(self, name: str, data: Any, declaration: Mapping[str, str]) -> None:
        self._curves = data

    def _log_selection_runs(self, name: str, results: Any, declaration: Mapping[str, str]) -> None:
        if self._curves is not None:
            self._log_selection_children(self._curves, results, _selection_target(self._catalog))
            self._curves = None

    def _log_models(self, name: str, flat: Any, declaration: Mapping[str, str]) -> None:
        """Each seed's trained weights under its training run name (the project's tensor format)."""
        import tempfile

        from best_minibatch.data.tensor_io import save_tensors_atomically
        from best_minibatch.gradient_training import seed_model_states

        if not isinstance(flat, dict):
            return
        for seed, state in sorted(seed_model_states(flat).items()):
            training = self._trainings.get((declaration["label"], seed))
            if training is None or training["status"] == REUSED:
                continue
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "trained_model.pt"
                save_tensors_atomically(state, path)
                self._client.log_artifact(self._run_id, str(path),
                                          f"{declaration['artifact_path']}/{training['run_name']}")

    def _log_metrics(self, metrics: Iterable[tuple[str, float, int]], run_id: str | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value, step in metrics]
        for start in range(0, len(batch), _METRICS_PER_CALL):
            self._client.log_batch(run_id or self._run_id, metrics=batch[start:start + _METRICS_PER_CALL])

    def _log_artifact(self, dataset_name: str, artifact_path: str) -> None:
        path = saved_path(self._catalog, dataset_name, self._save_version)
        if path is None:
            logger.debug("Not logged to MLflow: the file of '%s' was not found", dataset_name)
        elif path.is_dir():
            self._client.log_artifacts(self._run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self._run_id, str(path), artifact_path)

    def _log_selection_children(self, curves: pd.DataFrame, results: pd.DataFrame, target: float | None) -> None:
        """One nested run per (policy, seed): its learning curve, steps to the target, final results."""
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        from best_minibatch.selection.statistics import time_to_target

        reached = time_to_target(curves, target).set_index(["seed", "policy"]) if target is not None else None
        for (policy, seed), curve in curves.groupby(["policy", "seed"], sort=True):
            child = self._client.create_run(
                self._experiment_id, run_name=f"{policy} seed {int(seed)}",
                tags={MLFLOW_PARENT_RUN_ID: self._run_id, "policy": str(policy), "seed": str(int(seed)),
                      "kind": "batch_selection"},
            ).info.run_id
            metrics = selection_curve_metrics(curve)
            result = results.loc[(results["policy"] == policy) & (results["seed"] == seed)]
            if len(result):
                metrics += [(column, float(result.iloc[0][column]), 0) for column in RESULT_METRICS
                            if column in result and finite(result.iloc[0][column])]
            if reached is not None and (seed, policy) in reached.index:
                steps = reached.loc[(seed, policy), "steps_to_target"]
                if finite(steps):
                    metrics.append(("steps_to_target", float(steps), 0))
            params = [Param("policy", str(policy)), Param("seed", str(int(seed)))]
            if target is not None:
                params.append(Param("target_validation_accuracy", str(target)))
            self._client.log_batch(child, params=params)
            self._log_metrics(metrics, child)
            self._client.set_terminated(child)

    def _tag_trainings(self) -> None:
        """Tags naming every training this run used, and for reused or read ones the MLflow run that trained it."""
        tags, notes = {}, []
        for (ordering, seed), training in sorted(self._trainings.items()):
            key, name, status = training_label(ordering, seed), training["run_name"], training["status"]
            tags[TRAINING_TAG.format(training=key)] = name
            tags[STATUS_TAG.format(training=key)] = status
            note = f"* `{ordering}`, seed {seed}: training `{name}`, {status}"
            if status in (REUSED, READ):
                trained_in = self._run_that_trained(key, name)
                tags[TRAINED_IN_TAG.format(training=key)] = trained_in or "not tracked"
                if trained_in:
                    experiment = self._client.get_run(trained_in).info.experiment_id
                    note += f" (trained in [{trained_in}](#/experiments/{experiment}/runs/{trained_in}))"
            notes.append(note)
        if tags:
            tags["training_runs"] = ", ".join(f"{training_label(o, s)}={t['run_name']}"
                                              for (o, s), t in sorted(self._trainings.items()))
            tags["mlflow.note.content"] = "Trainings used by this run:\n\n" + "\n".join(notes)
            self._client.log_batch(self._run_id, tags=_tags(tags))

    def _run_that_trained(self, training: str, name: str) -> str | None:
        """The newest tracked run, in any experiment of the store, that trained run ``name`` of ``training``."""
        experiments = [e.experiment_id for e in self._client.search_experiments()]
        filter_string = (f"tags.`{TRAINING_TAG.format(training=training)}` = '{name}' and "
                         f"tags.`{STATUS_TAG.format(training=training)}` != '{REUSED}' and "
                         f"tags.`{STATUS_TAG.format(training=training)}` != '{READ}'")
        runs = self._client.search_runs(experiments, filter_string, order_by=["attributes.start_time DESC"],
                                        max_results=2)
        runs = [run for run in runs if run.info.run_id != self._run_id]
        return runs[0].info.run_id if runs else None

    # ------------------------------------------------------------------ never fail a run

    def _tracking(self) -> bool:
        return self._run_id is not None and self._active

    def _guard(self, what: str, call: Callable[..., Any], *args: Any) -> Any:
        """Run one tracking step; its first failure is one warning and ends tracking for this run."""
        if not self._active:
            return None
        try:
            return call(*args)
        except Exception as error:  # tracking must never fail a run
            self._active = False
            self._remove_log_handler()
            if not self._warned:
                self._warned = True
                store = getattr(getattr(self._config, "server", None), "mlflow_tracking_uri", None)
                logger.warning(
                    "MLflow tracking is off for the rest of this run: could not %s in the store '%s' (%s: %s). "
                    "The run itself goes on. Make the store writable or reachable, or point mlflow.yml at "
                    "another one (docs/tracking.md); `enabled: false` in mlflow.yml switches tracking off.",
                    what, store, type(error).__name__, _first_line(error),
                )
            _end_active_runs()
            return None

    def _remove_log_handler(self) -> None:
        if self._log_handler is not None:
            logging.getLogger(TRAINING_LOGGER).removeHandler(self._log_handler)
            self._log_handler = None


class _TrainingLogHandler(logging.Handler):
    """Notes the trainings that gradient_training found by their hash (reused or resumed)."""

    def __init__(self, found: dict[str, str]) -> None:
        super().__init__(level=logging.INFO)
        self.found = found

    def emit(self, record: logging.LogRecord) -> None:
        try:
            match = _FOUND.match(record.getMessage())
        except Exception:  # a record that cannot be formatted is not ours
            return
        if match:  # a run name is unique to its (ordering, seed)
            self.found[match["run_name"]] = REUSED if match["epoch"] is None else f"resumed after epoch {match['epoch']}"


# ---------------------------------------------------------------------- helpers


def load_catalog_conf(context: Any) -> dict[str, Any]:
    """The run environment's catalog configuration, entries and patterns as written (empty when absent)."""
    from kedro.config import MissingConfigException

    try:
        return dict(context.config_loader["catalog"] or {})
    except MissingConfigException:
        return {}



def load_tracking_conf(context: Any) -> dict[str, Any]:
    """``mlflow.yml`` of the run's environment, as kedro-mlflow reads it (empty when absent)."""
    from kedro.config import MissingConfigException

    loader = context.config_loader
    if "mlflow" not in loader.config_patterns:
        loader.config_patterns.update({"mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"]})
    try:
        return dict(loader["mlflow"] or {})
    except MissingConfigException:
        return {}


def project_sqlite_uri(uri: str, project_path: Path) -> str:
    """A relative ``sqlite:///path`` made relative to the project folder, not to the working directory."""
    path = sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    return f"sqlite:///{(project_path / path).as_posix()}"


#: MLflow 3's UI opens an experiment by its tag ``mlflow.experimentKind`` (in MLflow 3.17's UI bundle:
#: ``genai_development``, ``custom_model_development``, ...); an untagged one opened in the GenAI view
#: (traces, sessions). ``custom_model_development`` is its model-training view: runs and metrics.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def mark_model_training(client: Any, experiment_id: str) -> None:
    """Tag the experiment as model training (unless a user chose another kind in the UI)."""
    experiment = client.get_experiment(experiment_id)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)


def artifact_location(tracking_uri: str | None, location: str | None) -> str | None:
    """``location`` for a new experiment; a folder of this project only where the store is local too.

    With a tracking server (``http://...``), a relative folder would name a path on this machine
    in the server's experiment; the server's own artifact store is used instead.
    """
    if not location or "://" in location or Path(location).is_absolute():
        return location
    local = tracking_uri is None or tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri
    return location if local else None


def sqlite_path(uri: str | None) -> Path | None:
    if not uri or not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


def run_name(pipelines: Iterable[str], namespaces: Iterable[str] | None, env: str) -> str:
    """``"__default__ @ local"``, ``"gradient_training[edges] @ local"``, ``"a+b @ paper"``."""
    name = "+".join(pipelines)
    if namespaces:
        name += f"[{','.join(namespaces)}]"
    return f"{name} @ {env}"


def git_state(folders: Iterable[Path]) -> tuple[str | None, bool]:
    """The commit checked out where the project or the code lives, and whether files differ from it."""
    for folder in folders:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                                    timeout=10, check=True).stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                                    capture_output=True, text=True, timeout=20, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if commit:
            return commit, bool(status.strip())
    return None, False


def saved_path(catalog: Any, dataset_name: str, save_version: str | None) -> Path | None:
    """The file or folder a dataset was just saved to (its version of this run when versioned)."""
    try:
        config = catalog.config_resolver.resolve_pattern(dataset_name)
    except Exception:
        return None
    if "filepath" not in config and isinstance(config.get("dataset"), dict):
        config = config["dataset"]  # a wrapper such as OptionalDataset
    if "filepath" not in config:
        return None
    path = Path(config["filepath"])
    if config.get("versioned") and save_version:
        path = path / save_version / path.name
    return path if path.exists() else None


def _selection_target(catalog: Any) -> float | None:
    try:
        value = catalog.load("params:batch_selection").get("target_validation_accuracy")
    except Exception:
        return None
    return float(value) if finite(value) else None


def _default_env() -> str:
    from kedro.framework.project import settings

    return (getattr(settings, "CONFIG_LOADER_ARGS", {}) or {}).get("default_run_env") or "local"


def _json_safe(table: pd.DataFrame) -> pd.DataFrame:
    """A copy MLflow's JSON table artifact can hold: values other than text and numbers as text."""
    safe = table.copy()
    for column in [c for c in safe.columns if pd.api.types.is_object_dtype(safe[c].dtype)]:
        safe[column] = safe[column].map(lambda v: v if v is None or isinstance(v, (str, int, float, bool)) else str(v))
    return safe


def _tags(tags: dict[str, str]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(key, str(value)) for key, value in tags.items()]


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""


def _close_run(run_id: str | None) -> None:
    """Take ``run_id`` off MLflow's stack of active runs wherever the plugin left it open (``nested: true``)."""
    import mlflow

    while run_id is not None and (active := mlflow.active_run()) is not None and active.info.run_id == run_id:
        mlflow.end_run()


def _end_active_runs() -> None:
    """Close every MLflow run this thread left open, quietly (the store may be what failed)."""
    try:
        import mlflow
    except ImportError:
        return
    for _ in range(10):
        if mlflow.active_run() is None:
            return
        try:
            mlflow.end_run("FAILED")
        except Exception:
            continue
