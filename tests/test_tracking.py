"""MLflow tracking (docs/tracking.md): what a run logs equals the project's own tables and files, and what
the catalog declares tracked (``metadata: tracking``) is in the run's record.

The quick whole-project run of ``finished_project`` (tests/conftest.py) is tracked in its
own store, ``<project>/data/09_tracking/mlflow.db``; these tests read it back with
``MlflowClient``, through the MLflow UI's REST API, and after a second run that reuses
the trainings and runs a small ``batch_selection``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from kedro.config import OmegaConfigLoader
from kedro.framework.project import pipelines
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from mlflow.tracking import MlflowClient

from best_minibatch.batches.orderings import all_orderings
from best_minibatch.data.tensor_io import load_tensors
from best_minibatch.gradient_training import seed_model_states
from best_minibatch.kedro_glue import tracked as declarations
from best_minibatch.kedro_glue import tracking
from best_minibatch.selection.statistics import time_to_target
from tests.conftest import PROJECT_ROOT, QUICK_RUN_PARAMS, copy_project, run_session
from tests.test_kedro_viz import free_port, start_group, stop_group, wait_for

HISTORY_COLUMNS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "mean_distance", "learning_rate")
CLAIM_COLUMNS = ["claim_id", "ordering", "phase", "verdict", "difference", "p_holm"]
# A small batch_selection: 2 seeds x 2 policies, 2 epochs of 40 steps, evaluated twice per epoch.
SMALL_SELECTION = {"batch_selection": {
    "seeds": [0, 1], "policies": ["shuffle", "fixed_random"], "target_validation_accuracy": 0.2,
    "training": {"phases": [{"epochs": 1, "lr": 0.1}, {"epochs": 1, "lr": 0.01}]},
}}


RERUN_PIPELINES = ["gradient_training", "distance_analysis", "batch_selection"]


def store_uri(project: Path) -> str:
    return f"sqlite:///{project / 'data' / '09_tracking' / 'mlflow.db'}"


def flatten(value, key: str) -> dict:
    """``{"a": {"b": 1}}`` under ``key`` as ``{"key.a.b": 1}`` (lists and scalars are values)."""
    if isinstance(value, dict):
        return {k: v for name, item in value.items() for k, v in flatten(item, f"{key}.{name}").items()}
    return {key: value}


def newest(folder: Path) -> Path:
    """The newest version's file (or folder) of a versioned dataset folder."""
    return sorted(folder.iterdir())[-1] / folder.name


def top_level_runs(client: MlflowClient, experiment: str) -> list:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"])
    return [run for run in runs if "mlflow.parentRunId" not in run.data.tags]


@pytest.fixture(scope="module")
def tracked(finished_project) -> tuple[Path, MlflowClient, object]:
    client = MlflowClient(tracking_uri=store_uri(finished_project))
    runs = top_level_runs(client, "best_minibatch")
    assert len(runs) == 1, f"the quick run must be one MLflow run, found {[r.info.run_name for r in runs]}"
    return finished_project, client, runs[0]


def histories(project: Path) -> dict[str, pd.DataFrame]:
    tables = {o: pd.read_parquet(newest(project / f"data/07_model_output/{o}/training_history.parquet"))
              for o in all_orderings()}  # every metric plain and class-stratified
    return {o: t for o, t in tables.items() if len(t)}


def trainings(project: Path) -> dict[tuple[str, int], pd.DataFrame]:
    """``{(ordering, seed): that training's history rows}``: one training run per ordering and seed."""
    return {(o, int(seed)): part.sort_values("epoch") for o, history in histories(project).items()
            for seed, part in history.groupby("seed")}


def steps_and_values(client: MlflowClient, run_id: str, key: str) -> tuple[list[int], list[float]]:
    logged = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.step for m in logged], [m.value for m in logged]


# --------------------------------------------------------------------------- one tracked run


@pytest.mark.slow
def test_the_run_is_named_and_tagged_after_what_it_ran(tracked):
    project, _, run = tracked
    assert run.info.run_name == "__default__ @ local" and run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["env"] == "local" and tags["pipelines"] == "__default__"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    expected_commit = head.stdout.strip() if head.returncode == 0 else "unknown"
    assert tags["git_commit"] == expected_commit
    trained = trainings(project)
    everything = set(all_orderings())  # perceptual (both orderings) needs the weights
    assert {o for o, _ in trained} in (everything - {"perceptual", "perceptual_stratified"}, everything)
    assert len({seed for _, seed in trained}) >= 2  # gradient_training.seeds: [0, 1] in base
    for (ordering, seed), history in trained.items():
        training = f"training_run.{ordering}.seed_{seed}"
        assert tags[training] == history["run_name"].iloc[0]
        assert tags[f"{training}.status"] == "trained"
        assert f"{training}.trained_in" not in tags


@pytest.mark.slow
def test_parameters_are_the_flattened_parameters_the_run_read(tracked):
    project, _, run = tracked
    bootstrap_project(project)
    with KedroSession.create(project_path=project, runtime_params=QUICK_RUN_PARAMS) as session:
        params = session.load_context().params
    read = sorted(name.removeprefix("params:") for name in pipelines["__default__"].inputs()
                  if name.startswith("params:"))
    expected = {}
    for name in read:
        value = params
        for key in name.split("."):
            value = value[key]
        expected.update(flatten(value, name))
    assert "training.model.name" in expected and "gradient_training.run_name" in expected
    assert run.data.params == {key: str(value) for key, value in expected.items()}


@pytest.mark.slow
def test_per_epoch_metrics_equal_each_trainings_history_and_their_seed_mean(tracked):
    project, client, run = tracked
    for (ordering, seed), history in trainings(project).items():
        epochs = history["epoch"].tolist()
        assert epochs == [1, 2, 3]  # one epoch per phase in the quick run
        for column in HISTORY_COLUMNS:
            assert steps_and_values(client, run.info.run_id, f"{column}/{ordering}.seed_{seed}") == (
                epochs, history[column].tolist()), (column, ordering, seed)
    for ordering, history in histories(project).items():
        mean = history.groupby("epoch")[list(HISTORY_COLUMNS)].mean()
        for column in HISTORY_COLUMNS:
            assert steps_and_values(client, run.info.run_id, f"{column}/{ordering}") == (
                mean.index.tolist(), mean[column].tolist()), (column, ordering)


@pytest.mark.slow
def test_mean_noise_units_per_training_and_their_seed_mean_equal_the_noise_unit_table(tracked):
    project, client, run = tracked
    noise = pd.read_parquet(newest(project / "data/08_reporting/analysis/distance_noise_units.parquet"))
    per_seed = noise.groupby(["ordering", "seed", "epoch"])["noise_z"].mean()
    for (ordering, seed), means in per_seed.groupby(level=["ordering", "seed"]):
        assert steps_and_values(client, run.info.run_id, f"mean_noise_units/{ordering}.seed_{seed}") == (
            means.index.get_level_values("epoch").tolist(), means.tolist())
    seed_mean = per_seed.groupby(level=["ordering", "epoch"]).mean()
    assert set(seed_mean.index.get_level_values("ordering")) == set(histories(project))
    for ordering, means in seed_mean.groupby(level="ordering"):
        assert steps_and_values(client, run.info.run_id, f"mean_noise_units/{ordering}") == (
            means.index.get_level_values("epoch").tolist(), means.tolist())


@pytest.mark.slow
def test_claims_are_a_table_artifact_and_metrics_equal_to_claim_verdicts(tracked, tmp_path):
    project, client, run = tracked
    claims = pd.read_parquet(newest(project / "data/08_reporting/analysis/claim_verdicts.parquet"))
    path = client.download_artifacts(run.info.run_id, "analysis/claim_verdicts.json", str(tmp_path))
    table = pd.read_json(path, orient="split")
    pd.testing.assert_frame_equal(table[CLAIM_COLUMNS], claims[CLAIM_COLUMNS], check_dtype=False)
    not_tested = claims["verdict"].str.startswith("not tested")
    tested = claims.loc[~not_tested]
    assert len(tested) > 0
    metrics = run.data.metrics
    for row in tested.itertuples():
        where = f"{row.claim_id}.{row.ordering}.phase_{row.phase}"
        assert metrics[f"claim_rank_biserial/{where}"] == row.rank_biserial
        assert metrics[f"claim_difference/{where}"] == row.difference
        assert metrics[f"claim_p_holm/{where}"] == row.p_holm
    for row in claims.loc[not_tested].itertuples():  # e.g. perceptual without its weights: no number to log
        assert f"claim_difference/{row.claim_id}.{row.ordering}.phase_{row.phase}" not in metrics


@pytest.mark.slow
def test_report_heat_maps_and_models_are_artifacts_equal_to_the_saved_files(tracked, tmp_path):
    project, client, run = tracked
    run_id = run.info.run_id
    report = client.download_artifacts(run_id, "report/report.html", str(tmp_path / "report"))
    assert Path(report).read_bytes() == newest(project / "data/08_reporting/report.html").read_bytes()
    saved_maps = newest(project / "data/08_reporting/figures/distance_heatmaps/png")
    logged_maps = Path(client.download_artifacts(run_id, "figures/distance_heatmaps", str(tmp_path / "maps")))
    assert sorted(p.name for p in logged_maps.iterdir()) == sorted(p.name for p in saved_maps.iterdir())
    assert {f"heatmap_{o}.png" for o in histories(project)} <= {p.name for p in saved_maps.iterdir()}
    for png in saved_maps.iterdir():
        assert (logged_maps / png.name).read_bytes() == png.read_bytes()
    for (ordering, seed), history in trainings(project).items():
        saved = seed_model_states(load_tensors(newest(project / f"data/06_models/{ordering}/trained_model.pt")))
        artifact = f"models/{ordering}/{history['run_name'].iloc[0]}/trained_model.pt"
        logged = load_tensors(client.download_artifacts(run_id, artifact, str(tmp_path / f"{ordering}-{seed}")))
        assert list(logged) == list(saved[seed]) and len(logged) > 0
        assert all(torch.equal(logged[key], saved[seed][key]) for key in logged)


def declared_outputs(project: Path, pipeline: str) -> dict[str, dict]:
    """``{dataset: its tracking declaration}`` of every output of ``pipeline`` whose catalog entry declares one."""
    bootstrap_project(project)
    with KedroSession.create(project_path=project, runtime_params=QUICK_RUN_PARAMS) as session:
        catalog = session.load_context().catalog
    resolved = {name: declarations.declaration_of(catalog.config_resolver.resolve_pattern(name))
                for name in pipelines[pipeline].all_outputs()}
    return {name: declaration for name, declaration in resolved.items() if declaration is not None}


@pytest.mark.slow
def test_every_declared_metric_and_artifact_is_in_the_runs_record(tracked, rerun):
    project, client, run = tracked
    declared = declared_outputs(project, "__default__")
    trained = set(histories(project))  # an ordering skipped for want of its metric's weights trains nothing
    expected = {name: d for name, d in declared.items() if d.get("label") is None or d["label"] in trained}
    assert {d["log"] for d in expected.values()} == set(declarations.TRACKED) - {
        "selection_curves", "selection_results", "table"}  # batch_selection is not part of the default run
    assert sum(d["log"] == "training_history" for d in expected.values()) == len(trained) >= 8
    assert {name: declarations.missing_from_record(client, run.info.run_id, d) for name, d in expected.items()} == {
        name: [] for name in expected}
    selection_project, selection_client, selection_run, _ = rerun
    selection = declared_outputs(selection_project, "batch_selection")
    assert {d["log"] for d in selection.values()} == {"selection_curves", "selection_results", "table", "file"}
    assert {name: declarations.missing_from_record(selection_client, selection_run.info.run_id, d)
            for name, d in selection.items()} == {name: [] for name in selection}
    # What the check reports when a declared value is not in the record.
    assert declarations.missing_from_record(client, run.info.run_id, {"log": "selection_results"}) == [
        f"metric {metric} of a nested run" for metric in declarations.CURVE_METRICS + declarations.RESULT_METRICS]
    assert declarations.missing_from_record(client, run.info.run_id, {"log": "training_history", "label": "renamed"}) \
        == [f"metric {column}/renamed" for column in HISTORY_COLUMNS]
    assert declarations.missing_from_record(client, run.info.run_id, {"log": "file", "artifact_path": "figures/renamed"}) \
        == ["artifact figures/renamed"]


# --------------------------------------------------------------------------- reuse and batch_selection


@pytest.fixture(scope="module")
def rerun(finished_project, tmp_path_factory) -> tuple[Path, MlflowClient, object, str]:
    """A copy of the finished project, then one run of gradient_training (every training found
    complete and reused), distance_analysis (batch_selection reads its batch table, which must come
    from this run's distances: RunRecord) and a small batch_selection, in a second experiment of the
    same store."""
    project = tmp_path_factory.mktemp("rerun") / "project"
    shutil.copytree(finished_project, project)
    (project / "conf" / "local" / "mlflow.yml").write_text("tracking:\n  experiment:\n    name: rerun\n")
    first_run = top_level_runs(MlflowClient(store_uri(project)), "best_minibatch")[0].info.run_id
    previous = Path.cwd()
    os.chdir(project)
    try:
        bootstrap_project(project)
        with KedroSession.create(project_path=project,
                                 runtime_params={**QUICK_RUN_PARAMS, **SMALL_SELECTION}) as session:
            session.run(pipeline_names=RERUN_PIPELINES)
    finally:
        os.chdir(previous)
    assert mlflow.active_run() is None  # both sessions closed their MLflow runs
    client = MlflowClient(store_uri(project))
    runs = top_level_runs(client, "rerun")
    assert len(runs) == 1
    return project, client, runs[0], first_run


@pytest.mark.slow
def test_reused_trainings_are_tagged_with_the_run_that_trained_them_not_logged_again(rerun):
    project, client, run, first_run = rerun
    assert run.info.run_name == "gradient_training+distance_analysis+batch_selection @ local"
    for (ordering, seed), history in trainings(project).items():
        training = f"training_run.{ordering}.seed_{seed}"
        assert run.data.tags[training] == history["run_name"].iloc[0]
        assert run.data.tags[f"{training}.status"] == "reused"
        assert run.data.tags[f"{training}.trained_in"] == first_run
    assert first_run in run.data.tags["mlflow.note.content"]
    assert not [key for key in run.data.metrics if key.split("/")[0] in HISTORY_COLUMNS]
    assert client.list_artifacts(run.info.run_id, "models") == []


@pytest.mark.slow
def test_batch_selection_is_one_nested_run_per_policy_and_seed(rerun):
    project, client, run, _ = rerun
    curves = pd.read_parquet(newest(project / "data/08_reporting/batch_selection/learning_curves.parquet"))
    results = pd.read_parquet(newest(project / "data/08_reporting/batch_selection/run_results.parquet"))
    reached = time_to_target(curves, 0.2).set_index(["seed", "policy"])
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert sorted((c.data.params["policy"], c.data.params["seed"]) for c in children) == [
        ("fixed_random", "0"), ("fixed_random", "1"), ("shuffle", "0"), ("shuffle", "1")]
    for child in children:
        policy, seed = child.data.params["policy"], int(child.data.params["seed"])
        assert child.info.run_name == f"{policy} seed {seed}" and child.info.status == "FINISHED"
        curve = curves.loc[(curves["policy"] == policy) & (curves["seed"] == seed)].sort_values("step")
        logged = sorted(client.get_metric_history(child.info.run_id, "val_accuracy"), key=lambda m: m.step)
        assert [m.step for m in logged] == curve["step"].tolist() and len(logged) == 5  # start + 2 per epoch
        assert [m.value for m in logged] == curve["val_accuracy"].tolist()
        assert child.data.metrics["steps_to_target"] == reached.loc[(seed, policy), "steps_to_target"]
        result = results.loc[(results["policy"] == policy) & (results["seed"] == seed)].iloc[0]
        assert child.data.metrics["final_val_accuracy"] == result["final_val_accuracy"]
        assert child.data.metrics["test_accuracy"] == result["test_accuracy"]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "batch_selection")} == {
        "batch_selection/convergence.png", "batch_selection/summary.json"}


# --------------------------------------------------------------------------- the MLflow UI


def processes_in_group(group: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == group and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_mlflow_ui_serves_the_run_and_its_metrics_and_leaves_no_process(tracked, tmp_path):
    project, client, run = tracked
    port = free_port()
    log = tmp_path / "mlflow-ui.log"
    environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("w") as output:
        server = start_group(  # its own process group: the server and every worker it starts
            [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store_uri(project),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=project, env=environment, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for(f"{base}/health", 180, server)
        except AssertionError as error:
            raise AssertionError(f"{error}; mlflow ui said:\n{log.read_text()[-3000:]}") from error
        assert b"<title>MLflow</title>" in urllib.request.urlopen(base, timeout=30).read()
        api = f"{base}/api/2.0/mlflow"
        experiment = get_json(f"{api}/experiments/get-by-name?experiment_name=best_minibatch")["experiment"]
        request = urllib.request.Request(f"{api}/runs/search", method="POST",
                                         data=json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            served = json.loads(response.read())["runs"]
        assert [r["info"]["run_id"] for r in served] == [run.info.run_id]
        assert served[0]["info"]["run_name"] == "__default__ @ local"
        key = "test_accuracy/intensity"
        history = get_json(f"{api}/metrics/get-history?run_id={run.info.run_id}&metric_key="
                           + urllib.parse.quote(key, safe=""))["metrics"]
        stored = client.get_metric_history(run.info.run_id, key)
        assert sorted((m["step"], m["value"]) for m in history) == sorted((m.step, m.value) for m in stored)
        report = urllib.request.urlopen(f"{base}/get-artifact?path=report/report.html&run_uuid={run.info.run_id}",
                                        timeout=60).read()
        assert report == newest(project / "data/08_reporting/report.html").read_bytes()
    finally:
        stop_group(server)
        left = processes_in_group(server.pid)
        assert not left, f"mlflow ui left processes {left} behind"


# --------------------------------------------------------------------------- never fail a run


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def warnings_logged():
    """Every WARNING of the tracking hook, the plugin, MLflow and its database layer, and Python warnings."""
    handler = Records()
    names = ["best_minibatch.kedro_glue.tracking", "kedro_mlflow", "mlflow", "alembic", "sqlalchemy", "py.warnings"]
    for name in names:
        logging.getLogger(name).addHandler(handler)
    yield handler.records
    for name in names:
        logging.getLogger(name).removeHandler(handler)


def folder_is_a_file(store: Path) -> None:
    store.parent.write_text("a file where the store's folder should be\n")


def damaged_database(store: Path) -> None:
    store.parent.mkdir(parents=True)
    store.write_bytes(b"not an SQLite database " * 100)


@pytest.mark.parametrize("break_store", [folder_is_a_file, damaged_database])
def test_an_unwritable_store_is_one_warning_and_the_run_completes(tmp_path, monkeypatch, warnings_logged,
                                                                   break_store):
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    project = copy_project(tmp_path / "project", tracking=True)
    break_store(project / "data" / "09_tracking" / "mlflow.db")
    run_session(project, pipeline="ingest_cifar")
    assert any((project / "data/02_intermediate/image_index.parquet").iterdir())  # the run completed
    assert mlflow.active_run() is None
    messages = [record.getMessage() for record in warnings_logged]
    assert len(messages) == 1, messages
    assert messages[0].startswith("MLflow tracking is off for the rest of this run")
    assert "09_tracking/mlflow.db" in messages[0] and "The run itself goes on" in messages[0]


def test_a_failure_during_the_run_is_one_warning_and_tracking_stops(warnings_logged):
    hook = tracking.RunTracking()
    hook._active, hook._run_id = True, "run"

    def unwritable(*_):
        raise PermissionError("attempt to write a readonly database")

    hook._guard("log 'report_html'", unwritable)
    hook._guard("log 'figures_training_curves_png'", unwritable)  # not reached: tracking stopped
    hook.after_dataset_saved("report_html", "<html/>")
    messages = [record.getMessage() for record in warnings_logged]
    assert [m.split(":")[0] for m in messages] == ["MLflow tracking is off for the rest of this run"]
    assert "could not log 'report_html'" in warnings_logged[0].getMessage()
    assert not hook._tracking()


def test_tracking_switched_off_writes_no_store(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    project = copy_project(tmp_path / "project")  # conf/local/mlflow.yml: enabled: false
    run_session(project, pipeline="ingest_cifar")
    assert any((project / "data/02_intermediate/image_index.parquet").iterdir())
    assert not (project / "data" / "09_tracking").exists()
    assert not (project / "mlruns").exists()


def test_a_misspelled_tracking_key_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    project = copy_project(tmp_path / "project", tracking=True)
    (project / "conf" / "local" / "mlflow.yml").write_text("server:\n  mlflow_traking_uri: sqlite:///x.db\n")
    bootstrap_project(project)
    with pytest.raises(tracking.TrackingConfigError, match=r"mlflow.yml: server.mlflow_traking_uri: Extra inputs"):
        with KedroSession.create(project_path=project) as session:
            session.load_context()
    assert not (project / "data" / "09_tracking").exists()


def test_the_plugin_hook_is_driven_once_and_starts_after_every_check_and_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    project = copy_project(tmp_path / "project", tracking=True)
    bootstrap_project(project)
    with KedroSession.create(project_path=project) as session:
        plugins = session._hook_manager.get_plugins()
        implementations = session._hook_manager.hook.before_pipeline_run.get_hookimpls()
    assert any(isinstance(p, tracking.RunTracking) for p in plugins)
    assert not any(type(p).__module__.startswith("kedro_mlflow") for p in plugins)  # DISABLE_HOOKS_FOR_PLUGINS
    called = [type(implementation.plugin).__name__ for implementation in reversed(implementations)]
    assert called[-1] == "RunTracking", called  # a run refused by a check or by the lock writes no MLflow run
    assert called.index("RunChecks") < called.index("_LockHook") < called.index("RunTracking")


# --------------------------------------------------------------------------- small pieces


def test_run_names_say_pipelines_namespaces_and_environment():
    assert tracking.run_name(["__default__"], None, "local") == "__default__ @ local"
    assert tracking.run_name(["gradient_training"], ["edges", "random"], "paper") == \
        "gradient_training[edges,random] @ paper"


def test_a_relative_sqlite_store_lives_in_the_project_folder(tmp_path):
    assert tracking.project_sqlite_uri("sqlite:///data/09_tracking/mlflow.db", tmp_path) == \
        f"sqlite:///{tmp_path}/data/09_tracking/mlflow.db"
    assert tracking.project_sqlite_uri("sqlite:////abs/mlflow.db", tmp_path) == "sqlite:////abs/mlflow.db"
    assert tracking.project_sqlite_uri("http://mlflow.example.org:5000", tmp_path) == "http://mlflow.example.org:5000"


def test_the_project_artifact_folder_is_used_only_with_a_local_store():
    folder = "data/09_tracking/artifacts"
    assert tracking.artifact_location("sqlite:///data/09_tracking/mlflow.db", folder) == folder
    assert tracking.artifact_location("http://mlflow.example.org:5000", folder) is None  # the server's own store
    assert tracking.artifact_location("http://mlflow.example.org:5000", "s3://bucket/runs") == "s3://bucket/runs"


# --------------------------------------------------------------------------- the declarations


def project_catalog_conf() -> dict:
    loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), base_env="base", default_run_env="local")
    return dict(loader["catalog"])


def pipeline_outputs() -> set[str]:
    bootstrap_project(PROJECT_ROOT)
    return set().union(*(pipeline.all_outputs() for pipeline in pipelines.values()))


def test_every_kind_is_declared_by_a_catalog_entry_that_a_pipeline_writes():
    conf, outputs = project_catalog_conf(), pipeline_outputs()
    assert declarations.declaration_problems(conf, outputs) == []
    declared = declarations.tracked_entries(conf)
    assert {d["log"] for d in declared.values()} == set(declarations.TRACKED)
    assert declared["{ordering}.training_history"] == {"log": "training_history", "label": "{ordering}"}
    assert declared["report_html"] == {"log": "file", "artifact_path": "report"}
    # An entry renamed away from the dataset the pipeline writes: the declaration names nothing saved.
    renamed = {("claim_results" if name == "claim_verdicts" else name): entry for name, entry in conf.items()}
    assert declarations.declaration_problems(renamed, outputs) == [
        "'claim_results' declares tracking but no pipeline writes a dataset of that name"]
    # The pipeline's output renamed instead: the pattern entry no longer matches anything written.
    outputs_renamed = {name.replace(".training_history", ".history") for name in outputs}
    assert declarations.declaration_problems(conf, outputs_renamed) == [
        "'{ordering}.training_history' declares tracking but no pipeline writes a dataset of that name"]
    # An entry removed, or its declaration dropped: the kind it declared is left behind.
    without = {name: entry for name, entry in conf.items() if name != "distance_noise_units"}
    problems = declarations.declaration_problems(without, outputs)
    assert len(problems) == 1 and problems[0].startswith("no catalog entry declares tracking 'noise_units'")


def test_a_tracking_declaration_with_an_unknown_kind_or_a_missing_key_is_named():
    def catalog(declaration) -> dict:
        conf = project_catalog_conf()
        conf["report_html"] = {**conf["report_html"], "metadata": {"tracking": declaration}}
        return conf

    assert declarations.declaration_problems(catalog({"log": "files", "artifact_path": "report"}))[0].startswith(
        "'report_html' declares tracking 'files', which is not a kind of TRACKED")
    assert declarations.declaration_problems(catalog({"log": "file"})) == [
        "'report_html' is tracked as 'file', which needs ['artifact_path']"]
    assert declarations.declaration_problems(catalog({"log": "file", "artifact_path": "report", "path": "x"})) == [
        "'report_html' declares unknown tracking keys ['path'] (known: log, label, artifact_path)"]


def test_a_bad_tracking_declaration_in_the_catalog_is_an_error_before_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    project = copy_project(tmp_path / "project", tracking=True)
    catalog = project / "conf" / "base" / "catalog_visualize.yml"
    text = catalog.read_text()
    assert "tracking: {log: file, artifact_path: report}" in text
    catalog.write_text(text.replace("tracking: {log: file, artifact_path: report}", "tracking: {log: fil}"))
    bootstrap_project(project)
    with pytest.raises(tracking.TrackingConfigError, match=r"'report_html' declares tracking 'fil', which is not"):
        with KedroSession.create(project_path=project) as session:
            session.load_context()
    assert not (project / "data" / "09_tracking").exists()
