"""Nodes of ``batch_selection``; the logic is in :mod:`best_minibatch.selection`.

Per-ordering datasets arrive as keyword arguments named ``<kind>__<ordering>``
(the pipeline builds them from the metric registry).
"""

from __future__ import annotations

import io
import logging
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import torch

from best_minibatch import selection
from best_minibatch.batches.batching import SortBatchesConfig
from best_minibatch.pipelines.orderings import by_ordering
from best_minibatch.selection import statistics as selection_stats
from best_minibatch.services import parallel

logger = logging.getLogger(__name__)


def prepare_policies(
    image_index: pd.DataFrame, batch_phase_stats: pd.DataFrame, params: dict[str, Any], training: dict[str, Any],
    sort_batches: dict[str, Any], **tables: Any
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Check every parameter, hold out the validation split, and build the static policies' batches.

    Returns the split (stratified, seeded), the batches of ``fixed_random``,
    ``paper_advice`` and ``learned`` per phase, and notes on what had to be left
    out. Every metric's ordering is rebuilt on the non-validation training images
    (``{m}.image_scores`` through ``sort_batches``' sort-and-cut). All checks run
    here, before any output is saved.
    """
    cut = SortBatchesConfig.from_params(sort_batches)
    config = selection.SelectionConfig.from_params(params, training, cut.batch_size)
    split = selection.stratified_validation_split(image_index, config.validation_fraction, config.validation_seed)
    counts = split["subset"].value_counts()
    logger.info("batch_selection: %d training and %d validation images (stratified, seed %d)",
                counts.get("train", 0), counts.get("validation", 0), config.validation_seed)
    train_ids = selection.subset_ids(split, "train")
    statuses = by_ordering(tables, "metric_status")
    skipped = {m: (s or {}).get("reason") or "skipped" for m, s in statuses.items()
               if (s or {}).get("status") != "ok"}
    orderings = {
        ordering: selection.ordering_batches(scores, ordering, train_ids, config.batch_size, cut.tie_seed)
        for ordering, scores in by_ordering(tables, "image_scores").items()
        if len(scores) and ordering not in skipped
    }
    notes = [f"Metric '{m}' was skipped by score_metrics: {reason}" for m, reason in skipped.items()]
    phases = config.recipe.num_phases
    pools = []
    if "fixed_random" in config.policies:
        pools.append(selection.fixed_order_pool(orderings, config.fixed_ordering, phases))
    if "paper_advice" in config.policies:
        advice, advice_notes = selection.paper_advice_pool(
            orderings, config.paper_first_phase, config.paper_later_phases, phases,
            {m: "skipped by score_metrics" for m in skipped})
        pools.append(advice)
        notes += advice_notes
    if "learned" in config.policies:
        if config.learned_ordering not in orderings:
            raise selection.SelectionDataError(
                f"batch_selection.learned.ordering is '{config.learned_ordering}', which has no scores here "
                f"({skipped.get(config.learned_ordering, 'not a registered metric')}); choose one of {sorted(orderings)}."
            )
        learned, learned_notes = selection.learned_pool(
            orderings[config.learned_ordering], batch_phase_stats, config.learned_ordering, config.learned_measure,
            config.learned_keep_fraction, phases)
        pools.append(learned)
        notes += learned_notes
    table = pd.concat(pools, ignore_index=True) if pools else pd.DataFrame(columns=selection.POOL_COLUMNS)
    for (policy, phase), part in table.groupby(["policy", "phase"]):
        logger.info("batch_selection: %s phase %d trains on %d batches (%s)", policy, phase, len(part),
                    ", ".join(f"{o}: {n}" for o, n in part["source_ordering"].value_counts().sort_index().items()))
    for note in notes:
        logger.warning("batch_selection: %s", note)
    return split, table, notes


@parallel.hands_out_work
def run_selection_experiment(
    image_index: pd.DataFrame,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    validation_split: pd.DataFrame,
    batch_pools: pd.DataFrame,
    params: dict[str, Any],
    training: dict[str, Any],
    sort_batches: dict[str, Any],
    **tables: Any,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train every seed x policy (each a task of its own under the Dask runner); the learning curves and the
    per-run results. ``training_history__<ordering>`` tables give learned's up-front cost (the seconds of the
    gradient_training run whose distances it uses)."""
    config = selection.SelectionConfig.from_params(params, training,
                                                   SortBatchesConfig.from_params(sort_batches).batch_size)
    upfront = selection.upfront_selection_seconds(config, by_ordering(tables, "training_history"))
    for policy, seconds in upfront.items():
        logger.info("batch_selection: %s is charged %.1f s up front (its selection's measured cost)", policy, seconds)
    # Built on the CPU: each run moves it to its device (its own GPU when the runs are handed out).
    data = selection.ImageData.from_tables(image_index, validation_split, train_images, test_images)
    model_factory = config.recipe.model_factory(num_classes=int(image_index["label"].nunique()))
    results = selection.run_experiment(config, data, batch_pools, model_factory, upfront)
    return results.curves, results.results


def summarise_selection(
    learning_curves: pd.DataFrame,
    run_results: pd.DataFrame,
    validation_split: pd.DataFrame,
    notes: list[str],
    params: dict[str, Any],
    training: dict[str, Any],
    sort_batches: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, str, str, plt.Figure, plt.Figure]:
    """Intervals, tests against shuffle, the one-sentence answer, the figure and the report fragments."""
    config = selection.SelectionConfig.from_params(params, training,
                                                   SortBatchesConfig.from_params(sort_batches).batch_size)
    summary = selection_stats.policy_summary(
        learning_curves, run_results, config.target_validation_accuracy, selection.BASELINE, config.confidence,
        config.alpha, policies=config.policies)
    curves_summary = selection_stats.curve_summary(learning_curves, config.confidence)
    sentence = selection_stats.answer_sentence(summary, selection.BASELINE)
    logger.info("batch_selection answer: %s", sentence)
    setup = selection.describe_setup(config, validation_split, run_results)
    content = selection_stats.report_content(summary, curves_summary, sentence, setup, notes, selection.BASELINE)
    figure = selection_stats.convergence_figure(curves_summary, config.target_validation_accuracy,
                                                list(config.policies))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    markdown = selection_stats.markdown_fragment(content, "batch_selection.convergence_png")
    html = selection_stats.html_fragment(content, buffer.getvalue())
    return curves_summary, summary, markdown, html, figure, figure
