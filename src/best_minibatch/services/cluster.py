"""The Dask cluster a run uses, from ``conf/<env>/dask.yml``: started, connected, and closed again.

Knows nothing of Kedro (``best_minibatch.kedro_glue.runner.DaskRunner`` reads the file through
Kedro's config loader and hands the mapping to :meth:`ClusterConfig.from_params`;
``scripts/gpu_check.py`` uses it without Kedro). Four kinds (docs/scaling.md):

* ``local``: a ``distributed.LocalCluster`` of worker processes on this machine, one
  thread each, one worker per CPU core unless ``n_workers`` says otherwise;
* ``cuda``: dask-cuda's ``LocalCUDACluster``, one worker per GPU, each pinned to its
  device (``CUDA_VISIBLE_DEVICES``) and offering the resource ``GPU: 1``;
* ``slurm``: dask-jobqueue's ``SLURMCluster``, ``jobs`` batch jobs of one worker each,
  ``gpus_per_job`` GPUs per job offered as ``GPU: <gpus_per_job>``;
* ``address``: a scheduler the user already runs (``tcp://host:8786``); its workers
  offer whatever resources they were started with.

dask-cuda and dask-jobqueue are optional extras (``pip install -e ".[gpu]"``,
``".[slurm]"``), imported only when their kind is chosen.

``tag_resources`` maps a node tag to the worker resources a task of that node asks
for (``gpu: {GPU: 1}``: two trainings never share a GPU). A tag's resources are asked
for only when the cluster's workers offer them: ``local`` workers offer none unless
``local.worker_resources`` says so, so on a CPU machine the ``gpu`` tag asks for
nothing and every worker takes every task.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from distributed import WorkerPlugin

from best_minibatch.config import ConfigError, Section, is_int, is_number

logger = logging.getLogger(__name__)

KINDS = ("local", "cuda", "slurm", "address")
SECTION = "dask"
WHERE = "conf/base/dask.yml"
#: Each GPU worker offers this resource; the gpu tag asks for one of it.
GPU_RESOURCE = "GPU"
#: Dask's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536 (to hand freed memory back to the system).
#: Setting it at all turns off glibc's dynamic mmap threshold, so every large tensor torch allocates is mapped
#: and unmapped afresh: 150 small-CNN training steps on one CPU thread took 2.27x as long in such a worker as in
#: a plain process (benchmarks/benchmark_worker_malloc.py; docs/scaling.md). Workers this module starts keep
#: glibc's defaults.
WORKER_ENVIRON_UNSET = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
#: Set in every worker process this module starts: its records are forwarded, not written to the run's log file.
#: ``nanny.environ``, not ``pre-spawn-environ``: a nanny writes the latter into this process's own environment too.
WORKER_ENVIRON_SET = {"distributed.nanny.environ.BEST_MINIBATCH_DASK_WORKER": "1"}
#: Dask's own logs (nanny, scheduler, worker banners: "Listening to", "Local Directory", ...) at this level unless
#: the user sets the variable (e.g. DASK_LOGGING__DISTRIBUTED=info); worker processes read it when they start.
DASK_LOG_VARIABLE, DASK_LOG_LEVEL = "DASK_LOGGING__DISTRIBUTED", "warning"
#: Seconds a worker process is given to exit when the cluster closes, before its nanny kills it. Dask's own 4 s
#: (0.8 of Nanny.close's 5 s) is too short for a worker that imported torch on a busy 2-core machine: every clean
#: shutdown of the default run warned "Worker process still alive after 4.0 seconds, killing".
WORKER_CLOSE_SECONDS = 60


class ClusterConfigError(ConfigError):
    """``dask.yml`` cannot work; the message names the key and the fix."""


class MissingExtraError(ImportError):
    """The cluster kind needs an optional dependency that is not installed."""


@dataclass(frozen=True)
class ClusterConfig:
    kind: str = "local"
    # local
    n_workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str | float | None = "auto"
    worker_resources: Mapping[str, float] = field(default_factory=dict)
    # cuda
    devices: tuple[int, ...] | None = None
    cuda_threads_per_worker: int = 2
    # slurm
    partition: str | None = None
    account: str | None = None
    jobs: int = 1
    gpus_per_job: int = 1
    cores_per_job: int = 8
    memory_per_job: str = "32GiB"
    walltime: str = "24:00:00"
    job_extra_directives: tuple[str, ...] = ()
    log_directory: str | None = None
    # address
    address: str | None = None
    # every kind
    tag_resources: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    dashboard_address: str | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None, kind: str | None = None,
                    where: str | Callable[[str], str | None] = WHERE) -> ClusterConfig:
        """Read ``dask.yml`` (every key checked, unknown keys refused); ``kind`` overrides its ``cluster``.

        ``where`` names the file in messages: a string, or a function of the key's path that
        names the file setting it (``conf/local/dask.yml`` overrides ``conf/base/dask.yml``).
        """
        section = Section(params, SECTION, ("cluster", "local", "cuda", "slurm", "address", "tag_resources",
                                            "dashboard_address"), ClusterConfigError, where)
        if kind is not None:
            section.params["cluster"] = kind
        kind = section.choice("cluster", "local", KINDS)
        local = section.section("local", ("n_workers", "threads_per_worker", "memory_limit", "worker_resources"))
        cuda = section.section("cuda", ("devices", "threads_per_worker"))
        slurm = section.section("slurm", ("partition", "account", "jobs", "gpus_per_job", "cores_per_job",
                                          "memory_per_job", "walltime", "job_extra_directives", "log_directory"))
        address = section.get("address")
        if kind == "address" and not (isinstance(address, str) and address.strip()):
            raise section.error("address", f"must name a running scheduler when cluster is 'address', got {address!r}",
                                "Write its address, e.g. tcp://10.0.0.5:8786 (printed by `dask scheduler`).")
        if kind == "slurm" and not isinstance(slurm.get("partition"), str):
            raise slurm.error("partition", f"must name a Slurm partition, got {slurm.get('partition')!r}",
                              "Write the partition your GPU jobs run in (`sinfo` lists them).")
        devices = cuda.get("devices")
        if devices is not None and (not isinstance(devices, list) or not devices
                                    or not all(is_int(d) and d >= 0 for d in devices)):
            raise cuda.error("devices", f"must be null or a list of GPU indices, got {devices!r}",
                             "Write null for every visible GPU, or e.g. [0, 1].")
        memory_limit = local.get("memory_limit", "auto")
        if not (memory_limit is None or isinstance(memory_limit, str) or is_number(memory_limit)):
            raise local.error("memory_limit", f"must be auto, a size such as 8GiB, or null, got {memory_limit!r}",
                              "Write auto (the machine's memory shared by the workers), a size, or null (no limit).")
        extra = slurm.get("job_extra_directives", [])
        if not isinstance(extra, list) or not all(isinstance(e, str) for e in extra):
            raise slurm.error("job_extra_directives", f"must be a list of strings, got {extra!r}",
                              "Write each #SBATCH option as a string, e.g. ['--constraint=a100'].")
        dashboard = section.get("dashboard_address")
        if dashboard is not None and not isinstance(dashboard, str):
            raise section.error("dashboard_address", f"must be null or an address such as ':8787', got {dashboard!r}",
                                "Write null (no dashboard) or ':8787' (needs bokeh installed).")
        return cls(
            kind=kind,
            n_workers=local.integer("n_workers", None, 1, "Write null (one per CPU core) or a count.", optional=True),
            threads_per_worker=local.integer("threads_per_worker", 1, 1, "Write 1: torch runs one thread per task."),
            memory_limit=memory_limit,
            worker_resources=_resources(local, "worker_resources"),
            devices=tuple(devices) if devices is not None else None,
            cuda_threads_per_worker=cuda.integer(
                "threads_per_worker", 2, 1, "Write 2: one thread for the training on the worker's GPU, one for "
                                            "CPU-only nodes beside it."),
            partition=slurm.get("partition"),
            account=_optional_string(slurm, "account"),
            jobs=slurm.integer("jobs", 1, 1, "Write how many batch jobs (workers) to start."),
            gpus_per_job=slurm.integer("gpus_per_job", 1, 0, "Write the GPUs each job asks for (0: none)."),
            cores_per_job=slurm.integer("cores_per_job", 8, 1, "Write the CPU cores each job asks for."),
            memory_per_job=_string(slurm, "memory_per_job", "32GiB", "Write a size such as 64GiB."),
            walltime=_string(slurm, "walltime", "24:00:00", "Write HH:MM:SS, e.g. 24:00:00."),
            job_extra_directives=tuple(extra),
            log_directory=_optional_string(slurm, "log_directory"),
            address=address.strip() if isinstance(address, str) else None,
            tag_resources=_tag_resources(section),
            dashboard_address=dashboard,
        )

    def offered_resources(self) -> dict[str, float] | None:
        """What every worker of a cluster of this kind offers; ``None`` when only the running workers can say."""
        if self.kind == "local":
            return dict(self.worker_resources)
        if self.kind == "cuda":
            return {GPU_RESOURCE: 1}
        if self.kind == "slurm":
            return {GPU_RESOURCE: self.gpus_per_job} if self.gpus_per_job else {}
        return None

    def threads_per_gpu_worker(self) -> int:
        """Threads of one slurm worker: one per GPU of its job (a training each), and one for CPU-only nodes."""
        return self.gpus_per_job + 1


def _string(section: Section, name: str, default: str, fix: str) -> str:
    value = section.get(name, default)
    if not isinstance(value, str) or not value:
        raise section.error(name, f"must be a non-empty string, got {value!r}", fix)
    return value


def _optional_string(section: Section, name: str) -> str | None:
    value = section.get(name)
    if value is not None and not isinstance(value, str):
        raise section.error(name, f"must be null or a string, got {value!r}", "Write it as text, or null.")
    return value


def _resources(section: Section, name: str) -> dict[str, float]:
    value = section.get(name) or {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and is_number(v) and v > 0
                                                 for k, v in value.items()):
        raise section.error(name, f"must map resource names to positive amounts, got {value!r}",
                            "Write e.g. {GPU: 1}, or {} for none.")
    return {k: float(v) for k, v in value.items()}


def _tag_resources(section: Section) -> dict[str, dict[str, float]]:
    value = section.get("tag_resources")
    if value is None:
        value = {"gpu": {GPU_RESOURCE: 1}}
    if not isinstance(value, Mapping):
        raise section.error("tag_resources", f"must map node tags to resources, got {value!r}",
                            "Write e.g. {gpu: {GPU: 1}}.")
    tags = Section(value, section.key("tag_resources"), map(str, value), ClusterConfigError, WHERE)
    return {str(tag): _resources(tags, str(tag)) for tag in value}


# --------------------------------------------------------------------------- starting and connecting


def _import_extra(module: str, extra: str, kind: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(
            f"Parameter dask.cluster: '{kind}' needs the package {module.replace('_', '-')}, which is not installed "
            f"({error}). Install the project's '{extra}' extra: pip install -e \".[{extra}]\" ({WHERE})."
        ) from error


def slurm_options(config: ClusterConfig) -> dict[str, Any]:
    """The keyword arguments of ``dask_jobqueue.SLURMCluster`` for this configuration (one worker per job)."""
    directives = list(config.job_extra_directives)
    worker_args: list[str] = []
    if config.gpus_per_job:
        directives.append(f"--gres=gpu:{config.gpus_per_job}")
        worker_args += ["--resources", f"{GPU_RESOURCE}={config.gpus_per_job}"]
    # Worker threads: one per GPU (each training pins itself to a free GPU of its job) and one for CPU-only
    # nodes; without GPUs one per core. The job asks Slurm for cores_per_job cores either way (job_cpu).
    threads = config.threads_per_gpu_worker() if config.gpus_per_job else config.cores_per_job
    options = {
        "queue": config.partition, "account": config.account, "walltime": config.walltime,
        "cores": threads, "job_cpu": config.cores_per_job, "processes": 1,
        "memory": config.memory_per_job, "job_extra_directives": directives, "worker_extra_args": worker_args,
        "log_directory": config.log_directory,
    }
    if config.dashboard_address is not None:
        options["scheduler_options"] = {"dashboard_address": config.dashboard_address}
    return options


def local_options(config: ClusterConfig) -> dict[str, Any]:
    """The keyword arguments of ``distributed.LocalCluster``: worker processes, one thread each."""
    return {"n_workers": config.n_workers or os.cpu_count() or 1, "threads_per_worker": config.threads_per_worker,
            "processes": True, "memory_limit": config.memory_limit, "resources": dict(config.worker_resources) or None,
            "dashboard_address": config.dashboard_address}


def cuda_options(config: ClusterConfig) -> dict[str, Any]:
    """The keyword arguments of ``dask_cuda.LocalCUDACluster``: one worker per GPU offering ``GPU: 1``."""
    options: dict[str, Any] = {"threads_per_worker": config.cuda_threads_per_worker,
                               "resources": {GPU_RESOURCE: 1}, "dashboard_address": config.dashboard_address}
    if config.devices is not None:
        options["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, config.devices))
    return options


def _pop_worker_environ() -> dict[str, str]:
    """Remove the variables of :data:`WORKER_ENVIRON_UNSET` from this process's environment; return them.

    A nanny copies its variables into the environment of the process that starts it, and
    its worker processes (started, and restarted after a crash, at any time while the
    cluster lives) inherit that environment: a plain Dask cluster started here earlier
    would pass the variable on to every later worker. :class:`Cluster` restores them when
    it closes.
    """
    names = [key.rsplit(".", 1)[1] for key in WORKER_ENVIRON_UNSET]
    return {name: os.environ.pop(name) for name in names if name in os.environ}


def _start_cluster(config: ClusterConfig) -> Any:
    """The cluster of a ``local``, ``cuda`` or ``slurm`` configuration, its workers with glibc's malloc defaults
    (:data:`WORKER_ENVIRON_UNSET`; a Slurm job's nanny reads the Dask configuration of the machine it runs on)."""
    import dask

    with dask.config.set({**WORKER_ENVIRON_UNSET, **WORKER_ENVIRON_SET}):  # read when each nanny is made
        if config.kind == "local":
            from distributed import LocalCluster

            return LocalCluster(**local_options(config))
        if config.kind == "cuda":
            return _import_extra("dask_cuda", "gpu", "cuda").LocalCUDACluster(**cuda_options(config))
        jobqueue = _import_extra("dask_jobqueue", "slurm", "slurm")
        cluster = jobqueue.SLURMCluster(**slurm_options(config))
        cluster.scale(jobs=config.jobs)
        return cluster


class Cluster:
    """A connected client and, unless the scheduler is the user's, the cluster this process started."""

    def __init__(self, config: ClusterConfig) -> None:
        from distributed import Client

        self.config = config
        self.cluster: Any = None
        self._saved_environ: dict[str, str | None] = {}
        if config.kind == "address":
            self.client = Client(config.address)
        else:
            self._saved_environ = _pop_worker_environ()
            self._quiet_dask_logs()
            try:
                self.cluster = _start_cluster(config)
                self.client = Client(self.cluster)
            except BaseException:
                self.close()
                raise
        logger.info("Dask cluster: %s; %s", config.kind, self.describe())

    def describe(self) -> str:
        workers = self.client.scheduler_info().get("workers", {})
        threads = sum(w.get("nthreads", 0) for w in workers.values())
        return (f"scheduler {self.client.scheduler.address}, {len(workers)} worker(s), {threads} thread(s)"
                + (f", dashboard {self.dashboard_link()}" if self.dashboard_link() else ""))

    def dashboard_link(self) -> str | None:
        """The scheduler's dashboard, when it serves one (Dask starts it wherever bokeh is installed)."""
        try:
            if "dashboard" in (self.client.scheduler_info().get("services") or {}):
                return self.client.dashboard_link
        except Exception:  # no link to give: the line says nothing of a dashboard
            pass
        return None

    def forward_logs(self, names: tuple[str, ...], level: int = logging.INFO, preload: tuple[str, ...] = ()) -> None:
        """Worker records of the loggers ``names`` (and below) at ``level`` or above are handled by this process's
        loggers of the same names; on the workers those loggers are set to ``level`` and rich's progress bars off
        (several workers drawing on one terminal garble it; the loops log a line per epoch instead).

        ``preload``: modules each worker imports first, before the forwarding starts: one that configures
        logging on import (Kedro's project module) would otherwise drop the forwarding handler when a task
        first imports it.
        """
        plugin = _WorkerLogging(names, level, os.getpid(), preload)
        self.client.register_plugin(plugin, name="best_minibatch-logging")
        for name in names:
            self.client.forward_logging(name, level=level)

    def offered_resources(self) -> dict[str, float]:
        """The resources some worker offers: from the configuration, or from the running workers (address)."""
        offered = self.config.offered_resources()
        if offered is not None:
            return offered
        found: dict[str, float] = {}
        for worker in self.client.scheduler_info().get("workers", {}).values():
            for name, amount in (worker.get("resources") or {}).items():
                found[name] = max(found.get(name, 0.0), float(amount))
        return found

    def _quiet_dask_logs(self) -> None:
        """Dask's logs at WARNING here and in the workers, unless the user set :data:`DASK_LOG_VARIABLE`."""
        if DASK_LOG_VARIABLE in os.environ:
            return  # asked for
        # Importing distributed set its logger to Dask's own level (INFO), over conf/logging.yml.
        logging.getLogger("distributed").setLevel(DASK_LOG_LEVEL.upper())
        os.environ[DASK_LOG_VARIABLE] = DASK_LOG_LEVEL  # inherited by the worker processes; removed on close
        self._saved_environ.setdefault(DASK_LOG_VARIABLE, None)

    def _close_workers(self) -> None:
        """Ask every local worker to exit, giving it :data:`WORKER_CLOSE_SECONDS` before its nanny kills it."""
        import asyncio

        nannies = [w for w in (getattr(self.cluster, "workers", None) or {}).values() if type(w).__name__ == "Nanny"]
        if not nannies:
            return

        async def close_all() -> None:
            await asyncio.gather(*(nanny.close(timeout=WORKER_CLOSE_SECONDS) for nanny in nannies),
                                 return_exceptions=True)

        try:
            self.cluster.sync(close_all)
        except Exception as error:  # the cluster's own close below still stops whatever is left
            logger.debug("Closing the workers one by one failed: %r", error)

    def close(self) -> None:
        try:
            if getattr(self, "client", None) is not None:
                self.client.close()
            if self.cluster is not None:
                self._close_workers()
        finally:
            try:
                if self.cluster is not None:
                    self.cluster.close()
            finally:
                for name, value in self._saved_environ.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _WorkerLogging(WorkerPlugin):
    """Set on every worker, present and future: the forwarded loggers' level, no progress bars."""

    def __init__(self, names: tuple[str, ...], level: int, client_pid: int, preload: tuple[str, ...]) -> None:
        self.names, self.level, self.client_pid, self.preload = names, level, client_pid, preload

    def setup(self, worker: Any) -> None:
        if os.getpid() == self.client_pid:  # a worker in the client's own process: its logging is the client's
            return
        import importlib

        for module in self.preload:
            importlib.import_module(module)
        for name in self.names:
            found = logging.getLogger(name)
            if found.level == logging.NOTSET or found.level > self.level:
                found.setLevel(self.level)
            # Printed where the client runs (forwarded), not a second time by the worker's own handlers.
            found.propagate = False
        try:
            import rich

            rich.reconfigure(force_terminal=False, force_interactive=False)
        except ImportError:  # rich is a dependency; nothing to switch off without it
            pass

    def teardown(self, worker: Any) -> None:
        pass
