"""Reliability round 3 (issue 23): each case reproduced first, then refused or handled.

Every test here failed on the code before its fix, except the real-SIGKILL guard of case 4, whose docstring says
so; docs/reliability.md lists them.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from best_minibatch.data.cifar import DatasetInputError, count_training_images, read_image_dataset

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --------------------------------------------------------------------------- case 1: no code from a data file


class _Payload:
    """Pickles as a call to ``pathlib.Path.touch`` on a marker file: proof that unpickling ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _write_release(root: Path, planted: dict[str, object] | None = None) -> Path:
    """A tiny CIFAR-10 python release as ``cifar-10-python.tar.gz``; ``planted`` adds entries to named batches."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, size=4).tolist(),
            b"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(4)],
        }
        if planted and name in planted:
            batch[b"extra"] = planted[name]
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": 4, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return archive


@pytest.mark.parametrize("as_archive", [True, False], ids=["tar.gz", "extracted-folder"])
@pytest.mark.parametrize("reader", [read_image_dataset, count_training_images], ids=["read", "count-in-the-checks"])
def test_a_pickle_payload_in_a_cifar_batch_is_refused_naming_the_file_and_never_runs(tmp_path, reader, as_archive):
    marker = tmp_path / "payload-ran"
    archive = _write_release(tmp_path / "release", planted={"data_batch_2": _Payload(marker)})
    path = archive if as_archive else archive.parent / "cifar-10-batches-py"
    with pytest.raises(DatasetInputError) as caught:
        reader(path)
    message = str(caught.value)
    assert "data_batch_2" in message and str(path) in message
    assert "names the global" in message and "Refused" in message
    assert not marker.exists(), "the planted payload ran"


def test_the_restricted_reader_still_reads_an_honest_release(tmp_path):
    archive = _write_release(tmp_path)
    dataset = read_image_dataset(archive)
    assert len(dataset.index) == 24 and dataset.class_names == CLASSES
    assert count_training_images(archive) == 20


# --------------------------------------------------------------------------- cases 2, 3, 8: checks before any work


def _parameters(env: str = "local", **overrides) -> dict:
    """The project's parameters as Kedro merges them for ``env`` (``paper`` skips conf/local), with overrides."""
    from kedro.config import OmegaConfigLoader

    from best_minibatch.config import deep_merge
    from best_minibatch.settings import CONFIG_LOADER_ARGS

    loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), env=env, **CONFIG_LOADER_ARGS)
    return deep_merge(loader["parameters"], overrides)


PROJECT_ROOT = Path(__file__).resolve().parents[1]
TRAINING_SECTIONS = {"ingest_cifar", "sort_batches", "training", "gradient_training"}


def test_a_paper_run_whose_dataset_is_still_to_be_downloaded_is_checked_on_cifar10s_known_size(tmp_path, monkeypatch):
    """Before: `download: true` with an absent path counted no images, so the memory and time checks were skipped."""
    from best_minibatch.data.cifar import CIFAR10_TRAIN_IMAGES
    from best_minibatch.gradient_training import checks as gradient_training
    from best_minibatch.kedro_glue import run_checks

    absent = tmp_path / "not-downloaded-yet" / "cifar-10-batches-py"
    source = {"path": str(absent), "download": True}
    assert run_checks.count_training_images(source) == CIFAR10_TRAIN_IMAGES == 50_000
    assert not absent.parent.exists(), "counting must not download"

    # A CPU machine with less memory than the paper's in-memory buffer: refused on the memory check.
    monkeypatch.setattr(gradient_training, "available_memory", lambda device: 8 * 2**30)
    parameters = _parameters("paper", ingest_cifar={"source": source})
    facts = run_checks.RunFacts(n_train=run_checks.count_training_images(source), trained_orderings=("intensity",))
    problems = run_checks.run_problems(parameters, TRAINING_SECTIONS, facts)
    assert any("gradient_buffer.memory_cap_gb" in p and "195 batches" in p for p in problems), problems


def test_null_batches_has_an_upper_bound_and_is_in_the_time_estimate(monkeypatch):
    """Before: null_batches=10000 was accepted as 'about 0.00 hours'; R random batches per epoch were not counted."""
    from best_minibatch.gradient_training import TrainingConfig, estimate_hours
    from best_minibatch.gradient_training import checks as gradient_training
    from best_minibatch.kedro_glue import run_checks

    parameters = _parameters(gradient_training={"null_batches": 10_000})
    facts = run_checks.RunFacts(n_train=5_000, trained_orderings=("intensity",))
    problems = run_checks.run_problems(parameters, TRAINING_SECTIONS, facts)
    assert any(p.startswith("Parameter gradient_training.null_batches: 10000 random batches per epoch")
               and "at most 50" in p for p in problems), problems

    # Each null draw is one more gradient at the epoch-start parameters: counted like a probed step.
    monkeypatch.setattr(gradient_training, "_time_probed_step", lambda *args: (1.0, 2))
    without = TrainingConfig.from_params({"null_batches": 0}, parameters["training"])
    with_null = TrainingConfig.from_params({"null_batches": 25}, parameters["training"])
    hours_without = estimate_hours(without, 50, 100, 1)[0]
    hours_with = estimate_hours(with_null, 50, 100, 1)[0]
    assert hours_with == pytest.approx(hours_without * (50 + 25) / 50)


def test_every_problem_of_one_section_is_reported_together():
    """Before: seeds [0, 0], null_batches -1 and an unknown ordering: only the seeds were reported."""
    from best_minibatch.kedro_glue import run_checks

    parameters = _parameters(gradient_training={"seeds": [0, 0], "null_batches": -1, "trace_check": ["rnd"],
                                                "spill_dtyp": "float16"})
    facts = run_checks.RunFacts(n_train=5_000, trained_orderings=("intensity",))
    problems = run_checks.run_problems(parameters, TRAINING_SECTIONS, facts)
    for expected in ("gradient_training.seeds", "gradient_training.null_batches", "gradient_training.trace_check",
                     "gradient_training.spill_dtyp"):
        assert sum(expected in p for p in problems) == 1, (expected, problems)


# --------------------------------------------------------------------------- case 5: started in a subfolder


def test_a_run_started_in_a_subfolder_resolves_every_path_against_the_project_root(tmp_path, monkeypatch):
    """Before: from conf/, parameters' relative paths (checkpoints, the raw source) resolved against conf/ while the
    catalog's resolved against the root; here the raw source 'was not found'."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from tests.conftest import copy_project

    project = copy_project(tmp_path / "project")
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(project / "conf")
    bootstrap_project(project)
    with KedroSession.create(project_path=project) as session:
        session.run(pipeline_names=["ingest_cifar"])
    assert Path.cwd() == project / "conf", "the working directory is given back after the run"
    assert not (project / "conf" / "data").exists(), "nothing is written under the folder the run was started in"
    assert any((project / "data" / "02_intermediate").iterdir())
    # A refused run gives the working directory back too.
    from best_minibatch.kedro_glue.run_checks import RunCheckError

    with pytest.raises(RunCheckError, match="sort_batches.batch_size"):
        with KedroSession.create(project_path=project, runtime_params={"sort_batches": {"batch_size": 0}}) as session:
            session.run(pipeline_names=["sort_batches"])
    assert Path.cwd() == project / "conf"


# --------------------------------------------------------------------------- case 6: a manifest that is not an object


@pytest.mark.parametrize("body", ['[]', '"completed"', '3', 'null', '{"run_id": "x", "status": "completed", "datasets": []}',
                                  '{"run_id": "x", "status": "completed", "datasets": {"a": 5}}'],
                         ids=["list", "string", "number", "null", "datasets-a-list", "entry-a-number"])
def test_a_manifest_of_valid_json_that_is_not_a_manifest_is_named(tmp_path, body):
    """Before: valid JSON that is not an object blocked every run with a raw TypeError naming no file."""
    from best_minibatch.services.run_manifest import ManifestStore, RunInputsError

    store = ManifestStore(tmp_path / "runs")
    path = store.path("2024-01-01T00.00.00.000Z")
    path.parent.mkdir(parents=True)
    path.write_text(body)
    with pytest.raises(RunInputsError) as caught:
        store.all()
    assert str(path) in str(caught.value) and "Move it aside" in str(caught.value)


def test_a_lock_file_of_valid_json_that_is_not_an_object_still_gives_the_lock_message(tmp_path):
    from best_minibatch.services.run_manifest import _locked_message

    message = _locked_message(tmp_path / "runs" / "run.lock", "[\"pid\"]")
    assert message.startswith(f"Another kedro run is using the data folder '{tmp_path}'")


# --------------------------------------------------------------------------- case 7: a read-only data folder


@pytest.fixture
def read_only_data(tmp_path):
    """A fresh project whose data/ is a read-only tmpfs holding the raw sample (needs mount rights)."""
    import shutil
    import subprocess

    from tests.conftest import copy_project

    project = copy_project(tmp_path / "project")
    data = project / "data"
    staged = tmp_path / "staged"
    shutil.move(data, staged)
    data.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(data)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        shutil.copytree(staged, data, dirs_exist_ok=True)
        subprocess.run(["mount", "-o", "remount,ro", str(data)], check=True)
        yield project
    finally:
        subprocess.run(["umount", str(data)], check=True)


def test_a_read_only_data_folder_is_refused_before_any_work_naming_it(read_only_data, monkeypatch):
    """Before: a raw OSError traceback."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from best_minibatch.kedro_glue.run_checks import RunCheckError

    project = read_only_data
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(project)
    bootstrap_project(project)
    with pytest.raises(RunCheckError) as caught:
        with KedroSession.create(project_path=project) as session:
            session.run(pipeline_names=["ingest_cifar"])
    message = str(caught.value)
    assert f"'{project / 'data'}'" in message and "read-only" in message.lower(), message


# --------------------------------------------------------------------------- case 4: a worker lost while tasks run


def _kill_own_worker_once(item):
    """A handed-out task: the first one to run on another worker than the node's (or on the node's own worker)
    SIGKILLs that worker."""
    import os
    import signal
    import time

    from distributed import get_worker

    index, data, node_worker, marker, on_the_nodes_worker = item
    if (get_worker().address == node_worker) == on_the_nodes_worker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)  # long enough for the work to spread over both workers
    return index, float(data.sum())


def _node_that_hands_out(marker: str, on_the_nodes_worker: bool) -> list:
    """Stands for batch_selection's node: runs on one worker and hands its (policy, seed) items out."""
    from distributed import get_worker

    from best_minibatch.services import parallel

    here = get_worker().address
    items = [(index, np.full(250_000, index, dtype=np.float32), here, marker, on_the_nodes_worker)
             for index in range(8)]
    with parallel.handing_out():
        return parallel.map_tasks(_kill_own_worker_once, items, label="selection-run")


@pytest.mark.slow  # a Dask cluster whose worker is killed
@pytest.mark.parametrize("on_the_nodes_worker", [False, True], ids=["another-worker", "the-nodes-own-worker"])
def test_a_worker_killed_while_handed_out_tasks_run_loses_no_result(tmp_path, on_the_nodes_worker):
    """A real SIGKILL of a worker: Dask reruns the killed task (or, when the node's own worker died, the node, which
    hands every item out again). This passed before the round's fixes too; it guards the real kill, the tests below
    the two ways it failed."""
    from best_minibatch.services.cluster import Cluster, ClusterConfig

    marker = tmp_path / "killed-once"
    with Cluster(ClusterConfig.from_params({"local": {"n_workers": 2}})) as cluster:
        results = cluster.client.submit(_node_that_hands_out, str(marker), on_the_nodes_worker,
                                        pure=False).result(timeout=240)
    assert marker.exists(), "no worker was killed: the test did not test anything"
    assert results == [(index, index * 250_000.0) for index in range(8)]


def _slow_sum(item):
    import time

    index, data = item
    time.sleep(1.0)
    return index, float(data.sum())


def _node_with_slow_items() -> list:
    from best_minibatch.services import parallel

    items = [(index, np.full(1_000, index, dtype=np.float32)) for index in range(4)]
    with parallel.handing_out():
        return parallel.map_tasks(_slow_sum, items, label="selection-lost")


@pytest.mark.slow  # a Dask cluster
def test_a_handed_out_task_the_scheduler_drops_is_resubmitted_not_the_whole_node_failed():
    """A task whose input data died with its worker is cancelled by the scheduler ('lost dependencies'): simulated
    by cancelling one task from outside. Before: the node, and with it the whole experiment, failed."""
    import time

    from distributed import Future

    from best_minibatch.services.cluster import Cluster, ClusterConfig

    with Cluster(ClusterConfig.from_params({"local": {"n_workers": 2}})) as cluster:
        client = cluster.client
        node = client.submit(_node_with_slow_items, pure=False)
        deadline, cancelled = time.monotonic() + 60, None
        while cancelled is None and time.monotonic() < deadline:
            running = [key for keys in client.processing().values() for key in keys
                       if str(key).startswith("selection-lost-")]
            if running:
                cancelled = running[0]
                Future(cancelled, client).cancel(force=True)
            time.sleep(0.05)
        assert cancelled is not None, "no handed-out task was seen running"
        assert node.result(timeout=120) == [(index, index * 1_000.0) for index in range(4)]


def _many_numbers(_):
    return list(range(20_000))


def _fails_on_them(numbers):
    raise ValueError(f"the node failed on {len(numbers)} numbers")


@pytest.mark.slow  # a Dask cluster
def test_a_failing_node_with_large_inputs_shows_its_own_error_not_a_long_error_message():
    """Before: the worker's GroupFailed carried the node's hook calls (its inputs) in its message; Dask cut any message
    over 10,000 characters to Exception('Long error message', GroupFailed, ...), so the runner could not recognise it
    and printed the inputs instead of the root cause."""
    from kedro.io import DataCatalog, MemoryDataset
    from kedro.pipeline import Pipeline, node

    from best_minibatch.kedro_glue.runner import DaskRunner

    pipeline = Pipeline([node(_many_numbers, "a", "numbers", name="makes"),
                         node(_fails_on_them, "numbers", "c", name="fails")])
    with pytest.raises(ValueError) as caught:
        DaskRunner(config={"local": {"n_workers": 1}}).run(pipeline, DataCatalog({"a": MemoryDataset(1)}))
    assert str(caught.value) == "the node failed on 20000 numbers"


# --------------------------------------------------------------------------- case 11: a corrupt Parquet input


def test_a_corrupt_parquet_input_is_refused_before_any_work_naming_the_file(tmp_path, monkeypatch):
    """Before: the run failed naming the file, but only after it had written other outputs, in ~380 lines."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from best_minibatch.kedro_glue.run_checks import RunCheckError
    from tests.conftest import copy_project

    project = copy_project(tmp_path / "project")
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(project)
    bootstrap_project(project)
    with KedroSession.create(project_path=project) as session:
        session.run(pipeline_names=["ingest_cifar"])
    (index,) = (project / "data" / "02_intermediate" / "image_index.parquet").glob("*/image_index.parquet")
    index.write_bytes(index.read_bytes()[: len(index.read_bytes()) // 2])  # cut in half: the footer is gone
    before = {str(p) for p in (project / "data").rglob("*")}
    with pytest.raises(RunCheckError) as caught:
        with KedroSession.create(project_path=project) as session:
            session.run(pipeline_names=["score_metrics"])
    message = str(caught.value)
    assert f"'{index}'" in message and "image_index" in message and "ingest_cifar" in message, message
    assert {str(p) for p in (project / "data").rglob("*")} == before


# --------------------------------------------------------------------------- case 9: dask.yml of another environment


def test_dask_yml_mistakes_name_the_file_that_holds_them_and_all_of_them(tmp_path, monkeypatch):
    """Before: a bad value in conf/local/dask.yml was said to be in conf/base/dask.yml, and a second bad key
    (n_workerz) was not mentioned."""
    import shutil

    from kedro.config import OmegaConfigLoader

    from best_minibatch.kedro_glue import runner
    from best_minibatch.settings import CONFIG_LOADER_ARGS

    conf = tmp_path / "conf"
    shutil.copytree(PROJECT_ROOT / "conf", conf, ignore=shutil.ignore_patterns("local"))
    (conf / "local").mkdir()
    (conf / "local" / "dask.yml").write_text("local:\n  n_workers: -1\n  n_workerz: 2\n")
    monkeypatch.setattr(runner, "_CONFIG_LOADER", OmegaConfigLoader(str(conf), env="local", **CONFIG_LOADER_ARGS))
    with pytest.raises(ValueError) as caught:
        runner.configured_cluster()
    message = str(caught.value)
    assert "Parameter dask.local.n_workers: must be a positive integer or null, got -1" in message, message
    assert "Parameter dask.local.n_workerz: unknown parameter" in message, message
    assert message.count("(conf/local/dask.yml)") == 2 and "conf/base" not in message, message


# --------------------------------------------------------------------------- case 10: kedro mlflow ui, no venv activated


def test_the_projects_commands_find_the_environments_own_programs_without_an_activated_venv():
    """Before: `.venv/bin/kedro mlflow ui` without activating the venv failed with FileNotFoundError: 'mlflow'
    (kedro-mlflow starts `mlflow` from PATH). Kedro imports the project's cli module for every command."""
    import os
    import subprocess
    import sys

    bare = {**os.environ, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT / "src")}
    code = ("import shutil, best_minibatch.cli; print(shutil.which('mlflow'))")
    found = subprocess.run([sys.executable, "-c", code], env=bare, capture_output=True, text=True, check=True)
    assert found.stdout.strip().splitlines()[-1] == str(Path(sys.executable).parent / "mlflow")


# --------------------------------------------------------------------------- MLflow opens on runs and metrics


def test_the_experiment_is_marked_as_model_training_so_the_ui_opens_on_runs(tmp_path, monkeypatch):
    """Before: MLflow 3's UI opened the project's experiment in its GenAI view (traces, sessions). The UI reads the
    experiment tag mlflow.experimentKind; custom_model_development is its model-training kind (runs, metrics)."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project
    from mlflow import MlflowClient

    from tests.conftest import copy_project

    project = copy_project(tmp_path / "project", tracking=True)
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(project)
    bootstrap_project(project)
    with KedroSession.create(project_path=project) as session:
        session.run(pipeline_names=["ingest_cifar"])
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'data/09_tracking/mlflow.db'}")
    experiment = client.get_experiment_by_name("best_minibatch")
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"


# --------------------------------------------------------------------------- case 12: a namespace named twice


@pytest.mark.slow  # a Kedro run of one namespace
def test_a_namespace_named_twice_is_run_once():
    """Before: `--namespaces=edges,edges` was refused with Kedro's message about node names."""
    import os
    import subprocess
    import sys
    import tempfile

    from tests.conftest import copy_project

    with tempfile.TemporaryDirectory() as folder:
        project = copy_project(Path(folder) / "project")
        env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "200",
               "PYTHONPATH": str(PROJECT_ROOT / "src")}
        done = subprocess.run([str(Path(sys.executable).parent / "kedro"), "run", "--pipeline=sort_batches",
                               "--namespaces=edges,edges"], cwd=project, env=env, capture_output=True, text=True,
                              timeout=300)
    # A fresh project has no scores: the run reaches the project's own check of its inputs, for 'edges' only.
    assert done.returncode == 1
    assert "Input 'edges.image_scores'" in done.stderr and "node name" not in done.stderr.lower(), done.stderr


# --------------------------------------------------------------------------- a first run a person can read

# As under `kedro run`: the root logger has a handler in this process and in every worker process (a spawned worker
# re-runs the main module's top level, as it re-imports Kedro's, which reads conf/logging.yml).
_CLUSTER_SCRIPT = """
import logging
logging.basicConfig(level=logging.INFO)

from best_minibatch.services.cluster import Cluster, ClusterConfig

def train():
    import torch
    model = torch.nn.Linear(100, 10)
    torch.nn.functional.cross_entropy(model(torch.randn(64, 100)), torch.randint(0, 10, (64,))).backward()
    return 1

if __name__ == "__main__":
    import os

    with Cluster(ClusterConfig.from_params({"local": {"n_workers": 2}})) as cluster:
        print(sum(cluster.client.gather([cluster.client.submit(train, pure=False) for _ in range(4)])))
        # Only the workers are marked as such (their records are forwarded here, and written here).
        assert "BEST_MINIBATCH_DASK_WORKER" not in os.environ
        assert cluster.client.run(lambda: os.environ.get("BEST_MINIBATCH_DASK_WORKER")) and all(
            flag == "1" for flag in cluster.client.run(lambda: os.environ.get("BEST_MINIBATCH_DASK_WORKER")).values())
    print("closed")
"""


@pytest.mark.slow  # a Dask cluster
@pytest.mark.parametrize("asked", [False, True], ids=["quiet-by-default", "asked-for"])
def test_the_cluster_keeps_dasks_own_logs_at_warning_unless_asked_and_closes_without_killing(asked, tmp_path):
    """Before: every Dask run printed the nanny, scheduler and worker banners (85 lines of the default run) and, at a
    clean shutdown, 'Worker process still alive after 4.0 seconds, killing'."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")}
    env.pop("DASK_LOGGING__DISTRIBUTED", None)
    if asked:
        env["DASK_LOGGING__DISTRIBUTED"] = "info"
    script = tmp_path / "cluster_run.py"
    script.write_text(_CLUSTER_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and done.stdout.split() == ["4", "closed"], output
    banners = [line for line in output.splitlines() if any(
        banner in line for banner in ("Start Nanny", "Listening to", "Local Directory", "Start worker",
                                      "Registered to"))]
    assert bool(banners) == asked, output
    if not asked:  # the dashboard's link once, in the project's own line about the cluster
        dashboard = [line for line in output.splitlines() if "/status" in line]
        assert len(dashboard) == 1 and "Dask cluster: local" in dashboard[0], output
    assert "still alive after" not in output, output


@contextlib.contextmanager
def only_terminal(terminal: logging.Handler) -> Iterator[logging.Logger]:
    """The root logger with ``terminal`` as its only handler at INFO; afterwards every handler added meanwhile
    (the run's log file) is closed and the root logger is given back as it was."""
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    root.handlers[:] = [terminal]
    root.setLevel(logging.INFO)
    try:
        yield root
    finally:
        for handler in root.handlers:
            if handler is not terminal:
                handler.close()
        root.handlers[:], root.level = saved


def test_per_dataset_load_and_save_lines_stay_out_of_the_terminal_and_go_to_the_log_file(tmp_path):
    """Before: Kedro's 'Loading data from ...' / 'Saving data to ...' records (266 of the default run) filled the
    terminal and were kept nowhere else."""
    import io
    import logging

    from best_minibatch.services import logs

    terminal_stream = io.StringIO()
    terminal = logging.StreamHandler(terminal_stream)
    with only_terminal(terminal) as root:
        path = logs.install(tmp_path)
        assert logs.install(tmp_path) == path and len(root.handlers) == 2  # once per process
        logging.getLogger("kedro.io.data_catalog").info("Loading data from image_index (ParquetDataset)...")
        logging.getLogger("kedro.io.data_catalog").warning("a dataset warning")
        logging.getLogger("best_minibatch.kedro_glue.hooks").info("Run checks passed")
        for handler in root.handlers:
            handler.flush()
        shown, kept = terminal_stream.getvalue(), path.read_text()
    assert path == tmp_path.resolve() / "logs" / "info.log"
    assert "Loading data from" not in shown and "a dataset warning" in shown and "Run checks passed" in shown
    assert "Loading data from image_index" in kept and "Run checks passed" in kept


def _log_a_load(_):
    import logging

    logging.getLogger("kedro.io.data_catalog").info("Loading data from a_dataset_on_a_worker (MemoryDataset)...")
    return 1


@pytest.mark.slow  # a Dask cluster
def test_a_workers_load_and_save_lines_reach_the_log_file_once(tmp_path):
    """The file is written by the process that runs kedro: a worker forwards its records and writes none itself."""
    import logging

    from best_minibatch.services import logs
    from best_minibatch.services.cluster import Cluster, ClusterConfig

    root = logging.getLogger()
    saved = list(root.handlers), root.level
    root.setLevel(logging.INFO)
    try:
        path = logs.install(tmp_path)
        with Cluster(ClusterConfig.from_params({"local": {"n_workers": 1}})) as cluster:
            cluster.forward_logs(("kedro",))
            assert cluster.client.submit(_log_a_load, 0, pure=False).result(timeout=120) == 1
            import time

            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and "a_dataset_on_a_worker" not in (
                    path.read_text() if path.exists() else ""):
                time.sleep(0.2)
        kept = path.read_text()
    finally:
        for handler in root.handlers:
            if isinstance(handler, logs.RunLogFile):
                handler.close()
        root.handlers[:], root.level = saved
    assert kept.count("a_dataset_on_a_worker") == 1, kept


def test_node_and_epoch_lines_stay_out_of_the_terminal_and_a_piped_terminal_is_wide(tmp_path):
    """Before: Kedro's per-node lines (whichever runner logs them) and every training's per-epoch lines went to the
    terminal, and rich wrapped each record over 4-8 lines at its 80-column default when the output was a pipe
    (2,020 lines for the default run, 423 once the load/save and node lines had gone)."""
    import io
    import logging

    from rich.console import Console
    from rich.logging import RichHandler

    from best_minibatch.services import logs

    piped = io.StringIO()
    terminal = RichHandler(console=Console(file=piped))
    with only_terminal(terminal) as root:
        path = logs.install(tmp_path)
        assert terminal.console.width == logs.PIPED_WIDTH  # a pipe, not a terminal: wide
        logging.getLogger("best_minibatch.kedro_glue.runner").info("Completed node: %s", "intensity.train_with_gradient_probe")
        logging.getLogger("kedro.runner.sequential_runner").info("Completed %d out of %d tasks", 3, 51)
        logging.getLogger("best_minibatch.gradient_training.run.epochs").info("intensity epoch 1/6 ...")
        logging.getLogger("best_minibatch.gradient_training.run").info("intensity: 6 epochs done")
        for handler in root.handlers:
            handler.flush()
        shown, kept = piped.getvalue(), path.read_text()
    assert "Completed node" not in shown and "out of 51" not in shown and "epoch 1/6" not in shown
    assert "6 epochs done" in shown
    assert all(text in kept for text in ("Completed node", "Completed 3 out of 51 tasks", "epoch 1/6", "epochs done"))
