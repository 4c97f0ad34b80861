"""Every parameter a run reads, checked before the run starts (so before anything is written).

Knows nothing of Kedro. :func:`run_problems` takes the run's parameters, the
parameter sections its nodes read, and what is already known about the data, and
builds each section's typed config in the one style of :mod:`best_minibatch.config`
(each validates itself when built, and :func:`config.every_problem` lists every bad
key of a section at once), adding the checks that span sections:

* ``ingest_cifar``: every key (``cifar.SourceConfig``), the raw source exists and
  holds training images;
* ``score_metrics``: metric names and every metric's options (``scoring.all_metric_options``,
  each metric's registered options reader), a strict metric that cannot run,
  ``device: cuda`` without CUDA;
* ``sort_batches``: every key (``batching.SortBatchesConfig``), ``batch_size`` fits the
  training set;
* ``training``: the shared recipe (``training.recipe.TrainingRecipe``), its model
  built once, and its batch size equal to ``sort_batches.batch_size``;
* ``gradient_training``: every setting (``training.TrainingConfig``), the model's
  name and options (by building it once), the disk cap against the kept epochs'
  gradients, and an explicit ``run_name`` whose folders hold another run;
* ``distance_analysis``: every key (``statistics.AnalysisConfig``) and that
  ``null_ordering`` is a metric;
* ``visualize``: every key (``report.VisualizeConfig``);
* ``batch_selection``: every setting (``selection.SelectionConfig``), its orderings
  and its batch size against the training set.

Every problem found is reported at once in one :class:`RunCheckError`, each
message naming the parameter and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from best_minibatch.config import despite_bad_keys, every_problem

logger = logging.getLogger(__name__)


class RunCheckError(ValueError):
    """Parameters or inputs that cannot work; raised before the first node runs."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        listed = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"The run was stopped before any work: {len(self.problems)} problem(s) found.\n{listed}")


@dataclass
class RunFacts:
    """What is known about the run's data before it starts.

    ``n_train``: training images the run will use (``None``: not known yet).
    ``num_batches``: per ordering, the batches of existing batch assignments that
    the run reads (orderings whose batches the run itself makes are absent).
    ``trained_orderings``: the orderings whose ``gradient_training`` runs.
    """

    n_train: int | None = None
    num_batches: dict[str, int] = field(default_factory=dict)
    trained_orderings: tuple[str, ...] = ()


def run_problems(parameters: Mapping[str, Any], sections: Iterable[str], facts: RunFacts) -> list[str]:
    """Every problem of the run's parameter sections, as messages (empty: the run may start)."""
    problems = []
    for section in _ORDER:
        if section not in set(sections):
            continue
        if section not in parameters:
            problems.append(f"Parameters '{section}' are missing: the run reads them. Add "
                            f"conf/base/parameters_{section}.yml (or restore its top-level key '{section}').")
            continue
        try:
            _CHECKS[section](parameters[section], parameters, facts)
        except (ValueError, RuntimeError, OSError) as error:
            # Sections that read the shared recipe report its problem too: list each problem once.
            problems.extend(p for p in str(error).split("\n  - ") if p not in problems)
    return problems


def build_reporting_every_key(build: Callable[[Any], Any], params: Any, path: str,
                              also: list[str] | None = None) -> Any:
    """``build(params)``, or a ValueError listing every problem of the section (``config.every_problem``)."""
    return every_problem(build, params, path, also or ())


# --------------------------------------------------------------------------- per pipeline


def _check_ingest(params: Mapping[str, Any], parameters: Mapping[str, Any], facts: RunFacts) -> None:
    from best_minibatch.data.cifar import SourceConfig

    build_reporting_every_key(SourceConfig.from_params, params, "ingest_cifar")
    count_training_images(params.get("source") or {})


def count_training_images(source: Mapping[str, Any]) -> int:
    """Training images in the raw source named by ``ingest_cifar.source`` (checked: ``cifar.SourceConfig``).

    Reads the archive's listing (or the release's label lists), not the images. A source still
    to be downloaded (``download: true``, path absent) counts the release the download fetches,
    so a run too large for the machine is refused before it downloads anything.
    """
    from best_minibatch.data import cifar

    config = cifar.SourceConfig.from_params({"source": source})
    path = Path(config.path)
    if not path.exists():
        if config.download:
            return cifar.CIFAR10_TRAIN_IMAGES
        raise ValueError(
            f"Parameter ingest_cifar.source.path: raw dataset not found: '{path}'. Set it to an existing folder, "
            "zip, or cifar-10-python.tar.gz (relative paths start at the project root), or set "
            "ingest_cifar.source.download: true."
        )
    return cifar.count_training_images(path, config.layout)


def _check_score_metrics(params: Mapping[str, Any], parameters: Mapping[str, Any], facts: RunFacts) -> None:
    from best_minibatch.metrics.scoring import METRICS, all_metric_options, metric_availability, metric_options
    from best_minibatch.training.runtime import resolve_device

    problems: list[str] = []
    try:
        build_reporting_every_key(all_metric_options, params, "score_metrics")
    except ValueError as error:  # every bad option of every metric
        problems.extend(str(error).split("\n  - "))
    for name, metric in METRICS.items():
        try:
            unavailable = metric_availability(name, params)  # raises for a strict metric that cannot run
            options = metric_options(name, params)
            if metric.unavailable_reason is not None and unavailable is None and "device" in options:
                try:
                    resolve_device(options["device"])
                except ValueError as error:
                    raise ValueError(f"Parameter score_metrics.{name}.device: {error}. Use cpu or auto.") from error
        except (ValueError, RuntimeError) as error:
            if str(error) not in problems:  # a bad option, already listed
                problems.append(str(error))
    if problems:
        raise ValueError("\n  - ".join(problems))


def _check_sort_batches(params: Mapping[str, Any], parameters: Mapping[str, Any], facts: RunFacts) -> None:
    from best_minibatch.batches.batching import SortBatchesConfig

    config = build_reporting_every_key(SortBatchesConfig.from_params, params, "sort_batches")
    batch_size = config.batch_size
    from best_minibatch.gradient_training.config import TrainingConfig

    training = despite_bad_keys(lambda p: TrainingConfig.from_params(p, parameters.get("training")),
                                parameters.get("gradient_training"), "gradient_training")
    seeds = training.seeds if training is not None else ()
    if config.control_batchings > 1 and config.control_batchings < len(seeds):
        raise ValueError(
            f"Parameter sort_batches.control_batchings={config.control_batchings} is less than the "
            f"{len(seeds)} gradient_training.seeds: each seed trains its own random batching. Set it to at least "
            f"{len(seeds)}.")
    if facts.n_train is not None and batch_size > facts.n_train:
        raise ValueError(
            f"Parameter sort_batches.batch_size={batch_size} exceeds the {facts.n_train} training images, so not "
            "one full batch fits. Lower sort_batches.batch_size (the paper uses 256 for 50,000 images)."
        )


def _check_training(params: Mapping[str, Any], parameters: Mapping[str, Any], facts: RunFacts) -> None:
    from best_minibatch.gradient_training import named_model_factory
    from best_minibatch.training.recipe import TrainingRecipe

    recipe = TrainingRecipe.from_params(params)
    named_model_factory(recipe)  # a bad model option fails here, not hours later
    _check_batch_size_rule(recipe.batch_size, "training.batch_size", parameters)


def _check_batch_size_rule(batch_size: int | None, key: str, parameters: Mapping[str, Any]) -> None:
    """Both experiments train on sort_batches' batch size: gradient_training probes its batches and
    batch_selection's "learned" policy reads distances measured at that size."""
    sort_size = _sort_batch_size(parameters)
    if batch_size is not None and sort_size is not None and batch_size != sort_size:
        raise ValueError(f"Parameter {key}={batch_size} differs from sort_batches.batch_size={sort_size}: every "
                         "experiment trains on the batch size sort_batches cuts. Set it to null (follow "
                         "sort_batches) or change sort_batches.batch_size.")


def _check_gradient_training(params: Mapping[str, Any], parameters: Mapping[str, Any], facts: RunFacts) -> None:
    from best_minibatch.batches.orderings import all_orderings
    from best_minibatch.gradient_training.checks import (  # the module's names at call time (tests patch them)
        check_buffer_memory,
        check_disk_cap,
        check_expected_time,
        check_null_batches,
        check_run_folder,
    )
    from best_minibatch.gradient_training.config import TrainingConfig, named_model_factory

    trace = params.get("trace_check") if isinstance(params, Mapping) else None
    unknown = [o for o in trace if o not in all_orderings()] if isinstance(trace, (list, tuple)) else []
    trace_problem = (f"Parameter gradient_training.trace_check: unknown orderings {unknown}. Use true, false or a list "
                     f"of {', '.join(all_orderings())}.") if unknown else None
    config = build_reporting_every_key(lambda p: TrainingConfig.from_params(p, parameters.get("training")), params,
                                       "gradient_training", [trace_problem] if trace_problem else [])
    _check_batch_size_rule(config.recipe.batch_size, "gradient_training.training.batch_size", parameters)
    model = named_model_factory(config)()
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    param_dtype = next(model.parameters()).dtype
    batch_size = _sort_batch_size(parameters)
    problems = []
    trained = _orderings_that_train(facts.trained_orderings, parameters)
    for ordering in trained:
        num_batches = facts.num_batches.get(ordering)
        if num_batches is None and facts.n_train is not None and batch_size is not None:
            num_batches = facts.n_train // batch_size  # the batches sort_batches will make in this run
        try:
            if num_batches:
                check_null_batches(config, num_batches)
                check_disk_cap(config, num_params, num_batches)
                check_buffer_memory(config, num_params, param_dtype, num_batches)
            check_run_folder(config, ordering, num_params, param_dtype)
        except (ValueError, RuntimeError) as error:
            if str(error) not in problems:
                problems.append(str(error))
    counts = [n for n in (facts.num_batches.get(o) or (facts.n_train // batch_size if facts.n_train and batch_size
                                                        else None) for o in trained) if n]
    if counts and not problems:
        try:
            images = batch_size if batch_size is not None else facts.n_train // max(counts)
            check_expected_time(config, max(counts), images, len(trained))
        except ValueError as error:
            problems.append(str(error))
    if problems:
        raise ValueError("\n  - ".join(problems))


def _orderings_that_train(orderings: Iterable[str], parameters: Mapping[str, Any]) -> tuple[str, ...]:
    """The orderings of this run that train: a stratified one is off with ``sort_batches.stratify: false``."""
    from best_minibatch.batches.orderings import ordering_of

    config = _sort_batches(parameters)
    return tuple(o for o in orderings if config is None or config.stratify or not ordering_of(o).stratified)


def _sort_batches(parameters: Mapping[str, Any]) -> Any:
    """The run's ``sort_batches`` config, its bad keys at their defaults (its own check reports them); None
    when it cannot be built (``batch_size`` bad or missing)."""
    from best_minibatch.batches.batching import SortBatchesConfig

    return despite_bad_keys(SortBatchesConfig.from_params, parameters.get("sort_batches"), "sort_batches")


def _sort_batch_size(parameters: Mapping[str, Any]) -> int | None:
    config = _sort_batches(parameters)
    return None if config is None else config.batch_size


def _check_distance_analysis(params: Mapping[str, Any], parameters: Mapping[str, Any], facts: RunFacts) -> None:
    from best_minibatch.analysis.statistics import AnalysisConfig
    from best_minibatch.metrics.scoring import METRICS

    config = build_reporting_every_key(AnalysisConfig.from_params, params, "distance_analysis")
    _check_enough_batches(parameters, facts)
    if config.null_ordering not in METRICS:
        raise ValueError(
            f"Parameter distance_analysis.null_ordering: unknown ordering {config.null_ordering!r}. Use one of "
            f"{', '.join(METRICS)} (random is the null control)."
        )


def _check_enough_batches(parameters: Mapping[str, Any], facts: RunFacts) -> None:
    """The claims compare groups of batches; too few batches would train for nothing and then fail."""
    from best_minibatch.analysis.statistics import minimum_batches

    needed = minimum_batches()
    batch_size = _sort_batch_size(parameters)
    counts = dict(facts.num_batches)
    if facts.n_train is not None and batch_size is not None:
        if batch_size <= facts.n_train:  # a batch larger than the training set is sort_batches' own error
            counts.setdefault("the orderings this run sorts", facts.n_train // batch_size)
    short = {name: count for name, count in counts.items() if count < needed}
    if short:
        name, count = next(iter(short.items()))
        given = (f"sort_batches.batch_size={batch_size} cuts the {facts.n_train} training images into {count} batches"
                 if facts.n_train is not None and name == "the orderings this run sorts"
                 else f"the existing batch assignments of '{name}' hold {count} batches")
        raise ValueError(
            f"Parameter sort_batches.batch_size: {given}, but distance_analysis needs at least {needed} per ordering "
            f"(its claims compare the outer 10% of the batches on each side with the rest). Lower "
            f"sort_batches.batch_size to at most {facts.n_train // needed if facts.n_train else 'N / ' + str(needed)}"
            f" (and rerun sort_batches)."
        )


def _check_visualize(params: Mapping[str, Any], parameters: Mapping[str, Any], facts: RunFacts) -> None:
    from best_minibatch.analysis.report import VisualizeConfig

    build_reporting_every_key(VisualizeConfig.from_params, params, "visualize")


def _check_batch_selection(params: Mapping[str, Any], parameters: Mapping[str, Any], facts: RunFacts) -> None:
    from best_minibatch.metrics.scoring import METRICS
    from best_minibatch.selection.experiment import SelectionConfig

    config = build_reporting_every_key(lambda p: SelectionConfig.from_params(
        p, parameters.get("training"), _sort_batch_size(parameters)), params, "batch_selection")
    _check_batch_size_rule(config.batch_size, "batch_selection.training.batch_size", parameters)
    for key, ordering in (("fixed_random.ordering", config.fixed_ordering),
                          ("learned.ordering", config.learned_ordering),
                          *((f"paper_advice.first_phase.{o}", o) for o in config.paper_first_phase),
                          *((f"paper_advice.later_phases.{o}", o) for o in config.paper_later_phases)):
        if ordering not in METRICS:
            raise ValueError(f"Parameter batch_selection.{key}: unknown ordering {ordering!r}. "
                             f"Use one of {', '.join(METRICS)}.")
    batch_size = config.batch_size
    if facts.n_train is not None and batch_size > facts.n_train:
        raise ValueError(f"Parameter batch_selection.training.batch_size={batch_size} exceeds the {facts.n_train} "
                         "training images, so not one full batch fits. Lower batch_selection.training.batch_size.")


_CHECKS = {
    "ingest_cifar": _check_ingest,
    "score_metrics": _check_score_metrics,
    "sort_batches": _check_sort_batches,
    "training": _check_training,
    "gradient_training": _check_gradient_training,
    "distance_analysis": _check_distance_analysis,
    "visualize": _check_visualize,
    "batch_selection": _check_batch_selection,
}
_ORDER = tuple(_CHECKS)
