"""Nodes of ``distance_analysis``; the logic is in :mod:`best_minibatch.analysis.statistics`.

Per-ordering datasets arrive as keyword arguments named ``<kind>__<ordering>``
(the pipeline builds them from the metric registry); :func:`by_ordering` turns
them back into ``{ordering: data}`` in registry order.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from best_minibatch.analysis import statistics as analysis
from best_minibatch.pipelines.orderings import by_ordering

logger = logging.getLogger(__name__)


def tabulate_orderings(**tables: Any) -> pd.DataFrame:
    """One row per ordering: ok / skipped (with the reason) / no data, epochs, phases, batches."""
    status = analysis.ordering_status_table(
        by_ordering(tables, "metric_status"), by_ordering(tables, "gradient_distances")
    )
    for row in status[status["status"] != "ok"].itertuples():
        # A skipped metric already had its one loud warning in score_metrics.
        log = logger.info if row.status == "skipped" else logger.warning
        log("Ordering '%s' is left out of the analysis (%s): %s", row.ordering, row.status, row.reason)
    return status


def express_in_noise_units(params: dict[str, Any], **tables: pd.DataFrame) -> pd.DataFrame:
    """All orderings' distances in noise units: against each ordering's same-network null batches (and,
    as a secondary column, the null ordering's batches)."""
    config = analysis.AnalysisConfig.from_params(params)
    return analysis.noise_unit_distances(by_ordering(tables, "gradient_distances"), config.null_ordering,
                                         by_ordering(tables, "null_distances"))


def summarise_batches_per_phase(
    noise_units: pd.DataFrame, **tables: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per ordering, phase and batch: every measure over the phase's epochs, pooled over the seeds and per seed."""
    summaries = by_ordering(tables, "batch_summary")
    return (analysis.batch_phase_statistics(noise_units, summaries),
            analysis.batch_phase_statistics_by_seed(noise_units, summaries))


def evaluate_paper_claims(
    batch_stats: pd.DataFrame, batch_stats_by_seed: pd.DataFrame, ordering_status: pd.DataFrame,
    params: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Group comparisons of every ordering and phase (pooled test, each seed's difference), and the paper's
    claims with verdicts (supported only when the pooled test passes and every seed agrees in sign)."""
    config = analysis.AnalysisConfig.from_params(params)
    comparisons = analysis.compare_batch_groups(
        batch_stats, n_permutations=config.n_permutations, seed=config.seed,
        batch_stats_by_seed=batch_stats_by_seed,
    )
    claims = analysis.claim_verdicts(comparisons, ordering_status, alpha=config.alpha,
                                     null_ordering=config.null_ordering)
    for row in claims.itertuples():  # at DEBUG: every row is in claim_verdicts and the report; one line at INFO
        logger.debug("Claim %s, %s, phase %d: %s (rank-biserial %.3g, Holm p %.3g, seeds agreeing %s of %s; "
                     "control %s: %s)", row.claim_id, row.ordering, row.phase, row.verdict, row.rank_biserial,
                     row.p_holm, _count(row.seeds_agreeing), _count(row.n_seeds), row.control, row.control_verdict)
    counts = claims["verdict"].map(lambda v: v if not str(v).startswith("not tested") else "not tested").value_counts()
    logger.info("Claims (%d rows, plain and stratified orderings): %s; every row in claim_verdicts and the report",
                len(claims), ", ".join(f"{n} {v}" for v, n in counts.items()))
    return comparisons, claims, analysis.seed_group_differences(batch_stats_by_seed)


def _count(value: float) -> str:
    return "-" if pd.isna(value) else str(int(value))


def correlate_confounds(batch_stats: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
    """Spearman correlations of distance with the batch's metric value and class entropy, with intervals."""
    config = analysis.AnalysisConfig.from_params(params)
    return analysis.confound_correlations(
        batch_stats, n_bootstrap=config.n_bootstrap, seed=config.seed, confidence=config.confidence
    )


def relate_distance_to_position(noise_units: pd.DataFrame) -> pd.DataFrame:
    """Within-epoch Spearman of distance with the batch's rank and with its place in the previous epoch."""
    return analysis.position_effects(noise_units)


def select_best_and_worst_batches(batch_stats: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
    """The best and worst batches per ordering and phase by mean noise-unit distance."""
    config = analysis.AnalysisConfig.from_params(params)
    return analysis.best_and_worst_batches(batch_stats, n_per_side=config.n_best_worst)


def check_gradient_noise_trace(
    noise_units: pd.DataFrame, params: dict[str, Any], **tables: pd.DataFrame
) -> pd.DataFrame:
    """Observed mean squared distance of the null ordering's batches against the sampling formula."""
    null = analysis.AnalysisConfig.from_params(params).null_ordering
    histories = by_ordering(tables, "training_history")
    if null not in histories:
        raise analysis.AnalysisInputError(
            f"distance_analysis.null_ordering '{null}' has no training history among {list(histories)}."
        )
    check = analysis.gradient_noise_trace_check(noise_units[noise_units["ordering"] == null], histories[null])
    summary = analysis.summarise_trace_check(check)
    if summary.empty:
        logger.info("Gradient-noise cross-check: not measured (no gradient_variance_trace in %s.training_history)", null)
    else:
        overall = summary.set_index("phase").loc["all"]
        logger.info("Gradient-noise cross-check: observed/expected median %.3f (min %.3f, max %.3f) over %d epochs",
                    overall["median_ratio"], overall["min_ratio"], overall["max_ratio"], overall["n_epochs"])
    return check
