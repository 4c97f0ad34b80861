"""Run manifests: every run reads the outputs of one completed, consistent run, and one run at a time.

Knows nothing of Kedro (the hooks in :mod:`best_minibatch.kedro_glue.run_hooks` feed it). The
project's tables are versioned: each ``kedro run`` saves under its own timestamp, the
run id. Without more, a later run loads the *newest* file of each dataset, which may
come from a run that failed half-way, from an exploratory run with other parameters,
or from a run still going on beside it. This module keeps a record instead:

* :class:`Manifest` -- one JSON file per run, ``<manifests>/<run id>/run_manifest.json``
  (the layout of a versioned Kedro dataset, so ``--load-versions run_manifest:<run id>``
  names one). A run writes it when it starts (``running``), and again when it ends
  (``completed`` or ``failed``, with the error). A completed run's manifest holds the
  *state*: for every dataset the version a consistent run would read, the run that
  made it, the parameters it depends on and the versions of every dataset it was
  made from (its lineage). The state is carried forward from run to run, so the last
  completed run's manifest describes everything on disk that belongs together.
* :func:`plan_run` -- before a run: which version of each input it reads (the last
  completed run's, or the run a user names), and every reason why those inputs do not
  belong together or do not match the run's own parameters (:class:`RunInputsError`).
* :class:`RunLock` -- one run at a time per data folder (``fcntl.flock``: the kernel
  drops the lock when its process ends, however it ends, so a killed run never blocks
  the next one).

Versions of a dataset that no run recorded (written by hand, by a notebook, or before
manifests existed) are read when no completed run has a version of that dataset; the
run then warns that their parameters cannot be checked.
"""

from __future__ import annotations

import fnmatch
import json
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

try:  # POSIX only; the project runs on Linux (and macOS)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

FORMAT = 1
MANIFEST_DATASET = "run_manifest"
COMPLETED, FAILED, RUNNING = "completed", "failed", "running"
ABSENT = "(absent)"  # how a parameter a run did not have is shown and compared

#: Parameters that change where or how fast a run works, never what it computes. A
#: difference in these between a run and its inputs is not a reason to refuse.
#: Patterns over dotted parameter paths (``fnmatch``).
NOT_AFFECTING_RESULTS = (
    "*.progress_bar",
    "gradient_training.expected_hours",    # a ceiling on the run's expected time, checked before it starts
    "gradient_training.run_name",          # a folder name; ``auto`` hashes the settings that matter
    "gradient_training.checkpoint_dir",
    "gradient_training.keep_checkpoints",
    "gradient_training.gradients_dir",
    "gradient_training.disk_cap_gb",
    "gradient_training.gradient_buffer",
    "gradient_training.gradient_buffer.*",  # memory or scratch files for the same numbers
    "batch_selection.oracle.memory_cap_gb",
    "ingest_cifar.source.download",
    "ingest_cifar.source.download_root",
    "score_metrics.perceptual.strict",     # whether a missing weights file fails or skips
    "score_metrics.perceptual.batch_size",
)

#: Parameters added after some runs were recorded, with the value that reproduces what every run did
#: before the parameter existed. A run recorded without one counts as having had this value, so its
#: outputs stay usable; any other value is a difference like any other.
VALUE_WHEN_ABSENT = {
    "training.probe_chunk": 0,  # 0: the sequential probe, the only one there was
}


class RunInputsError(ValueError):
    """The run's inputs do not come from one consistent completed run; raised before any work."""

    def __init__(self, problems: list[str], advice: str = "") -> None:
        self.problems = list(problems)
        listed = "\n".join(f"  - {problem}" for problem in self.problems)
        message = (f"The run was stopped before any work: its inputs do not come from one consistent, "
                   f"completed run. {len(self.problems)} problem(s) found.\n{listed}")
        super().__init__(message + (f"\n{advice}" if advice else ""))


class RunLockedError(RuntimeError):
    """Another run is using the same data folder."""


# --------------------------------------------------------------------------- parameters


def parameter_at(parameters: Mapping[str, Any], key: str) -> Any:
    """``parameters`` at a dotted ``key`` (``ingest_cifar.source``); ``KeyError`` when absent."""
    value: Any = parameters
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def _ignored(path: str) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in NOT_AFFECTING_RESULTS)


def parameter_differences(recorded: Any, current: Any, path: str) -> list[tuple[str, Any, Any]]:
    """Leaf-level ``(dotted path, recorded, current)`` differences that can change results."""
    if _ignored(path):
        return []
    if isinstance(recorded, Mapping) and isinstance(current, Mapping):
        differences = []
        for key in sorted(set(recorded) | set(current), key=str):
            sub = f"{path}.{key}"
            if _ignored(sub):
                continue
            if key not in recorded or key not in current:
                old, new = recorded.get(key, ABSENT), current.get(key, ABSENT)
                if not _same(_as_before(old, sub), _as_before(new, sub)):
                    differences.append((sub, old, new))
            else:
                differences.extend(parameter_differences(recorded[key], current[key], sub))
        return differences
    return [] if _same(_as_before(recorded, path), _as_before(current, path)) else [(path, recorded, current)]


def _as_before(value: Any, path: str) -> Any:
    """An absent parameter as the value that reproduces what runs did before it existed (``VALUE_WHEN_ABSENT``)."""
    return VALUE_WHEN_ABSENT.get(path, ABSENT) if value == ABSENT else value


def _same(a: Any, b: Any) -> bool:
    # JSON turns tuples into lists and keeps 1 and 1.0 apart only by type; compare as JSON does.
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str) or a == b


def _show(value: Any) -> str:
    return json.dumps(value, default=str) if not isinstance(value, str) else value


# --------------------------------------------------------------------------- manifests


@dataclass
class Entry:
    """One dataset's version in a run's state."""

    version: str
    run: str | None                      # the run that made it (None: no run recorded it)
    path: str = ""                       # file path relative to the project
    parameter_keys: list[str] = field(default_factory=list)   # parameter sections it depends on
    lineage: dict[str, str] = field(default_factory=dict)     # every dataset it was made from -> version

    @property
    def untracked(self) -> bool:
        return self.run is None

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "run": self.run, "path": self.path,
                "parameter_keys": sorted(self.parameter_keys), "lineage": dict(sorted(self.lineage.items()))}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Entry:
        return cls(data["version"], data.get("run"), data.get("path", ""), list(data.get("parameter_keys", [])),
                   dict(data.get("lineage", {})))


@dataclass
class Manifest:
    """What one run did; a completed run's ``datasets`` is the consistent state it leaves."""

    run_id: str
    status: str
    command: str = ""
    pid: int = 0
    host: str = ""
    env: str | None = None
    started: str = ""
    finished: str | None = None
    error: str | None = None
    base_run: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    datasets: dict[str, Entry] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)   # run id -> {"command", "parameters"}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "run_id": self.run_id, "status": self.status, "command": self.command,
            "pid": self.pid, "host": self.host, "env": self.env, "started": self.started,
            "finished": self.finished, "error": self.error, "base_run": self.base_run,
            "parameters": self.parameters, "inputs": dict(sorted(self.inputs.items())),
            "outputs": sorted(self.outputs),
            "datasets": {name: entry.to_json() for name, entry in sorted(self.datasets.items())},
            "runs": self.runs,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        return cls(
            run_id=data["run_id"], status=data["status"], command=data.get("command", ""),
            pid=int(data.get("pid", 0)), host=data.get("host", ""), env=data.get("env"),
            started=data.get("started", ""), finished=data.get("finished"), error=data.get("error"),
            base_run=data.get("base_run"), parameters=dict(data.get("parameters", {})),
            inputs=dict(data.get("inputs", {})), outputs=list(data.get("outputs", [])),
            datasets={name: Entry.from_json(e) for name, e in data.get("datasets", {}).items()},
            runs=dict(data.get("runs", {})),
        )

    def describe(self) -> str:
        """``run <id> (`<command>`)``, for messages."""
        return f"run {self.run_id}" + (f" (`{self.command}`)" if self.command else "")


def now() -> str:
    """The time as ISO 8601 in UTC to the microsecond: such strings sort in time order."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def completion_order(manifest: Manifest) -> tuple[str, str]:
    """Sort key of completed runs: when they finished. A run id is when a run *started*; a run that started
    first may finish after one started later (the later one took the lock first), and the last to finish
    read the other's state."""
    return (manifest.finished or "", manifest.run_id)


class ManifestStore:
    """The manifests of one data folder: ``<root>/<run id>/<file name>``, written atomically."""

    def __init__(self, root: str | os.PathLike, file_name: str = "run_manifest.json") -> None:
        self.root = Path(root)
        self.file_name = file_name

    def path(self, run_id: str) -> Path:
        return self.root / run_id / self.file_name

    def write(self, manifest: Manifest) -> Path:
        path = self.path(manifest.run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(manifest.to_json(), handle, indent=1, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        return path

    def read(self, run_id: str) -> Manifest | None:
        path = self.path(run_id)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError(f"it holds a JSON {type(data).__name__}, not an object")
            return Manifest.from_json(data)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AttributeError) as error:  # valid JSON of the wrong shape too
            raise RunInputsError([(f"Run manifest '{path}' is damaged ({error}). Move it aside (the run it "
                                   "describes is then treated as unrecorded).")]) from error

    def run_ids(self) -> list[str]:
        """Every run with a manifest, oldest first (run ids are timestamps)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / self.file_name).is_file())

    def all(self) -> dict[str, Manifest]:
        manifests = {}
        for run_id in self.run_ids():
            manifest = self.read(run_id)
            if manifest is not None:
                manifests[run_id] = manifest
        return manifests

    def last_completed(self, manifests: Mapping[str, Manifest] | None = None) -> Manifest | None:
        manifests = self.all() if manifests is None else manifests
        completed = [m for m in manifests.values() if m.status == COMPLETED]
        return max(completed, key=completion_order) if completed else None


# --------------------------------------------------------------------------- the run's graph


@dataclass(frozen=True)
class NodeSpec:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class DatasetSpec:
    """A versioned dataset the run reads or writes. ``optional``: read as absent when missing."""

    name: str
    path: str
    optional: bool = False


@dataclass
class RunGraph:
    """The nodes of the run (after every filter) and the versioned datasets among their inputs and outputs."""

    nodes: list[NodeSpec]
    versioned: dict[str, DatasetSpec]

    def outputs(self) -> set[str]:
        return {o for n in self.nodes for o in n.outputs}

    def external_inputs(self) -> list[str]:
        made = self.outputs()
        return sorted({i for n in self.nodes for i in n.inputs} - made)

    def ordered(self) -> list[NodeSpec]:
        """Nodes so that every node comes after the nodes whose outputs it reads."""
        producers = {o: n for n in self.nodes for o in n.outputs}
        done: set[str] = set()
        ordered: list[NodeSpec] = []

        def visit(node: NodeSpec, trail: tuple[str, ...] = ()) -> None:
            if node.name in done or node.name in trail:
                return
            for name in node.inputs:
                if name in producers:
                    visit(producers[name], trail + (node.name,))
            done.add(node.name)
            ordered.append(node)

        for node in self.nodes:
            visit(node)
        return ordered


def parameter_key(name: str, parameters: Mapping[str, Any]) -> list[str]:
    """The parameter keys a node input stands for: ``params:a.b`` -> ``a.b``; ``parameters`` -> every section."""
    if name == "parameters":
        return sorted(parameters)
    if name.startswith("params:"):
        return [name.removeprefix("params:")]
    return []


# --------------------------------------------------------------------------- planning a run


@dataclass
class RunPlan:
    """What a run reads and why it may not: the outcome of :func:`plan_run`."""

    run_id: str
    base: Manifest | None
    inputs: dict[str, Entry] = field(default_factory=dict)      # versioned inputs and the version read
    absent_optional: dict[str, str] = field(default_factory=dict)  # optional input -> why it reads as absent
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    parameter_conflicts: dict[str, Any] = field(default_factory=dict)  # dotted path -> the inputs' value
    problem_inputs: set[str] = field(default_factory=set)  # the inputs the problems are about

    def pins(self) -> dict[str, str]:
        """Input name -> version to load."""
        return {name: entry.version for name, entry in self.inputs.items()}


def plan_run(
    run_id: str,
    graph: RunGraph,
    parameters: Mapping[str, Any],
    manifests: Mapping[str, Manifest],
    versions_on_disk: Callable[[str], list[str]],
    user_versions: Mapping[str, str] | None = None,
    base_run: str | None = None,
) -> RunPlan:
    """Choose the version of every versioned input of ``graph`` and list what does not fit.

    ``manifests``: every recorded run of the data folder. ``base_run``: the run a user
    named (``--load-versions run_manifest:<id>``); by default the last completed run.
    ``user_versions``: other versions pinned by the user, respected as given (still checked).
    ``versions_on_disk(name)``: a dataset's versions on disk, newest first.
    """
    user_versions = dict(user_versions or {})
    completed = [m for m in manifests.values() if m.status == COMPLETED]
    if base_run is not None:
        base = manifests.get(base_run)
        plan = RunPlan(run_id, base)
        if base is None:
            known = ", ".join(m.run_id for m in sorted(completed, key=completion_order)[-5:]) or "none"
            plan.problems.append(f"--load-versions {MANIFEST_DATASET}:{base_run} names no recorded run "
                                 f"(the last completed runs: {known}).")
            return plan
        if base.status != COMPLETED:
            plan.problems.append(f"--load-versions {MANIFEST_DATASET}:{base_run} names {base.describe()}, which "
                                 f"{_status_phrase(base)}; name a completed run.")
            return plan
    else:
        base = max(completed, key=completion_order) if completed else None
        plan = RunPlan(run_id, base)
    state = base.datasets if base else {}
    outputs = graph.outputs()

    for name in graph.external_inputs():
        spec = graph.versioned.get(name)
        if spec is None:
            continue  # parameters, in-memory or unversioned datasets
        entry, why_absent = _choose_version(name, spec, state, manifests, versions_on_disk, user_versions,
                                            base, plan)
        if entry is None:
            if why_absent and spec.optional:
                plan.absent_optional[name] = why_absent
            elif why_absent:
                plan.problems.append(why_absent)
                plan.problem_inputs.add(name)
            continue
        plan.inputs[name] = entry

    # Required inputs first, then the optional ones against them: an optional input that
    # does not fit is left out (with the reason), never a reason to refuse.
    required = {n: e for n, e in plan.inputs.items() if not graph.versioned[n].optional}
    optional = {n: e for n, e in plan.inputs.items() if graph.versioned[n].optional}
    plan.problems.extend(_mismatches(required, parameters, manifests, base, outputs, plan))
    for name, entry in optional.items():
        reasons = _mismatches({**required, name: entry}, parameters, manifests, base, outputs, None, only=name)
        if reasons:
            plan.absent_optional[name] = "; ".join(reasons)
            del plan.inputs[name]
    return plan


def _status_phrase(manifest: Manifest) -> str:
    if manifest.status == FAILED:
        return f"failed ({_first_line(manifest.error)})"
    if manifest.status == RUNNING:
        return f"did not finish (it was still running, or its process {manifest.pid} was killed)"
    return manifest.status


def _first_line(text: str | None, limit: int = 200) -> str:
    line = (text or "no error recorded").strip().splitlines()[0] if (text or "").strip() else "no error recorded"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _find_entry(name: str, version: str, manifests: Mapping[str, Manifest]) -> tuple[Entry, Manifest] | None:
    """The recorded entry of ``name`` at ``version``, from the newest completed manifest that holds it."""
    for manifest in sorted(manifests.values(), key=lambda m: m.run_id, reverse=True):
        entry = manifest.datasets.get(name)
        if manifest.status == COMPLETED and entry is not None and entry.version == version:
            return entry, manifest
    return None


def _choose_version(name, spec, state, manifests, versions_on_disk, user_versions, base, plan):
    """``(entry, None)`` for the version to read, or ``(None, why)`` when none fits."""
    on_disk = versions_on_disk(name)
    if name in user_versions:
        version = user_versions[name]
        found = _find_entry(name, version, manifests)
        if found:
            return found[0], None
        plan.warnings.append(f"'{name}' version {version} (named with --load-versions) was recorded by no completed "
                             "run: its parameters and lineage cannot be checked.")
        return Entry(version, None, spec.path), None
    entry = state.get(name) or _entry_by_path(spec, state)
    if entry is not None:
        if entry.version not in on_disk:
            return None, (f"'{name}' version {entry.version}, which {base.describe()} recorded, is missing from "
                          f"'{spec.path}'. Run the pipeline that writes it again, or name another completed run "
                          f"with --load-versions {MANIFEST_DATASET}:<run id>.")
        return entry, None
    if not on_disk:
        return None, None  # nothing to read; the run checks report a missing input
    newest = on_disk[0]
    writer = manifests.get(newest)
    if writer is not None and writer.status != COMPLETED:
        where = f" {base.describe()} has no version of it either." if base else " No run has completed here yet."
        return None, (f"'{name}': its newest version on disk, {newest}, was written by {writer.describe()}, which "
                      f"{_status_phrase(writer)}; no completed run wrote it.{where} "
                      f"Run the pipeline that writes '{name}' to completion first.")
    if writer is not None:  # a completed run wrote it, yet the last completed run's state does not hold it
        found = _find_entry(name, newest, manifests)
        if found:
            return found[0], None
    if spec.optional:
        return None, None  # an unrecorded optional input is left out: it cannot be checked
    plan.warnings.append(f"'{name}' version {newest} was written outside any recorded run (by hand, a notebook, or "
                         "before run manifests existed): it is read as it is, its parameters cannot be checked.")
    return Entry(newest, None, spec.path), None


def _entry_by_path(spec: DatasetSpec, state: Mapping[str, Entry]) -> Entry | None:
    """An entry of another name on the same file (an optional wrapper of a dataset)."""
    if not spec.path:
        return None
    matches = [e for e in state.values() if e.path == spec.path]
    return matches[0] if matches else None


def _recorded_parameters(run_id: str | None, manifests: Mapping[str, Manifest],
                         base: Manifest | None) -> Mapping[str, Any] | None:
    """The parameters of the run that made a dataset: from its own manifest, else as its successors carried them."""
    if run_id is None:
        return None
    if run_id in manifests:
        return manifests[run_id].parameters
    if base is not None and run_id in base.runs:
        return base.runs[run_id].get("parameters")
    return None


def _mismatches(inputs: Mapping[str, Entry], parameters, manifests, base, outputs, plan, only=None) -> list[str]:
    """Why ``inputs`` do not belong together or to this run. ``only``: report problems that involve it only."""
    problems: list[str] = []
    # 1. The parameters each input was made with, against this run's own.
    by_difference: dict[tuple[str, str, str, str], list[str]] = {}
    for name, entry in sorted(inputs.items()):
        recorded_parameters = _recorded_parameters(entry.run, manifests, base)
        if (only is not None and name != only) or recorded_parameters is None:
            continue
        for key in entry.parameter_keys:
            recorded = _at_or_absent(recorded_parameters, key)
            current = _at_or_absent(parameters, key)
            for path, old, new in parameter_differences(recorded, current, key):
                by_difference.setdefault((path, _show(old), _show(new), entry.run or ""), []).append(name)
                if plan is not None:
                    plan.parameter_conflicts.setdefault(path, old)
                    plan.problem_inputs.add(name)
    for (path, old, new, run), names in sorted(by_difference.items()):
        maker = manifests.get(run)
        made_by = maker.describe() if maker else f"run {run}"
        problems.append(f"{path} is {old} in {made_by}, which made {_names(names)}; this run's parameters "
                        f"say {new}.")
    # 2. Lineage: each dataset the inputs were made from is one version, and not one this run writes anew.
    versions_of: dict[str, dict[str, set[str]]] = {}
    rewritten: dict[tuple[str, str], set[str]] = {}
    for name, entry in sorted(inputs.items()):
        for ancestor, version in [(name, entry.version), *sorted(entry.lineage.items())]:
            if ancestor in outputs and ancestor != name:
                rewritten.setdefault((ancestor, version), set()).add(name)
            else:
                versions_of.setdefault(ancestor, {}).setdefault(version, set()).add(name)
    for ancestor, versions in sorted(versions_of.items()):
        involved = set().union(*versions.values())
        if len(versions) < 2 or (only is not None and only not in involved):
            continue
        if plan is not None:
            plan.problem_inputs.update(involved)
        parts = "; ".join(f"version {version} ({_use(ancestor, readers)})"
                          for version, readers in sorted(versions.items()))
        problems.append(f"'{ancestor}' is not one version across this run's inputs: {parts}. They come from "
                        "different runs and do not belong together.")
    for (ancestor, version), names in sorted(rewritten.items()):
        if only is not None and only not in names:
            continue
        if plan is not None:
            plan.problem_inputs.update(names)
        verb = "was" if len(names) == 1 else "were"
        problems.append(f"{_names(names)} {verb} made from '{ancestor}' version {version}, which this run writes "
                        f"anew: include the pipeline that makes {_names(names)} in this run.")
    return problems


def _use(dataset: str, readers: set[str]) -> str:
    """How a version of ``dataset`` enters a run: read itself, or what other inputs were made from."""
    made = readers - {dataset}
    uses = ["read as an input"] if dataset in readers else []
    if made:
        uses.append(f"what {_names(made)} {'was' if len(made) == 1 else 'were'} made from")
    return " and ".join(uses)


def _at_or_absent(parameters: Mapping[str, Any], key: str) -> Any:
    try:
        return parameter_at(parameters, key)
    except KeyError:
        return ABSENT


def _names(names: Iterable[str], limit: int = 6) -> str:
    names = sorted(set(names))
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def matching_completed_runs(
    graph: RunGraph,
    parameters: Mapping[str, Any],
    manifests: Mapping[str, Manifest],
    versions_on_disk: Callable[[str], list[str]],
    exclude: str | None = None,
) -> list[str]:
    """Completed runs, last completed first, whose state gives this run consistent inputs that match its parameters."""
    found = []
    for manifest in sorted(manifests.values(), key=completion_order, reverse=True):
        if manifest.status != COMPLETED or manifest.run_id == exclude:
            continue
        trial = plan_run("(trial)", graph, parameters, manifests, versions_on_disk, base_run=manifest.run_id)
        if not trial.problems and not trial.warnings:
            found.append(manifest.run_id)
    return found


# --------------------------------------------------------------------------- recording a run


def output_entries(
    run_id: str, graph: RunGraph, parameters: Mapping[str, Any], plan: RunPlan, saved: Iterable[str]
) -> dict[str, Entry]:
    """The state entries of the versioned outputs this run saved: parameters and lineage traced through its nodes."""
    saved = set(saved)
    keys: dict[str, set[str]] = {}
    lineage: dict[str, dict[str, str]] = {}
    for name, entry in plan.inputs.items():
        keys[name] = set(entry.parameter_keys)
        lineage[name] = {**entry.lineage, name: entry.version}
    entries: dict[str, Entry] = {}
    for node in graph.ordered():
        node_keys: set[str] = set()
        node_lineage: dict[str, str] = {}
        for name in node.inputs:
            node_keys.update(parameter_key(name, parameters))
            node_keys.update(keys.get(name, ()))
            node_lineage.update(lineage.get(name, {}))
        for name in node.outputs:
            keys[name] = set(node_keys)
            lineage[name] = dict(node_lineage)
            if name in graph.versioned:
                lineage[name][name] = run_id  # what a reader of this output was made from
            if name in graph.versioned and name in saved:
                entries[name] = Entry(run_id, run_id, graph.versioned[name].path, sorted(node_keys),
                                      dict(node_lineage))
    return entries


def completed_state(
    run_id: str, command: str, parameters: Mapping[str, Any], plan: RunPlan, outputs: Mapping[str, Entry]
) -> tuple[dict[str, Entry], dict[str, dict[str, Any]]]:
    """The state a completed run leaves: its base's, with what it read and what it made."""
    state = dict(plan.base.datasets) if plan.base else {}
    state.update(plan.inputs)
    state.update(outputs)
    known_runs = dict(plan.base.runs) if plan.base else {}
    known_runs[run_id] = {"command": command, "parameters": json.loads(json.dumps(parameters, default=str))}
    runs = {r: known_runs[r] for r in sorted({e.run for e in state.values() if e.run}) if r in known_runs}
    return state, runs


# --------------------------------------------------------------------------- one run at a time

_HELD: dict[str, RunLock] = {}


class RunLock:
    """An exclusive lock on a data folder, held by one run; the kernel drops it when the process ends."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._handle = None

    def acquire(self, holder: Mapping[str, Any]) -> None:
        """Take the lock or raise :class:`RunLockedError` naming the run that holds it."""
        if fcntl is None:  # pragma: no cover - Windows
            return
        key = str(self.path.resolve())
        stale = _HELD.pop(key, None)
        if stale is not None:  # a run in this same process that never finished (interrupted in a notebook)
            stale.release()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            text = handle.read()
            handle.close()
            raise RunLockedError(_locked_message(self.path, text)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(dict(holder), default=str))
        handle.flush()
        self._handle = handle
        _HELD[key] = self

    def release(self) -> None:
        if self._handle is None:
            return
        try:
            self._handle.seek(0)
            self._handle.truncate()  # the file stays; it says nothing once no run holds it
            self._handle.flush()
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
        finally:
            self._handle.close()
            self._handle = None
            _HELD.pop(str(self.path.resolve()), None)


def _locked_message(path: Path, text: str) -> str:
    try:
        holder = json.loads(text) if text.strip() else {}
    except ValueError:
        holder = {}
    if not isinstance(holder, dict):  # valid JSON, but not what a run writes: say nothing of the holder
        holder = {}
    data_folder = path.parent.parent if path.parent.name == "runs" else path.parent
    who = (f"PID {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}: "
           f"`{holder.get('command', '?')}`" if holder else "a run that is still starting")
    return (f"Another kedro run is using the data folder '{data_folder}': {who}. Two runs in one data folder "
            f"would read each other's outputs, so this one was stopped before any work (lock: '{path}'). "
            "Wait until it ends, or run the second in a separate data folder: a copy of the project (for "
            "instance `git worktree add ../second-run`, or a copy of the folder), or an environment "
            "(conf/<env>/catalog.yml) that points every dataset and run_manifest elsewhere. A run that was "
            "killed holds no lock: the lock ends with its process.")


def holder_record(run_id: str, command: str) -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id, "command": command,
            "started": now()}
