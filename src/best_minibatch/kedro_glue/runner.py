"""``kedro run --runner=best_minibatch.kedro_glue.runner.DaskRunner``: the pipeline's nodes as tasks of a Dask cluster.

Kedro glue on the pattern of Kedro's deployment guide for ``dask.distributed`` (a
custom ``AbstractRunner`` that submits nodes to a ``distributed.Client``); the
cluster itself comes from ``conf/<env>/dask.yml`` through :mod:`best_minibatch.services.cluster`
(``local`` by default; ``--runner-params cluster=cuda`` picks another kind for one
run). What it adds to the guide's pattern, and why (docs/scaling.md):

* **Tasks.** Nodes joined by an in-memory dataset run as one task on one worker, in
  the pipeline's order, so in-memory data never crosses workers. A pipeline where
  that is impossible (a node of another task lies between two nodes joined in
  memory) is refused before any work, naming the datasets. Every other dataset is a
  file the next task reads, as under the sequential runner. The driver submits a
  task once the tasks it depends on have finished.
* **Nodes that hand work out.** A node marked :func:`best_minibatch.services.parallel.hands_out_work`
  (gradient_training per ordering, batch_selection's experiment) runs with
  :func:`best_minibatch.services.parallel.handing_out`: its trainings become tasks of the same
  cluster, one per (ordering, seed) and per (policy, seed).
* **Resources.** A node's tags map to Dask worker resources (``tag_resources`` in
  dask.yml: ``gpu`` -> ``GPU: 1``), asked for only where some worker offers them. A
  node that hands work out passes them to the tasks it hands out and asks for none
  itself (a waiting Dask task keeps what it holds).
* **Hooks.** Node and dataset hooks (``before_node_run``, ``after_dataset_saved``,
  ...) are recorded where the node runs and called in this process, in their order,
  once its task has finished, on the session's hook manager with the data, the node
  and the catalog: the project's hooks keep the run's state here (the run manifest's
  saved datasets, MLflow tracking). Pipeline hooks run here as always.
* **Logs.** Worker log records of ``best_minibatch`` and ``kedro`` are forwarded to
  this process's logging (``Client.forward_logging``), so they print where
  ``kedro run`` prints.
"""

from __future__ import annotations

import graphlib
import logging
import pickle
import traceback
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl
from kedro.io import AbstractVersionedDataset, DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline
from kedro.pipeline.node import Node
from kedro.runner import AbstractRunner
from kedro.runner.task import Task

from best_minibatch.config import every_problem
from best_minibatch.services import parallel
from best_minibatch.services.cluster import WHERE, Cluster, ClusterConfig

logger = logging.getLogger(__name__)

#: The configuration file (conf/<env>/dask.yml) the runner reads through the session's config loader.
CONFIG_KEY = "dask"
#: Loggers whose worker records are forwarded to this process.
FORWARDED_LOGGERS = ("best_minibatch", "kedro")

_CONFIG_LOADER: Any = None  # the session's config loader, captured by DaskConfig.after_context_created
# Runners by the name Kedro gives the run (run_params["runner"]: the instance's str), so the hook can check theirs.
_RUNNERS: weakref.WeakValueDictionary[str, DaskRunner] = weakref.WeakValueDictionary()


class InMemoryDatasetError(ValueError):
    """In-memory datasets would cross workers; the message names them and the fix."""


class RemoteNodeError(RuntimeError):
    """A node of this project failed on a worker with an error that cannot travel back as itself."""


class DaskConfig:
    """Kedro hook (settings.py): hands the session's config loader to the runner, which reads ``dask.yml``,
    and checks a Dask run's ``dask.yml`` and task plan with the other run checks, before the run's lock is taken
    or anything is written."""

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        global _CONFIG_LOADER
        _CONFIG_LOADER = context.config_loader

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Pipeline, catalog: Any) -> None:
        runner = _RUNNERS.get(str(run_params.get("runner")))
        if runner is not None:
            runner.check(pipeline, catalog)


def configured_cluster(kind: str | None = None) -> ClusterConfig:
    """``dask.yml`` of the session's environment (checked), or the defaults when there is none.

    Every mistake is reported at once, each naming the file that sets the key (the run's environment
    overrides ``conf/base``).
    """
    params: Any = {}
    where: Any = WHERE
    if _CONFIG_LOADER is not None:
        try:
            params = _CONFIG_LOADER[CONFIG_KEY]
        except (KeyError, MissingConfigException):  # no dask.yml: the defaults (a local cluster)
            params = {}
        where = _file_setting(_CONFIG_LOADER)
    return every_problem(lambda p: ClusterConfig.from_params(p, kind, where), params, CONFIG_KEY)


def _file_setting(loader: Any) -> Callable[[str], str]:
    """``key -> file``: the last of the environments' dask files (base, then the run's) whose YAML sets ``key``."""
    import yaml

    root = Path(str(loader.conf_source))
    envs = [loader.base_env, loader.env or loader.default_run_env]
    layers: list[tuple[str, Any]] = []
    for env in dict.fromkeys(e for e in envs if e):
        for file in sorted((root / env).glob("dask*.yml")) + sorted((root / env).glob("dask*/**/*.yml")):
            try:
                layers.append((f"{root.name}/{env}/{file.relative_to(root / env).as_posix()}",
                               yaml.safe_load(file.read_text()) or {}))
            except (OSError, yaml.YAMLError):
                continue

    def where(key: str) -> str:
        parts = key.split(".")[1:]
        found = [name for name, data in layers if _sets(data, parts)]
        return found[-1] if found else "not set in any dask.yml: its default applies"

    return where


def _sets(data: Any, parts: list[str]) -> bool:
    for part in parts:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


# --------------------------------------------------------------------------- tasks of the pipeline


@dataclass
class NodeGroup:
    """Nodes that run as one task: those joined by in-memory datasets, in the pipeline's order."""

    index: int
    nodes: list[Node]
    depends_on: set[int] = field(default_factory=set)

    @property
    def name(self) -> str:
        first = self.nodes[0].name
        return first if len(self.nodes) == 1 else f"{first} (+{len(self.nodes) - 1})"


def in_memory(catalog: Any, name: str) -> bool:
    return name != "parameters" and not name.startswith("params:") and isinstance(catalog.get(name), MemoryDataset)


def plan_groups(pipeline: Pipeline, catalog: Any) -> list[NodeGroup]:
    """The tasks of ``pipeline``: nodes joined by in-memory datasets together; refuse what cannot be."""
    nodes = pipeline.nodes  # topological order
    producer = {output: node for node in nodes for output in node.outputs}
    parent = {node: node for node in nodes}

    def root(node: Node) -> Node:
        while parent[node] is not node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    joined: dict[str, tuple[Node, list[Node]]] = {}
    for node in nodes:
        for name in node.inputs:
            if name in producer and in_memory(catalog, name):
                parent[root(node)] = root(producer[name])
                joined.setdefault(name, (producer[name], []))[1].append(node)
    roots: dict[Node, NodeGroup] = {}
    groups: list[NodeGroup] = []
    for node in nodes:
        group = roots.get(root(node))
        if group is None:
            group = roots[root(node)] = NodeGroup(len(groups), [])
            groups.append(group)
        group.nodes.append(node)
    group_of = {node: roots[root(node)].index for node in nodes}
    for node, dependencies in pipeline.node_dependencies.items():
        for dependency in dependencies:
            if group_of[dependency] != group_of[node]:
                groups[group_of[node]].depends_on.add(group_of[dependency])
    try:
        tuple(graphlib.TopologicalSorter({g.index: g.depends_on for g in groups}).static_order())
    except graphlib.CycleError as error:
        cycle = set(error.args[1])
        crossing = sorted(name for name, (source, _) in joined.items() if group_of[source] in cycle)
        between = sorted(n.name for n in nodes if group_of[n] in cycle and not any(
            n is source or n in readers for name in crossing for source, readers in [joined[name]]))
        detail = "; ".join(f"'{name}' from node '{joined[name][0].name}' to "
                           + ", ".join(f"'{reader.name}'" for reader in joined[name][1]) for name in crossing)
        raise InMemoryDatasetError(
            f"The Dask runner cannot run this pipeline: in-memory dataset(s) would cross workers: {detail}. Nodes "
            "joined by an in-memory dataset run as one task on one worker, but here node(s) "
            f"{', '.join(repr(n) for n in between)} must run between them (they read what the first makes and the "
            "last reads what they make). Give each of those datasets a catalog entry that writes a file (for "
            "example type: pickle.PickleDataset), or run with the sequential runner (docs/scaling.md)."
        ) from None
    return groups


def tag_resources(node: Node, mapping: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The worker resources a task of ``node`` asks for: the largest amount any of its tags maps to."""
    wanted: dict[str, float] = {}
    for tag in sorted(node.tags):
        for name, amount in (mapping.get(tag) or {}).items():
            wanted[name] = max(wanted.get(name, 0.0), float(amount))
    return wanted


def usable_mapping(mapping: Mapping[str, Mapping[str, float]], offered: Mapping[str, float]
                   ) -> tuple[dict[str, dict[str, float]], list[str]]:
    """The tags whose resources some worker offers, and a note for each tag left out."""
    usable, notes = {}, []
    for tag, resources in mapping.items():
        missing = {name: amount for name, amount in resources.items() if offered.get(name, 0.0) < amount}
        if missing:
            notes.append(f"Nodes tagged '{tag}' would ask for {dict(resources)}, which no worker of this cluster "
                         f"offers (it offers {dict(offered) or 'no resources'}): they run on any worker.")
        else:
            usable[tag] = dict(resources)
    return usable, notes


# --------------------------------------------------------------------------- on the worker


class _HookRelay:
    """Stands in for Kedro's hook manager on a worker: records each node and dataset hook call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None, dict[str, Any]]] = []
        self.hook = self

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda **kwargs: self._record(name, kwargs)

    def _record(self, name: str, kwargs: dict[str, Any]) -> list | None:
        kwargs = dict(kwargs)
        kwargs.pop("catalog", None)  # the driver passes its own catalog
        node = kwargs.pop("node", None)
        self.calls.append((name, node.name if node is not None else None, kwargs))
        return [] if name == "before_node_run" else None


@dataclass
class GroupResult:
    calls: list[tuple[str, str | None, dict[str, Any]]]
    outputs: dict[str, Any]


class GroupFailed(Exception):
    """A node of a task failed: the hook calls made until then, the error (if it travels) and its traceback."""

    def __init__(self, calls: list, node: str, error: BaseException, worker_traceback: str) -> None:
        super().__init__(calls, node, error, worker_traceback)
        self.calls, self.node, self.error, self.worker_traceback = calls, node, error, worker_traceback

    def __str__(self) -> str:
        # Short: Dask replaces an error whose text is over distributed.admin.max-error-length (10,000 characters)
        # with Exception('Long error message', ...), and the args hold the hook calls with every node input.
        text = f"Node '{self.node}' failed: {type(self.error).__name__}: {self.error}"
        return text if len(text) <= 2_000 else text[:2_000] + " ..."


def _travels(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a stand-in with its message (a project error stays one)."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        text = f"{type(error).__name__}: {error}"
        if type(error).__module__.split(".")[0] == __name__.split(".")[0]:
            return RemoteNodeError(str(error))
        return RuntimeError(text)


def clear_earlier_attempt(node: Node, catalog: DataCatalog) -> list[str]:
    """Remove what an earlier attempt of ``node``'s task wrote at this run's save version; the paths removed.

    Dask computes a finished task again when the worker holding its result dies before the driver has
    collected it (a killed or lost worker). Its versioned outputs are then already on disk at this run's
    save version, which Kedro refuses to write twice ("must not exist if versioning is enabled"). They are
    this run's own files, possibly half-written, never a user's: the save version is this run's, and
    nothing reads them before the task is reported done. Nodes are deterministic, so the new attempt
    writes them again.
    """
    removed = []
    for name in node.outputs:
        dataset = catalog.get(name)
        version = getattr(dataset, "_version", None)
        if not isinstance(dataset, AbstractVersionedDataset) or version is None or version.save is None:
            continue
        path = str(dataset._get_versioned_path(version.save))
        fs = getattr(dataset, "_fs", None)
        if fs is not None and fs.exists(path):
            fs.rm(path, recursive=True)
        elif fs is None and Path(path).exists():
            Path(path).unlink()
        else:
            continue
        removed.append(path)
        logger.warning("Node '%s' runs again (its worker was lost): removed this run's earlier write of '%s' (%s)",
                       node.name, name, path)
    return removed


def run_group(nodes: list[Node], catalog: DataCatalog, hand_out: dict[str, dict[str, float]], keep: list[str],
              is_async: bool, run_id: str | None) -> GroupResult:
    """Run ``nodes`` in order with ``catalog`` (a worker's copy); their hook calls and the outputs in ``keep``."""
    relay = _HookRelay()
    for node in nodes:
        try:
            clear_earlier_attempt(node, catalog)
            if node.name in hand_out:
                with parallel.handing_out(hand_out[node.name]):
                    Task(node=node, catalog=catalog, is_async=is_async, hook_manager=relay, run_id=run_id).execute()
            else:
                Task(node=node, catalog=catalog, is_async=is_async, hook_manager=relay, run_id=run_id).execute()
        except Exception as error:
            raise GroupFailed(relay.calls, node.name, _travels(error), traceback.format_exc()) from None
    return GroupResult(relay.calls, {name: catalog.load(name) for name in keep})


# --------------------------------------------------------------------------- the runner


class DaskRunner(AbstractRunner):
    """Runs a pipeline on the Dask cluster of ``dask.yml`` (docs/scaling.md).

    ``cluster`` overrides the file's ``cluster`` kind (``--runner-params cluster=cuda``);
    ``config`` replaces the file (a mapping like dask.yml's content; tests, scripts).
    While a run goes on, :attr:`client` is its ``distributed.Client``.
    """

    def __init__(self, is_async: bool = False, cluster: str | None = None,
                 config: Mapping[str, Any] | None = None) -> None:
        super().__init__(is_async=is_async)
        self._kind = cluster
        self._config = config
        self.client: Any = None
        _RUNNERS[str(self)] = self

    def cluster_config(self) -> ClusterConfig:
        if self._config is not None:
            return ClusterConfig.from_params(self._config, self._kind)
        return configured_cluster(self._kind)

    def check(self, pipeline: Pipeline, catalog: Any) -> tuple[list[NodeGroup], ClusterConfig]:
        """The run's tasks and its cluster's configuration; raises what would stop the run, before any work."""
        return plan_groups(pipeline, catalog), self.cluster_config()

    def _get_executor(self, max_workers: int) -> None:  # the cluster is the executor
        return None

    def _run(self, pipeline: Pipeline, catalog: Any, hook_manager: Any = None, run_id: str | None = None) -> None:
        groups, config = self.check(pipeline, catalog)  # refuses before any work (also run by DaskConfig's hook)
        if not groups:
            return
        with Cluster(config) as cluster:
            self.client = cluster.client
            try:
                # Kedro configures logging when its project module is first imported: before the forwarding.
                cluster.forward_logs(FORWARDED_LOGGERS, preload=("kedro.framework.project",))
                mapping, notes = usable_mapping(config.tag_resources, cluster.offered_resources())
                for note in notes:
                    logger.info(note)
                self._run_groups(groups, pipeline, catalog, hook_manager, run_id, mapping)
            finally:
                self.client = None

    def _run_groups(self, groups: list[NodeGroup], pipeline: Pipeline, catalog: Any, hook_manager: Any,
                    run_id: str | None, mapping: Mapping[str, Mapping[str, float]]) -> None:
        from distributed import as_completed

        client = self.client
        free_outputs = pipeline.outputs()
        done_groups: set[int] = set()
        done_nodes: list[Node] = []
        pending = {group.index: group for group in groups}
        running = as_completed(loop=client.loop)
        group_of_key: dict[str, NodeGroup] = {}
        submitted: dict[str, Any] = {}
        total = len(pipeline.nodes)

        def submit_ready() -> None:
            for index in sorted(pending):
                group = pending[index]
                if group.depends_on <= done_groups:
                    del pending[index]
                    future = self._submit(group, catalog, free_outputs, mapping, run_id)
                    group_of_key[future.key] = group
                    submitted[future.key] = future
                    running.add(future)

        submit_ready()
        try:
            for future in running:
                group = group_of_key.pop(future.key)
                submitted.pop(future.key)
                try:
                    result = future.result()
                except GroupFailed as failed:
                    self._replay(failed.calls, group, catalog, hook_manager)
                    log = logger.debug if isinstance(failed.error, RemoteNodeError) or type(
                        failed.error).__module__.startswith("best_minibatch") else logger.error
                    log("Node '%s' failed on a Dask worker:\n%s", failed.node, failed.worker_traceback)
                    raise failed.error from None
                self._replay(result.calls, group, catalog, hook_manager)
                for name, data in result.outputs.items():
                    catalog.save(name, data)
                for node in group.nodes:
                    done_nodes.append(node)
                    self._logger.info("Completed node: %s", node.name)
                self._logger.info("Completed %d out of %d tasks", len(done_nodes), total)
                done_groups.add(group.index)
                submit_ready()
        except BaseException:
            client.cancel(list(submitted.values()))
            self._suggest_resume_scenario(pipeline, done_nodes, catalog)
            raise
        if pending:
            raise RuntimeError(f"Unable to schedule {len(pending)} task(s): {[g.name for g in pending.values()]}")

    def _submit(self, group: NodeGroup, catalog: Any, free_outputs: set[str],
                mapping: Mapping[str, Mapping[str, float]], run_id: str | None) -> Any:
        names = sorted({name for node in group.nodes for name in (*node.inputs, *node.outputs)})
        # The task's own catalog: only its datasets (the pinned versions travel with them).
        subset = DataCatalog(datasets={name: catalog.get(name) for name in names})
        keep = sorted({name for node in group.nodes for name in node.outputs}
                      & free_outputs & {name for name in names if in_memory(catalog, name)})
        resources: dict[str, float] = {}
        hand_out: dict[str, dict[str, float]] = {}
        for node in group.nodes:
            wanted = tag_resources(node, mapping)
            if parallel.marked_hands_out(node.func):
                hand_out[node.name] = wanted  # its trainings ask for them; the waiting node holds nothing
            else:
                for name, amount in wanted.items():
                    resources[name] = max(resources.get(name, 0.0), amount)
        return self.client.submit(run_group, group.nodes, subset, hand_out, keep, self._is_async, run_id,
                                  key=f"node-{group.nodes[0].name}-{group.index}-{run_id or ''}",
                                  resources=resources or None, pure=False)

    @staticmethod
    def _replay(calls: Iterable[tuple[str, str | None, dict[str, Any]]], group: NodeGroup, catalog: Any,
                hook_manager: Any) -> None:
        nodes = {node.name: node for node in group.nodes}
        for name, node_name, kwargs in calls:
            extra: dict[str, Any] = {}
            if node_name is not None:
                extra["node"] = nodes[node_name]
            if name in ("before_node_run", "after_node_run", "on_node_error"):
                extra["catalog"] = catalog
            getattr(hook_manager.hook, name)(**kwargs, **extra)
