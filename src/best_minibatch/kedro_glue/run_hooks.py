"""Kedro hooks that make every run read one completed, consistent run's outputs, one run at a time.

:class:`RunRecord` (registered in ``settings.py`` beside ``RunChecks``) feeds Kedro's
view of a run to :mod:`best_minibatch.services.run_manifest`:

* ``before_pipeline_run`` (first of all hooks): picks the version of every versioned
  input -- the last completed run's, or the run named with ``--load-versions
  run_manifest:<run id>`` -- and pins it in the catalog; pins every versioned output to
  the run's own version, so a node reads exactly what this run saved, never a newer
  file of a run beside it. Refuses with :class:`~best_minibatch.services.run_manifest.RunInputsError`
  when the inputs do not belong together or to this run's parameters.
* ``before_pipeline_run`` of :attr:`RunRecord.lock_hook` (last of all hooks, once every
  check has passed): takes the data folder's lock, refusing with
  :class:`~best_minibatch.services.run_manifest.RunLockedError` while another run holds it, and
  writes the manifest ``running``.
* ``after_pipeline_run`` / ``on_pipeline_error``: the manifest becomes ``completed``
  (with the state it leaves) or ``failed`` (with the error); the lock is released.

Where manifests live is the catalog entry ``run_manifest`` (``conf/base/catalog.yml``);
the lock is the file ``run.lock`` beside it. See docs/data_flow.md ("Which versions a
run reads").
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.io.core import AbstractVersionedDataset, Version
from kedro.pipeline import Pipeline

from best_minibatch.kedro_glue.datasets import OptionalDataset
from best_minibatch.services import run_manifest as rm

logger = logging.getLogger(__name__)

LEFT_OUT = ".left-out"  # suffix of a load version that does not exist: an optional input then reads as absent


@dataclass
class _Run:
    run_id: str
    command: str
    store: rm.ManifestStore
    lock: rm.RunLock
    graph: rm.RunGraph
    plan: rm.RunPlan
    parameters: dict[str, Any]
    env: str | None
    started: str
    saved: set[str] = field(default_factory=set)
    locked: bool = False


class RunRecord:
    """Pins each run's inputs to one completed run and its outputs to itself; records every run."""

    def __init__(self) -> None:
        self._runs: dict[str, _Run] = {}
        self.lock_hook = _LockHook(self)

    # -- before the run ------------------------------------------------------------------------

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Pipeline, catalog: Any) -> None:
        self._runs.clear()  # one run per session; a run refused by a later hook left its record here
        manifest_dataset = _manifest_dataset(catalog)
        if manifest_dataset is None:
            logger.warning("The catalog has no '%s' entry: runs are not recorded and each input is read at "
                           "its newest version.", rm.MANIFEST_DATASET)
            return
        run_id = run_params["run_id"]
        root = Path(str(manifest_dataset._filepath))
        store = rm.ManifestStore(root, root.name)
        graph = _graph(pipeline, catalog, Path(run_params.get("project_path") or "."))
        parameters = catalog.load("parameters") if "parameters" in catalog else {}
        run = _Run(run_id, _command(run_params), store, rm.RunLock(root.parent / "run.lock"), graph,
                   rm.RunPlan(run_id, None), parameters, run_params.get("env"), rm.now())
        run.plan = self._plan(run, run_params, catalog)
        self._runs[run_id] = run

    def _plan(self, run: _Run, run_params: dict[str, Any], catalog: Any) -> rm.RunPlan:
        """Choose and pin the version of every input and output, or refuse naming every problem."""
        user_versions = dict(run_params.get("load_versions") or {})
        base_run = user_versions.pop(rm.MANIFEST_DATASET, None)
        manifests = run.store.all()
        versions = _VersionsOnDisk(catalog)
        plan = rm.plan_run(run.run_id, run.graph, run.parameters, manifests, versions, user_versions, base_run)
        if plan.problems:
            raise rm.RunInputsError(plan.problems, _advice(plan, run.graph, run.parameters, manifests, versions,
                                                           run.store))
        for warning in plan.warnings:
            logger.warning(warning)
        for name, reason in plan.absent_optional.items():
            logger.warning("Optional input '%s' is left out of this run: %s", name, reason)
            _pin(catalog.get(name), f"{run.run_id}{LEFT_OUT}")
        for name, version in plan.pins().items():
            _pin(catalog.get(name), version)
        for name in run.graph.outputs() & set(run.graph.versioned):
            _pin(catalog.get(name), run.run_id)  # a node reads exactly what this run saved
        if plan.base is not None and plan.inputs:
            logger.info("Reading %d input(s) at the versions recorded by %s", len(plan.inputs),
                        plan.base.describe())
        return plan

    def _lock(self, run_params: dict[str, Any], catalog: Any) -> None:
        run = self._runs.get(run_params["run_id"])
        if run is None:
            return
        run.lock.acquire(rm.holder_record(run.run_id, run.command))
        try:
            # A run that completed while this one was being checked (it held the lock then) leaves a newer
            # state: plan again from it, under the lock, so this run carries it forward.
            last = run.store.last_completed()
            named = rm.MANIFEST_DATASET in (run_params.get("load_versions") or {})
            if not named and (last.run_id if last else None) != (run.plan.base.run_id if run.plan.base else None):
                run.plan = self._plan(run, run_params, catalog)
            run.store.write(self._manifest(run, rm.RUNNING))
        except BaseException:
            run.lock.release()
            raise
        run.locked = True

    # -- during and after the run ----------------------------------------------------------------

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node: Any) -> None:
        for run in self._runs.values():
            run.saved.add(dataset_name)

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], run_result: Any, pipeline: Pipeline,
                           catalog: Any) -> None:
        run = self._runs.pop(run_params["run_id"], None)
        if run is None or not run.locked:
            return
        try:
            outputs = rm.output_entries(run.run_id, run.graph, run.parameters, run.plan, run.saved)
            manifest = self._manifest(run, rm.COMPLETED)
            manifest.datasets, manifest.runs = rm.completed_state(run.run_id, run.command, run.parameters,
                                                                  run.plan, outputs)
            path = run.store.write(manifest)
            logger.info("Run %s completed; its manifest: %s", run.run_id, path)
        finally:
            run.lock.release()

    @hook_impl
    def on_pipeline_error(self, error: Exception, run_params: dict[str, Any], pipeline: Pipeline,
                          catalog: Any) -> None:
        run = self._runs.pop(run_params["run_id"], None)
        if run is None or not run.locked:
            return
        try:
            manifest = self._manifest(run, rm.FAILED)
            manifest.error = f"{type(error).__name__}: {error}"
            run.store.write(manifest)
        finally:
            run.lock.release()

    def _manifest(self, run: _Run, status: str) -> rm.Manifest:
        return rm.Manifest(
            run_id=run.run_id, status=status, command=run.command, pid=os.getpid(), host=socket.gethostname(),
            env=run.env, started=run.started,
            finished=None if status == rm.RUNNING else rm.now(),
            base_run=run.plan.base.run_id if run.plan.base else None,
            parameters=json.loads(json.dumps(run.parameters, default=str)),
            inputs=run.plan.pins(), outputs=sorted(run.saved & set(run.graph.versioned)),
        )


class _LockHook:
    """The lock is taken last, after every check of every hook has passed."""

    def __init__(self, record: RunRecord) -> None:
        self._record = record

    @hook_impl(trylast=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Pipeline, catalog: Any) -> None:
        self._record._lock(run_params, catalog)


# --------------------------------------------------------------------------- Kedro -> run_manifest


def _manifest_dataset(catalog: Any) -> AbstractVersionedDataset | None:
    if rm.MANIFEST_DATASET not in catalog:
        return None
    dataset = catalog.get(rm.MANIFEST_DATASET)
    return dataset if isinstance(dataset, AbstractVersionedDataset) and dataset._version is not None else None


def _versioned(dataset: Any) -> AbstractVersionedDataset | None:
    """The versioned dataset behind a catalog entry (an OptionalDataset's inner one), or None."""
    if isinstance(dataset, OptionalDataset):
        dataset = dataset._dataset
    if isinstance(dataset, AbstractVersionedDataset) and dataset._version is not None:
        return dataset
    return None


def _graph(pipeline: Pipeline, catalog: Any, project: Path) -> rm.RunGraph:
    nodes = [rm.NodeSpec(node.name, tuple(node.inputs), tuple(node.outputs)) for node in pipeline.nodes]
    versioned = {}
    for name in sorted({n for node in nodes for n in (*node.inputs, *node.outputs)}):
        if name == "parameters" or name.startswith("params:") or name not in catalog:
            continue
        dataset = catalog.get(name)
        inner = _versioned(dataset)
        if inner is None:
            continue
        path = PurePosixPath(str(inner._filepath))
        try:
            path = path.relative_to(PurePosixPath(project.resolve().as_posix()))
        except ValueError:
            pass
        versioned[name] = rm.DatasetSpec(name, str(path), optional=isinstance(dataset, OptionalDataset))
    return rm.RunGraph(nodes, versioned)


class _VersionsOnDisk:
    """A dataset's versions on disk, newest first (cached: planning asks several times)."""

    def __init__(self, catalog: Any) -> None:
        self._catalog = catalog
        self._cache: dict[str, list[str]] = {}

    def __call__(self, name: str) -> list[str]:
        if name not in self._cache:
            dataset = _versioned(self._catalog.get(name))
            try:
                paths = dataset._get_versions() if dataset is not None else []
            except Exception:  # unreadable folder: as if empty; the run checks name a missing input
                paths = []
            self._cache[name] = [PurePath(p).parent.name for p in paths]
        return self._cache[name]


def _pin(dataset: Any, load_version: str) -> None:
    """Load ``dataset`` (an OptionalDataset's inner one) at ``load_version``; its save version stays the run's."""
    inner = _versioned(dataset)
    if inner is None:
        return
    inner._version = Version(load_version, inner._version.save)
    inner._clear_version_cache()


def _command(run_params: dict[str, Any]) -> str:
    """The command line of this run: the real one under the CLI, else the equivalent ``kedro run``."""
    if sys.argv and Path(sys.argv[0]).name == "kedro":
        return shlex.join(["kedro", *sys.argv[1:]])
    parts = ["kedro", "run"]
    if run_params.get("env"):
        parts.append(f"--env={run_params['env']}")
    for option, key in (("--pipelines", "pipeline_names"), ("--namespaces", "namespaces"), ("--nodes", "node_names"),
                        ("--from-nodes", "from_nodes"), ("--to-nodes", "to_nodes"), ("--tags", "tags")):
        if run_params.get(key):
            parts.append(f"{option}={','.join(run_params[key])}")
    flat = _flatten(run_params.get("runtime_params") or {})
    if flat:
        parts.append("--params=" + ",".join(f"{k}={v}" for k, v in flat))
    if run_params.get("load_versions"):
        parts.append("--load-versions=" + ",".join(f"{k}:{v}" for k, v in run_params["load_versions"].items()))
    return shlex.join(parts)


def _flatten(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    flat = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.extend(_flatten(value, path + "."))
        else:
            flat.append((path, value if isinstance(value, (str, int, float, bool)) else json.dumps(value)))
    return flat


def _pipelines_writing(names: set[str]) -> list[str]:
    """Registered pipelines (not ``__default__``) that write any of ``names``, in registry order."""
    from kedro.framework.project import pipelines

    try:
        pipelines.set_requested(None)  # a run loads only the pipelines it asks for; this one stops anyway
        return [name for name in pipelines if name != "__default__" and pipelines[name].all_outputs() & names]
    except Exception:  # no configured project (a session outside the CLI without bootstrap)
        return []


def _advice(plan: rm.RunPlan, graph: rm.RunGraph, parameters: dict[str, Any], manifests: dict[str, rm.Manifest],
            versions: _VersionsOnDisk, store: rm.ManifestStore) -> str:
    lines = []
    if plan.base is not None:
        lines.append(f"Its inputs were taken from the last completed run in this data folder, {plan.base.describe()}"
                     f" (manifest: {store.path(plan.base.run_id)}).")
    elif not any(m.status == rm.COMPLETED for m in manifests.values()):
        lines.append("No run has completed in this data folder yet.")
    lines.append("To fix it, either:")
    makers = _pipelines_writing(plan.problem_inputs)
    if makers:
        lines.append(f"  * make the inputs with this run's parameters: include {', '.join(makers)} in this run "
                     f"(`kedro run --pipelines={','.join(makers)},...`; plain `kedro run` makes everything but "
                     "batch_selection);")
    else:
        lines.append("  * make the inputs with this run's parameters: include the pipelines that write them in this "
                     "run (plain `kedro run` makes everything but batch_selection);")
    conflicts = plan.parameter_conflicts
    if conflicts and all(isinstance(v, (str, int, float, bool)) for v in conflicts.values()):
        settings = ",".join(f"{k}={v}" for k, v in sorted(conflicts.items()))
        lines.append(f"  * or run with the parameters the inputs were made with: --params {settings};")
    matching = rm.matching_completed_runs(graph, parameters, manifests, versions,
                                          exclude=plan.base.run_id if plan.base else None)
    if matching:
        run = manifests[matching[0]]
        lines.append(f"  * or read the outputs of an earlier completed run that fit this run's parameters, "
                     f"{run.describe()}: add --load-versions {rm.MANIFEST_DATASET}:{run.run_id}.")
    return "\n".join(lines)
