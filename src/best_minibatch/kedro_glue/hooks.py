"""Kedro hooks: every parameter and input of a run is checked before its first node runs.

A mistake in a parameter of a late pipeline (a typo in ``gradient_training``, a
batch size larger than the training set) would otherwise surface hours into a run,
after earlier pipelines have written their outputs. :class:`RunChecks` runs the
checks of :mod:`best_minibatch.kedro_glue.run_checks` on the parameters the run's nodes read,
and checks that every input the run does not make itself already exists (Kedro
would only fail when it reaches the node that loads it). Registered in
``settings.py``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.pipeline import Pipeline

from best_minibatch.kedro_glue import run_checks

logger = logging.getLogger(__name__)

TRAINING_NODE = "train_with_gradient_probe"
# Parameter sections whose checks need the number of training images.
_NEED_TRAIN_COUNT = {"sort_batches", "gradient_training", "batch_selection", "distance_analysis"}


class RunChecks:
    """``before_pipeline_run``: parameters and inputs of the run, all checked; nothing is written."""

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Pipeline, catalog: Any) -> None:
        check_pipeline_run(pipeline, catalog)


class ProjectRoot:
    """Every run works in the project's root folder, wherever ``kedro`` was started.

    Kedro makes the catalog's relative paths absolute against the project root, but
    parameters that are paths (``gradient_training.checkpoint_dir``,
    ``ingest_cifar.source.path``, ...) are read by the nodes against the working
    directory: a run started in ``conf/`` used to put its checkpoints under
    ``conf/data/`` and its gradients under ``data/``. Before any other
    ``before_pipeline_run`` hook (registered last, ``tryfirst``) the working directory
    becomes the project root; it is given back when the run ends, fails or is refused.
    """

    def __init__(self) -> None:
        self._root: Path | None = None
        self._started_in: Path | None = None

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        self._root = Path(context.project_path).resolve()

    @hook_impl(hookwrapper=True, tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Pipeline, catalog: Any):
        here = Path.cwd().resolve()
        if self._root is not None and here != self._root:
            logger.info("Working in the project root %s (kedro was started in %s): relative paths start there.",
                        self._root, here)
            self._started_in = here
            os.chdir(self._root)
        outcome = yield
        if outcome.excinfo is not None:  # refused by a check: no after_pipeline_run follows
            self._give_back()

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline: Pipeline, catalog: Any) -> None:
        self._give_back()

    @hook_impl
    def on_pipeline_error(self, error: Exception, run_params: dict[str, Any], pipeline: Pipeline,
                          catalog: Any) -> None:
        self._give_back()

    def _give_back(self) -> None:
        if self._started_in is not None:
            os.chdir(self._started_in)
            self._started_in = None


class RunLog:
    """Every session logs to ``<project>/logs/info.log``; the terminal leaves out per-dataset load/save lines.

    ``best_minibatch.services.logs.install``: Kedro's ``logging.yml`` admits no project classes, so the
    file handler and the terminal filter are added here, once per process.
    """

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        from best_minibatch.services import logs

        logs.install(context.project_path)


def check_pipeline_run(pipeline: Pipeline, catalog: Any) -> None:
    """Raise :class:`run_checks.RunCheckError` listing every problem of this run of ``pipeline``."""
    parameters = catalog.load("parameters") if catalog.get("parameters") is not None else {}
    sections = parameter_sections(pipeline, parameters)
    problems = (missing_input_problems(pipeline, catalog) + unreadable_input_problems(pipeline, catalog)
                + unwritable_folder_problems(pipeline, catalog))
    facts = run_checks.RunFacts(trained_orderings=trained_orderings(pipeline))
    if sections & _NEED_TRAIN_COUNT and not any(p.startswith("Input 'image_index'") for p in problems):
        facts.n_train = _training_image_count(pipeline, catalog, parameters)
    counted = set(facts.trained_orderings)
    if "distance_analysis" in sections:  # the claims need enough batches in every ordering it reads
        from best_minibatch.batches.orderings import all_orderings

        counted |= set(all_orderings())
    for ordering in sorted(counted):
        name = f"{ordering}.batch_assignments"
        if name not in pipeline.all_outputs() and _exists(catalog, name):
            batches = catalog.load(name)
            if len(batches):
                facts.num_batches[ordering] = int(batches["batch"].max()) + 1
    problems = run_checks.run_problems(parameters, sections, facts) + problems
    if problems:
        raise run_checks.RunCheckError(problems)
    logger.info("Run checks passed: parameters %s and %d input(s)", ", ".join(sorted(sections)) or "(none)",
                len(_data_inputs(pipeline)))


def parameter_sections(pipeline: Pipeline, parameters: dict[str, Any]) -> set[str]:
    """Top-level parameter keys the pipeline's nodes read through ``params:<key>...`` inputs.

    A node that takes ``parameters`` as a whole (the report, which only prints them)
    does not make every section's checks apply to the run.
    """
    return {name.removeprefix("params:").split(".")[0] for name in pipeline.inputs() if name.startswith("params:")}


def trained_orderings(pipeline: Pipeline) -> tuple[str, ...]:
    """Orderings (namespaces) whose gradient_training node is part of this run."""
    return tuple(sorted({node.namespace for node in pipeline.nodes
                         if node.namespace and node.name.endswith(f".{TRAINING_NODE}")}))


def _data_inputs(pipeline: Pipeline) -> list[str]:
    return sorted(n for n in pipeline.inputs() if n != "parameters" and not n.startswith("params:"))


def _exists(catalog: Any, name: str) -> bool:
    try:
        return catalog.get(name) is not None and catalog.exists(name)
    except Exception:  # a dataset whose existence cannot be checked is treated as absent
        return False


def missing_input_problems(pipeline: Pipeline, catalog: Any) -> list[str]:
    """A message for every input the run reads but neither makes nor finds."""
    from best_minibatch.kedro_glue.datasets import OptionalDataset

    problems = []
    for name in _data_inputs(pipeline):
        dataset = catalog.get(name)
        if isinstance(dataset, OptionalDataset) or _exists(catalog, name):
            continue  # an OptionalDataset reads as None until written
        where = getattr(dataset, "_filepath", None) or getattr(dataset, "_path", None)
        producers = _producers(name)
        if producers and where is None:
            fix = f"It lives only during a run: include node '{producers[0][1]}' in this run."
        elif producers:
            pipe, node_name = producers[0]
            namespace = name.split(".")[0] if "." in name else None
            command = f"kedro run --pipeline={pipe}" + (f" --namespaces={namespace}" if namespace else "")
            fix = (f"It is written by node '{node_name}' of pipeline '{pipe}': run `{command}` first, or "
                   f"include that pipeline in this run (`kedro run --pipelines={pipe},...`).")
        else:
            fix = "No registered pipeline writes it; check the catalog entry."
        kind = "is kept in memory only, so it" if where is None else f"('{where}')"
        problems.append(f"Input '{name}' {kind} does not exist yet. {fix}")
    return problems


def unreadable_input_problems(pipeline: Pipeline, catalog: Any) -> list[str]:
    """A message for every Parquet input the run reads (and does not make) whose file cannot be read.

    Only the footer is read (``pyarrow.parquet.read_metadata``): a truncated or damaged file fails
    there, before the run writes anything (it used to fail when its reader came, after other outputs).
    """
    import pyarrow.parquet as pq

    problems = []
    for name in _data_inputs(pipeline):
        try:
            dataset = catalog.get(name)
        except Exception:  # reported by missing_input_problems
            continue
        if type(dataset).__name__ != "ParquetDataset" or not _exists(catalog, name):
            continue
        try:
            path = dataset._get_load_path() if getattr(dataset, "_version", None) is not None else dataset._filepath
            pq.read_metadata(str(path))
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ...
            producers = _producers(name)
            fix = (f"Write it anew: run `kedro run --pipeline={producers[0][0]}` (or include that pipeline in this "
                   "run)" if producers else "Restore the file")
            problems.append(f"Input '{name}' cannot be read: '{path}' is not a readable Parquet file "
                            f"({str(error).splitlines()[0][:200]}). {fix}.")
    return problems


def unwritable_folder_problems(pipeline: Pipeline, catalog: Any) -> list[str]:
    """A message for every folder the run must write into (its outputs, the run manifest) that it cannot.

    Each output's nearest existing folder is checked with ``os.access`` (a read-only mount or a folder
    without write permission fails it), so the run is refused before it writes anything.
    """
    from best_minibatch.services.run_manifest import MANIFEST_DATASET

    blocked: dict[Path, list[str]] = {}
    for name in sorted(pipeline.all_outputs() | {MANIFEST_DATASET}):
        try:
            dataset = catalog.get(name)
        except Exception:  # a name no catalog entry or pattern matches: nothing to check
            continue
        where = getattr(dataset, "_filepath", None) or getattr(dataset, "_path", None)
        if where is None or "://" in str(where):
            continue  # in memory, or not a local file
        folder = Path(str(where))
        while not folder.exists() and folder.parent != folder:
            folder = folder.parent
        if not folder.is_dir():
            folder = folder.parent
        if not os.access(folder, os.W_OK):
            blocked.setdefault(folder, []).append(name)
    problems = []
    for folder, names in sorted(blocked.items()):
        reason = "is on a read-only file system" if _read_only_mount(folder) else "is not writable by this user"
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        problems.append(f"The run cannot write into '{folder}': it {reason}, and it must hold '{names[0]}'{more}. "
                        "Make the folder writable (remount it read-write, or change its owner or permissions), "
                        "or point the catalog at a writable folder in an environment (conf/<env>/catalog.yml).")
    return problems


def _read_only_mount(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _producers(name: str) -> list[tuple[str, str]]:
    """``(pipeline, node)`` of every registered pipeline that writes dataset ``name``."""
    from kedro.framework.project import pipelines

    try:
        # During a run Kedro loads only the pipelines asked for; this run stops anyway, so load all
        # (as Kedro does itself to suggest a pipeline name).
        pipelines.set_requested(None)
        registered = {pipe_name: pipelines[pipe_name] for pipe_name in sorted(pipelines)}
    except Exception:  # no configured project (e.g. a runner used on its own)
        return []
    return [(pipe_name, node.name) for pipe_name, pipe in registered.items() if pipe_name != "__default__"
            for node in pipe.nodes if name in node.outputs]


def _training_image_count(pipeline: Pipeline, catalog: Any, parameters: dict[str, Any]) -> int | None:
    """Training images the run will use: from the raw source when ingest runs too, else from ``image_index``."""
    if "image_index" in pipeline.all_outputs():
        try:
            return run_checks.count_training_images((parameters.get("ingest_cifar") or {}).get("source") or {})
        except Exception:  # reported by the ingest_cifar check
            return None
    if _exists(catalog, "image_index"):
        index = catalog.load("image_index")
        return int((index["split"] == "train").sum())
    return None
