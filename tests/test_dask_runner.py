"""The Dask runner (`kedro run --runner=best_minibatch.kedro_glue.runner.DaskRunner`, docs/scaling.md).

Whole runs on a two-worker LocalCluster against the sequential runner's outputs (the
quick default run of ``finished_project``), a worker killed mid-training, the refusal
of in-memory datasets that would cross workers, the GPU tag's resources, and the
cluster configuration.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline, node
from kedro_datasets.pickle import PickleDataset
from mlflow import MlflowClient

from best_minibatch.kedro_glue.runner import DaskRunner, InMemoryDatasetError, plan_groups
from best_minibatch.services import cluster as cl
from best_minibatch.services import parallel
from tests.conftest import PROJECT_ROOT, QUICK_RUN_PARAMS, copy_project

TWO_WORKERS = {"cluster": "local", "local": {"n_workers": 2}}
COMPARE_SCRIPT = PROJECT_ROOT / "scripts" / "compare_runs.py"


def compare_runs():
    spec = importlib.util.spec_from_file_location("compare_runs", COMPARE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_with(project: Path, runner: DaskRunner | None, pipeline: str | None = None,
             params: dict | None = None) -> None:
    """One ``kedro run`` in ``project`` (the sequential runner when ``runner`` is None)."""
    previous = Path.cwd()
    os.chdir(project)
    try:
        bootstrap_project(project)
        with KedroSession.create(project_path=project, runtime_params=params or QUICK_RUN_PARAMS) as session:
            session.run(runner=runner, pipeline_names=[pipeline] if pipeline else None)
    finally:
        os.chdir(previous)


def assert_same_outputs(sequential: Path, dask: Path) -> None:
    """Every dataset bit for bit (wall-clock columns aside); run manifests and MLflow stores hold ids and times."""
    compared, problems = compare_runs().differences(sequential / "data", dask / "data", {"seconds"},
                                                    skip={"runs", "09_tracking"})
    assert compared > 1000 and not problems, "\n".join(problems[:20])


# --------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def dask_project(tmp_path_factory) -> Path:
    """The quick default run (as finished_project's) with the Dask runner on two local workers, tracked."""
    os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
    project = copy_project(tmp_path_factory.mktemp("dask") / "project", tracking=True)
    run_with(project, DaskRunner(config=TWO_WORKERS))
    return project


@pytest.mark.slow
def test_default_run_on_two_workers_is_bit_identical_to_the_sequential_runner(finished_project, dask_project):
    assert_same_outputs(finished_project, dask_project)


@pytest.mark.slow
def test_hooks_run_for_every_node_on_the_dask_runner(finished_project, dask_project):
    """Node and dataset hooks are replayed in the driver: the run manifest lists the same outputs, and MLflow
    holds the same metrics and parameters as after the sequential run."""
    import json

    def manifest(project: Path) -> dict:
        path = sorted((project / "data/runs/run_manifest.json").iterdir())[-1] / "run_manifest.json"
        return json.loads(path.read_text())

    sequential, dask = manifest(finished_project), manifest(dask_project)
    assert dask["status"] == "completed" and dask["outputs"] == sequential["outputs"] and len(dask["outputs"]) > 30

    def tracked(project: Path):
        client = MlflowClient(tracking_uri=f"sqlite:///{project / 'data' / '09_tracking' / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("best_minibatch").experiment_id
        (run,) = client.search_runs([experiment])
        return run.data

    sequential_data, dask_data = tracked(finished_project), tracked(dask_project)
    assert dask_data.metrics == sequential_data.metrics and len(dask_data.metrics) > 20
    assert dask_data.params == sequential_data.params


# Two seeds x two policies, two epochs, on the quick run's outputs.
SMALL_SELECTION = {**QUICK_RUN_PARAMS, "batch_selection": {
    "seeds": [0, 1], "policies": ["shuffle", "fixed_random"], "target_validation_accuracy": 0.2,
    "training": {"phases": [{"epochs": 1, "lr": 0.1}, {"epochs": 1, "lr": 0.01}]},
}}


@pytest.mark.slow
def test_batch_selection_runs_on_two_workers_give_the_sequential_tables(tmp_path, dask_project):
    """Each (policy, seed) run is a task of its own; the tables are the sequential runner's, bit for bit (the
    figure and the report fragments show wall-clock seconds, so only the tables are compared, without the
    wall-clock columns: seconds, and the accuracy at shuffle's wall-clock with its verdict)."""
    import shutil

    projects = {}
    for name, runner in (("sequential", None), ("dask", DaskRunner(config=TWO_WORKERS))):
        projects[name] = tmp_path / name
        shutil.copytree(dask_project, projects[name], ignore=shutil.ignore_patterns("09_tracking"))
        (projects[name] / "conf/local/mlflow.yml").write_text("enabled: false\n")
        run_with(projects[name], runner, "batch_selection", SMALL_SELECTION)
    compared, problems = compare_runs().differences(projects["sequential"] / "data", projects["dask"] / "data",
                                                    {"seconds", "budget", "wallclock"}, only="batch_selection",
                                                    skip={"runs"})
    tables = [p for p in problems if ".parquet" in p]
    assert compared >= 6 and not tables, "\n".join(tables)


def checkpointed_training(checkpoints: Path, epochs: int) -> tuple[str, int] | None:
    """(ordering, seed) of a training with a checkpoint of epoch 1 and not yet of its last epoch."""
    import json

    for folder in checkpoints.glob("*/*"):
        if (folder / "epoch=001.pt").exists() and not (folder / f"epoch={epochs:03d}.pt").exists():
            try:
                manifest = json.loads((folder / "run.json").read_text())
            except (OSError, ValueError):
                continue
            return manifest["ordering"], int(manifest["config"]["seed"])
    return None


class WorkerKiller(threading.Thread):
    """Once a training has checkpointed its first epoch, SIGKILL the worker process that trains it."""

    def __init__(self, runner: DaskRunner, checkpoints: Path, epochs: int) -> None:
        super().__init__(daemon=True)
        self.runner, self.checkpoints, self.epochs = runner, checkpoints, epochs
        self.killed: tuple[str, int] | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.killed is None:
            time.sleep(0.05)
            client, found = self.runner.client, checkpointed_training(self.checkpoints, self.epochs)
            if client is None or found is None:
                continue
            ordering, seed = found
            prefix = f"gradient_training-{ordering}-{seed}-"  # parallel.map_tasks' key: label-index-...; index = seed
            try:
                workers = [w for w, keys in client.processing().items() if any(str(k).startswith(prefix) for k in keys)]
                if not workers:
                    continue
                pid = client.run(os.getpid, workers=workers[:1])[workers[0]]
            except Exception:  # the cluster is closing or the worker went away meanwhile: try again
                continue
            os.kill(pid, signal.SIGKILL)
            self.killed = found


@pytest.mark.slow
def test_a_worker_killed_mid_training_resumes_from_its_checkpoint(tmp_path, finished_project, caplog):
    os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
    project = copy_project(tmp_path / "project")
    runner = DaskRunner(config=TWO_WORKERS)
    epochs = sum(phase["epochs"] for phase in QUICK_RUN_PARAMS["training"]["phases"])
    killer = WorkerKiller(runner, project / "data/06_models/checkpoints", epochs)
    caplog.set_level(logging.INFO, logger="best_minibatch")
    killer.start()
    try:
        run_with(project, runner)
    finally:
        killer.stop.set()
        killer.join(timeout=10)
    assert killer.killed is not None, "no training was caught between its first and its last checkpoint"
    ordering, seed = killer.killed
    label = f"{ordering} seed {seed}"
    resumed = [r.getMessage() for r in caplog.records
               if re.match(rf"{label}: run '.*' found in .*, resuming after epoch \d+$", r.getMessage())]
    assert resumed, f"'{label}' did not resume from its checkpoint"
    assert_same_outputs(finished_project, project)


def test_a_task_run_again_after_its_worker_was_lost_rewrites_only_this_runs_outputs(tmp_path):
    """Dask runs a finished task again when the worker holding its result dies before the driver collects it
    (CI saw a worker killed mid-training take a finished scoring task with it). The first attempt's versioned
    output, here half-written, is this run's own file: the new attempt replaces it; an earlier run's version
    of the same dataset stays as it was."""
    from kedro.io import Version

    from best_minibatch.kedro_glue.runner import run_group

    earlier, this_run = "2026-01-01T00.00.00.000Z", "2026-12-03T18.40.35.195Z"
    folder = tmp_path / "scores.pkl"
    for version, content in ((earlier, b"an earlier run's scores"), (this_run, b"half-writ")):
        (folder / version).mkdir(parents=True)
        (folder / version / "scores.pkl").write_bytes(content)
    catalog = DataCatalog({"a": MemoryDataset(1),
                           "scores": PickleDataset(filepath=str(folder), version=Version(None, this_run))})
    run_group([node(first, "a", "scores", name="score")], catalog, {}, [], False, None)
    assert PickleDataset(filepath=str(folder), version=Version(this_run, None)).load() == 2
    assert (folder / earlier / "scores.pkl").read_bytes() == b"an earlier run's scores"

    # A first attempt writes as always: nothing to remove.
    fresh = DataCatalog({"a": MemoryDataset(1), "scores": PickleDataset(filepath=str(tmp_path / "new.pkl"),
                                                                        version=Version(None, this_run))})
    run_group([node(first, "a", "scores", name="score")], fresh, {}, [], False, None)
    assert fresh.load("scores") == 2


# --------------------------------------------------------------------------- refusal of in-memory datasets


def first(x):
    return x + 1


def second(x):
    return x * 2


def join(x, y):
    return x + y


def test_in_memory_datasets_that_would_cross_workers_are_refused_before_any_work(tmp_path):
    """'x' goes from 'make' to 'finish' in memory, but 'between' must run in between (it reads what 'make'
    writes to a file, and 'finish' reads its file): no single task can hold both ends."""
    pipeline = Pipeline([
        node(lambda a: (a, a), "a", ["x", "y"], name="make"),
        node(second, "y", "z", name="between"),
        node(join, ["x", "z"], "out", name="finish"),
    ])
    files = {name: PickleDataset(filepath=str(tmp_path / f"{name}.pkl")) for name in ("y", "z", "out")}
    catalog = DataCatalog({"a": MemoryDataset(1), **files})
    runner = DaskRunner(config=TWO_WORKERS)
    with pytest.raises(InMemoryDatasetError) as refused:
        runner.run(pipeline, catalog)
    message = str(refused.value)
    assert "'x' from node 'make' to 'finish'" in message and "'between'" in message
    assert "catalog entry that writes a file" in message
    assert not any(tmp_path.iterdir()), "a node ran before the refusal"

    # With 'x' in a file, nothing is in memory between tasks, and the pipeline runs.
    catalog = DataCatalog({"a": MemoryDataset(1), **files, "x": PickleDataset(filepath=str(tmp_path / "x.pkl"))})
    assert [len(g.nodes) for g in plan_groups(pipeline, catalog)] == [1, 1, 1]


def test_nodes_joined_in_memory_form_one_task(tmp_path):
    pipeline = Pipeline([
        node(first, "a", "b", name="one"),  # b: no catalog entry, so in memory
        node(second, "b", "c", name="two"),
        node(first, "a", "d", name="alone"),
    ])
    catalog = DataCatalog({"a": MemoryDataset(1), "c": PickleDataset(filepath=str(tmp_path / "c.pkl")),
                           "d": PickleDataset(filepath=str(tmp_path / "d.pkl"))})
    for name in pipeline.datasets():
        catalog.get(name, fallback_to_runtime_pattern=True)
    groups = sorted([n.name for n in g.nodes] for g in plan_groups(pipeline, catalog))
    assert groups == [["alone"], ["one", "two"]]


class RecordingHooks:
    """A hook manager that records the name and node of every hook call (as pluggy's would dispatch them)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self.hook = self

    def __getattr__(self, name):
        def call(**kwargs):
            self.calls.append((name, kwargs["node"].name if "node" in kwargs else None))
            return []
        return call


def fails(x):
    raise ValueError(f"node failed on {x}")


def fails_with_a_project_error(x):
    from best_minibatch.config import ConfigError

    raise ConfigError("section.key", "cannot work", "Fix it.")


@pytest.mark.slow  # a Dask cluster
def test_a_failing_node_stops_the_run_with_its_error_after_its_hooks(tmp_path):
    pipeline = Pipeline([node(first, "a", "b", name="ok"), node(fails, "b", "c", name="fails"),
                         node(first, "c", "d", name="never")])
    hooks = RecordingHooks()
    with pytest.raises(ValueError, match="node failed on 2"):
        DaskRunner(config={"local": {"n_workers": 1}}).run(pipeline, DataCatalog({"a": MemoryDataset(1)}), hooks)
    assert ("on_node_error", "fails") in hooks.calls and ("after_node_run", "ok") in hooks.calls
    assert not any(node_name == "never" for _, node_name in hooks.calls)
    # A project error whose class cannot be rebuilt from its message still reads as the project's own error.
    from best_minibatch.kedro_glue.runner import RemoteNodeError

    with pytest.raises(RemoteNodeError, match="Parameter section.key: cannot work. Fix it."):
        DaskRunner(config={"local": {"n_workers": 1}}).run(
            Pipeline([node(fails_with_a_project_error, "a", "b", name="refuses")]), DataCatalog({"a": MemoryDataset(1)}))


# --------------------------------------------------------------------------- the gpu tag's resources


def worker_name(_):
    from distributed import get_worker

    return get_worker().name


@parallel.hands_out_work
def hand_out_names(x):
    return parallel.map_tasks(worker_name, list(range(4)), label="names")


def add(item, shared):
    from distributed import get_worker

    return item + shared["offset"], get_worker().name


@parallel.hands_out_work
def hand_out_with_shared(x):
    return parallel.map_tasks(add, list(range(6)), label="shared", shared={"offset": 100})


@pytest.fixture
def cpu_and_gpu_workers():
    """A scheduler with two single-thread worker processes: 'cpu' offers nothing, 'gpu' offers GPU: 1."""
    from distributed import Nanny, Scheduler, SpecCluster

    cluster = SpecCluster(
        scheduler={"cls": Scheduler, "options": {"dashboard_address": None}},
        workers={"cpu": {"cls": Nanny, "options": {"nthreads": 1}},
                 "gpu": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1}}}},
    )
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


@pytest.mark.slow  # a Dask cluster
def test_gpu_tagged_nodes_and_the_trainings_they_hand_out_run_only_where_a_gpu_is(cpu_and_gpu_workers):
    tagged = [node(worker_name, "a", f"gpu_{i}", name=f"gpu_{i}", tags=[parallel.GPU_TAG]) for i in range(6)]
    plain = [node(worker_name, "a", f"cpu_{i}", name=f"cpu_{i}") for i in range(6)]
    handing = node(hand_out_names, "a", "handed", name="hand_out", tags=[parallel.GPU_TAG])
    runner = DaskRunner(config={"cluster": "address", "address": cpu_and_gpu_workers})
    outputs = runner.run(Pipeline([*tagged, *plain, handing]), DataCatalog({"a": MemoryDataset(0)}))
    ran = {name: dataset.load() for name, dataset in outputs.items()}
    assert {ran[f"gpu_{i}"] for i in range(6)} == {"gpu"}
    assert ran["handed"] == ["gpu"] * 4
    assert {ran[f"cpu_{i}"] for i in range(6)} <= {"cpu", "gpu"}


@pytest.mark.slow  # a Dask cluster
def test_map_tasks_hands_every_task_the_shared_object(cpu_and_gpu_workers):
    """``shared`` travels to the workers once (broadcast) and reaches every task beside its item."""
    handing = node(hand_out_with_shared, "a", "handed", name="hand_out")
    runner = DaskRunner(config={"cluster": "address", "address": cpu_and_gpu_workers})
    outputs = runner.run(Pipeline([handing]), DataCatalog({"a": MemoryDataset(0)}))
    results = outputs["handed"].load()
    assert [value for value, _ in results] == [100, 101, 102, 103, 104, 105]
    assert {worker for _, worker in results} <= {"cpu", "gpu"}
    assert parallel.map_tasks(add_here, [1, 2], label="t", shared=10) == [11, 12]  # outside the runner: here


def add_here(item, shared):
    return item + shared


def test_the_gpu_tag_asks_for_nothing_where_no_worker_offers_a_gpu():
    config = cl.ClusterConfig.from_params(TWO_WORKERS)
    from best_minibatch.kedro_glue.runner import usable_mapping

    mapping, notes = usable_mapping(config.tag_resources, config.offered_resources())
    assert mapping == {} and "run on any worker" in notes[0]
    cuda = cl.ClusterConfig.from_params({"cluster": "cuda"})
    assert usable_mapping(cuda.tag_resources, cuda.offered_resources())[0] == {"gpu": {"GPU": 1.0}}


# --------------------------------------------------------------------------- worker logs


def log_from_worker(x):
    logging.getLogger("best_minibatch.test_dask_runner").info("hello from process %d", os.getpid())
    return x


@pytest.mark.slow  # a Dask cluster
def test_worker_log_records_reach_this_process(caplog, monkeypatch):
    """Forwarded to this process's loggers, even though Kedro configures logging on the worker when a task
    first imports it (from the project folder: conf/logging.yml)."""
    monkeypatch.chdir(PROJECT_ROOT)
    caplog.set_level(logging.INFO, logger="best_minibatch")
    pipeline = Pipeline([node(log_from_worker, "a", "b", name="log")])
    DaskRunner(config={"local": {"n_workers": 1}}).run(pipeline, DataCatalog({"a": MemoryDataset(1)}))
    forwarded = [r for r in caplog.records if r.getMessage().startswith("hello from process")]
    assert len(forwarded) == 1 and forwarded[0].process != os.getpid() and hasattr(forwarded[0], "worker")


# --------------------------------------------------------------------------- dask.yml


def test_the_project_dask_yml_is_valid_and_local_by_default():
    import yaml

    config = cl.ClusterConfig.from_params(yaml.safe_load((PROJECT_ROOT / "conf/base/dask.yml").read_text()))
    assert config.kind == "local" and config.threads_per_worker == 1 and config.tag_resources == {"gpu": {"GPU": 1.0}}
    options = cl.local_options(config)
    assert options["n_workers"] == os.cpu_count() and options["processes"] is True


@pytest.mark.parametrize(("params", "expected"), [
    ({"clustr": "local"}, "Parameter dask.clustr: unknown parameter. Known parameters: address, cluster, cuda, "
                          "dashboard_address, local, slurm, tag_resources. Did you mean 'cluster'?"),
    ({"cluster": "slurn"}, "Parameter dask.cluster: unknown value 'slurn'. Use one of local, cuda, slurm, address. "
                           "Did you mean 'slurm'?"),
    ({"cluster": "address"}, "Parameter dask.address: must name a running scheduler"),
    ({"cluster": "slurm"}, "Parameter dask.slurm.partition: must name a Slurm partition"),
    ({"local": {"n_worker": 2}}, "Parameter dask.local.n_worker: unknown parameter"),
    ({"local": {"n_workers": 0}}, "Parameter dask.local.n_workers: must be a positive integer or null"),
    ({"cuda": {"devices": "0,1"}}, "Parameter dask.cuda.devices: must be null or a list of GPU indices"),
    ({"tag_resources": {"gpu": {"GPU": 0}}}, "Parameter dask.tag_resources.gpu: must map resource names to positive"),
])
def test_dask_yml_mistakes_are_refused_naming_the_key(params, expected):
    with pytest.raises(cl.ClusterConfigError) as refused:
        cl.ClusterConfig.from_params(params)
    assert str(refused.value).startswith(expected)


def test_workers_keep_glibcs_malloc_defaults(monkeypatch):
    """Dask's default MALLOC_TRIM_THRESHOLD_ in a worker doubled a torch training step's time (docs/scaling.md).
    A plain Dask cluster started in this process earlier leaves the variable in its environment (as here)."""
    assert cl.WORKER_ENVIRON_UNSET == {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with cl.Cluster(cl.ClusterConfig.from_params({"local": {"n_workers": 1}})) as cluster:
        found = cluster.client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_")
    assert list(found.values()) == [None]


def test_a_bad_dask_yml_is_refused_with_the_run_checks_before_anything_is_written(tmp_path):
    project = copy_project(tmp_path / "project")
    (project / "conf" / "local" / "dask.yml").write_text("clustr: local\n")

    def written() -> list[Path]:  # logs/ holds the session's log (logs/info.log), which records the refusal too
        return sorted(p.relative_to(project) for p in project.rglob("*") if p.relative_to(project).parts[0] != "logs")

    before = written()
    with pytest.raises(cl.ClusterConfigError, match="Parameter dask.clustr: unknown parameter"):
        run_with(project, DaskRunner())
    assert written() == before, "the refused run wrote files"


def test_slurm_jobs_ask_for_their_gpus_and_offer_them_as_a_resource():
    config = cl.ClusterConfig.from_params({"cluster": "slurm", "slurm": {
        "partition": "gpu", "jobs": 4, "gpus_per_job": 2, "cores_per_job": 16, "walltime": "12:00:00",
        "job_extra_directives": ["--constraint=a100"]}})
    options = cl.slurm_options(config)
    assert options["queue"] == "gpu" and options["walltime"] == "12:00:00" and options["job_cpu"] == 16
    assert options["job_extra_directives"] == ["--constraint=a100", "--gres=gpu:2"]
    assert options["worker_extra_args"] == ["--resources", "GPU=2"]
    assert options["cores"] == 3 and options["processes"] == 1  # a thread per GPU and one for CPU-only nodes
    assert config.offered_resources() == {"GPU": 2}


@pytest.mark.parametrize(("kind", "module", "extra"), [("cuda", "dask_cuda", "gpu"), ("slurm", "dask_jobqueue", "slurm")])
def test_a_missing_extra_is_named_with_its_install_command(monkeypatch, kind, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    config = cl.ClusterConfig.from_params({"cluster": kind, "slurm": {"partition": "gpu"}})
    with pytest.raises(cl.MissingExtraError) as missing:
        cl.Cluster(config)
    assert f'pip install -e ".[{extra}]"' in str(missing.value) and f"'{kind}'" in str(missing.value)


# --------------------------------------------------------------------------- work handed out


def square(x):
    return x * x


def test_map_tasks_outside_the_dask_runner_runs_here_in_order():
    seen = []
    assert parallel.map_tasks(square, [3, 1, 2], label="t", on_result=lambda i, r: seen.append((i, r))) == [9, 1, 4]
    assert seen == [(0, 9), (1, 1), (2, 4)]
    assert not parallel.is_handing_out()


def test_a_run_folder_is_trained_in_by_one_task_at_a_time(tmp_path):
    order = []

    def hold(name: str) -> None:
        with parallel.exclusive(tmp_path / "run"):
            order.append(f"{name} in")
            time.sleep(0.2)
            order.append(f"{name} out")

    threads = [threading.Thread(target=hold, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert order == ["a in", "a out", "b in", "b out"]
