"""Statistics and report of the batch-selection experiment: intervals, tests, the table, the figure, the answer.

Knows nothing of Kedro. Inputs are the experiment's tables from
``selection.run_experiment``: the curves (one row per seed x policy x
evaluation, :data:`selection.CURVE_COLUMNS`) and the results (one row per seed
x policy, :data:`selection.RESULT_COLUMNS`).

Conventions (also in ``docs/batch_selection.md``):

* Intervals over seeds are Student t intervals of the mean.
* Every policy is compared with the baseline (``shuffle``) by seed: a seed fixes
  the initial weights, and the validation split is the same for all runs, so
  runs pair by seed and the test is a **paired t-test** on the per-seed
  differences (CI from the same t distribution). Where the seeds do not pair,
  Welch's t-test is used instead; the table says which. An exact sign-flip
  permutation p-value of the same differences is reported beside it (with 5 seeds
  its smallest possible value is 2/32 = 0.0625, so it alone can never reach 0.05).
* The primary endpoint for "converges faster" is the mean validation accuracy
  over all evaluations after the first step (the area under the
  accuracy-vs-steps curve divided by its length; all policies share the same
  evaluation steps). It needs no censoring, unlike steps to a target. Its
  p-values are Holm-adjusted over the policies compared with the baseline, and
  the verdict (``faster``, ``slower``, ``no detectable difference``) reads off
  them at ``alpha``.
* **Equal compute, two ways.** At equal optimizer steps (every policy takes the
  same steps): the primary endpoint above. At equal wall-clock: ``val_at_budget``,
  the validation accuracy each run had reached when its ``total_seconds``
  (training, drawing the batches, probing, and the up-front selection cost such as
  ``learned``'s distances) reached the baseline's run time of the same seed; its
  p-values are Holm-adjusted over the policies too and give ``wallclock_verdict``.
* The policies that train on a fraction of the batches (``paper_advice``,
  ``learned``, ``oracle``) are also compared with the ``random_subset`` control
  (a random subset of the batches, as many as ``learned`` keeps), with the same
  paired tests; those p-values form their own Holm family. This separates
  "worse batches" from "fewer distinct images".
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import special

from best_minibatch.analysis.statistics import holm_adjust

FASTER, SLOWER, NO_DIFFERENCE, BASELINE_VERDICT = "faster", "slower", "no detectable difference", "baseline"
#: The control for training on a subset of the batches, and the policies compared with it.
CONTROL = "random_subset"
COMPARED_WITH_CONTROL = ("paper_advice", "learned", "oracle")
PAIRED_T, WELCH_T = "paired t-test", "Welch t-test"
#: Endpoints compared with the baseline: (column in the per-run table, larger is better, unit for text).
ENDPOINTS = {
    "val_auc": (True, "points of mean validation accuracy over training"),
    "val_at_budget": (True, "points of validation accuracy at the baseline's wall-clock"),
    "test_accuracy": (True, "points of final test accuracy"),
    "steps_to_target": (False, "steps to the target"),
    "seconds_to_target": (False, "seconds to the target"),
}


# --------------------------------------------------------------------------- intervals and tests


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int


def t_interval(values: Iterable[float], confidence: float = 0.95) -> Interval:
    """Mean and two-sided Student t confidence interval of the mean (NaN bounds below 2 values)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = _t_quantile(0.5 + confidence / 2, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def _t_quantile(probability: float, df: float) -> float:
    """Quantile of Student's t (scipy's ufunc: the numbers of scipy.stats.t.ppf without its overhead)."""
    return float(special.stdtrit(df, probability))


def _t_two_sided_p(statistic: float, df: float) -> float:
    """Two-sided p-value of a t statistic, as scipy's t-tests compute it."""
    return float(2 * special.stdtr(df, -abs(statistic)))


def sign_flip_p_value(differences: Iterable[float], max_exact: int = 16, n_draws: int = 20000,
                      seed: int = 0) -> float:
    """Two-sided permutation p-value of ``mean(differences) = 0`` by flipping signs (paired data).

    Exact (all ``2^n`` sign patterns) up to ``max_exact`` pairs, else Monte Carlo
    with ``(count + 1) / (draws + 1)``. NaN for no pairs.
    """
    d = np.asarray(list(differences), dtype=np.float64)
    n = len(d)
    if n == 0:
        return math.nan
    observed = abs(d.mean())
    tolerance = 1e-12 * max(1.0, np.abs(d).max())
    if n <= max_exact:
        signs = np.array(list(product((1.0, -1.0), repeat=n)))
        means = np.abs(signs @ d) / n
        return float(np.mean(means >= observed - tolerance))
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(n_draws, n))
    means = np.abs(signs @ d) / n
    return float((np.sum(means >= observed - tolerance) + 1) / (n_draws + 1))


def paired_comparison(policy: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Paired t-test and t interval of ``policy - baseline`` (equal-length sequences, one pair per seed)."""
    a = np.asarray(policy, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"Paired data need equal lengths, got {a.shape} and {b.shape}.")
    keep = ~(np.isnan(a) | np.isnan(b))
    d = a[keep] - b[keep]
    interval = t_interval(d, confidence)
    if len(d) >= 2 and np.std(d, ddof=1) > 0:
        p_value = _t_two_sided_p(d.mean() / (d.std(ddof=1) / math.sqrt(len(d))), len(d) - 1)
    elif len(d) >= 2:  # identical differences: no spread, so a t statistic is undefined
        p_value = 1.0 if d.mean() == 0 else 0.0
    else:
        p_value = math.nan
    return {"difference": interval.mean, "difference_low": interval.low, "difference_high": interval.high,
            "p_value": p_value, "p_sign_flip": sign_flip_p_value(d), "n": interval.n, "test": PAIRED_T}


def welch_comparison(policy: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Welch's t-test and Welch-Satterthwaite interval of ``mean(policy) - mean(baseline)`` (unpaired)."""
    a = np.asarray([v for v in policy if not math.isnan(v)], dtype=np.float64)
    b = np.asarray([v for v in baseline if not math.isnan(v)], dtype=np.float64)
    result = {"difference": math.nan, "difference_low": math.nan, "difference_high": math.nan,
              "p_value": math.nan, "p_sign_flip": math.nan, "n": min(len(a), len(b)), "test": WELCH_T}
    if len(a) == 0 or len(b) == 0:
        return result
    difference = float(a.mean() - b.mean())
    result["difference"] = difference
    if len(a) < 2 or len(b) < 2:
        return result
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        result["p_value"] = 1.0 if difference == 0 else 0.0
        return result
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = _t_quantile(0.5 + confidence / 2, df) * se
    result.update(difference_low=difference - half, difference_high=difference + half,
                  p_value=_t_two_sided_p(difference / se, df))
    return result


def compare_with_baseline(policy: pd.Series, baseline: pd.Series, confidence: float = 0.95) -> dict[str, Any]:
    """``policy - baseline`` with seeds as the index: paired when both have the same seeds, else Welch."""
    if set(policy.index) == set(baseline.index):
        seeds = sorted(policy.index)
        return paired_comparison(policy.loc[seeds].to_numpy(), baseline.loc[seeds].to_numpy(), confidence)
    return welch_comparison(policy.to_numpy(), baseline.to_numpy(), confidence)


def verdict(difference: float, p_adjusted: float, larger_is_better: bool, alpha: float) -> str:
    """``faster`` / ``slower`` when the adjusted p-value is below ``alpha``, else ``no detectable difference``."""
    if math.isnan(p_adjusted) or p_adjusted >= alpha or difference == 0 or math.isnan(difference):
        return NO_DIFFERENCE
    return FASTER if (difference > 0) == larger_is_better else SLOWER


# --------------------------------------------------------------------------- per-run endpoints


def clock_column(curves: pd.DataFrame) -> str:
    """The wall-clock column of a curve table: ``total_seconds`` (selection included), or ``seconds`` in tables
    written before it existed."""
    return "total_seconds" if "total_seconds" in curves.columns else "seconds"


def time_to_target(curves: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per seed and policy: the first evaluation with validation accuracy >= ``target``.

    Columns ``seed``, ``policy``, ``reached`` (bool), ``steps_to_target``,
    ``passes_to_target``, ``seconds_to_target`` (training, probing and up-front
    selection: :func:`clock_column`), ``epoch_to_target``; NaN where the target was
    never reached.
    """
    clock = clock_column(curves)
    rows = []
    for (seed, policy), curve in curves.groupby(["seed", "policy"], sort=True):
        curve = curve.sort_values("step")
        hit = curve.loc[curve["val_accuracy"] >= target]
        first = hit.iloc[0] if len(hit) else None
        rows.append({
            "seed": int(seed), "policy": policy, "reached": first is not None,
            "steps_to_target": float(first["step"]) if first is not None else math.nan,
            "passes_to_target": float(first["passes"]) if first is not None else math.nan,
            "seconds_to_target": float(first[clock]) if first is not None else math.nan,
            "epoch_to_target": float(first["epoch"]) if first is not None else math.nan,
        })
    return pd.DataFrame(rows)


def accuracy_at_budget(curves: pd.DataFrame, budgets: Mapping[int, float]) -> pd.DataFrame:
    """Per seed and policy: the validation accuracy the run had when its wall-clock reached ``budgets[seed]``.

    The clock is :func:`clock_column` (selection cost included). The accuracy is the
    last evaluation at or before the budget; a run whose clock starts beyond it (an
    up-front selection cost larger than the budget) has not trained by then, so it
    counts with its initial model's accuracy (the evaluation before the first step).
    A run that finished before the budget counts with its final accuracy (its steps
    are the same as every policy's). Columns ``seed``, ``policy``, ``budget_seconds``,
    ``val_at_budget``, ``steps_at_budget``; NaN for a seed without a budget.
    """
    clock = clock_column(curves)
    rows = []
    for (seed, policy), curve in curves.groupby(["seed", "policy"], sort=True):
        curve = curve.sort_values("step")
        budget = budgets.get(int(seed), math.nan)
        if math.isnan(budget):
            rows.append({"seed": int(seed), "policy": policy, "budget_seconds": math.nan,
                         "val_at_budget": math.nan, "steps_at_budget": math.nan})
            continue
        within = curve.loc[curve[clock] <= budget * (1 + 1e-9)]
        at = within.iloc[-1] if len(within) else curve.iloc[0]
        rows.append({"seed": int(seed), "policy": policy, "budget_seconds": float(budget),
                     "val_at_budget": float(at["val_accuracy"]), "steps_at_budget": float(at["step"])})
    return pd.DataFrame(rows, columns=["seed", "policy", "budget_seconds", "val_at_budget", "steps_at_budget"])


def run_endpoints(curves: pd.DataFrame, results: pd.DataFrame, target: float, baseline: str = "shuffle"
                  ) -> pd.DataFrame:
    """One row per seed x policy: the results plus ``val_auc``, the time-to-target columns and the accuracy at
    the baseline's wall-clock of the same seed (:func:`accuracy_at_budget`)."""
    after_start = curves.loc[curves["step"] > 0]
    auc = after_start.groupby(["seed", "policy"])["val_accuracy"].mean().rename("val_auc").reset_index()
    table = results.merge(auc, on=["seed", "policy"], how="left")
    table = table.merge(time_to_target(curves, target), on=["seed", "policy"], how="left")
    clock = clock_column(curves)
    base = curves.loc[curves["policy"] == baseline]
    budgets = {int(seed): float(part[clock].max()) for seed, part in base.groupby("seed")}
    return table.merge(accuracy_at_budget(curves, budgets), on=["seed", "policy"], how="left")


def curve_summary(curves: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per policy and evaluation step: validation accuracy mean and t interval over seeds, mean seconds and passes.

    ``seconds_mean`` is the loop's clock, ``total_seconds_mean`` that plus the up-front selection cost.
    """
    clock = clock_column(curves)
    rows = []
    for (policy, step), part in curves.groupby(["policy", "step"], sort=True):
        accuracy = t_interval(part["val_accuracy"], confidence)
        rows.append({
            "policy": policy, "epoch": int(part["epoch"].iloc[0]), "phase": int(part["phase"].iloc[0]),
            "step": int(step), "n_seeds": accuracy.n, "val_accuracy_mean": accuracy.mean,
            "val_accuracy_low": accuracy.low, "val_accuracy_high": accuracy.high,
            "seconds_mean": float(part["seconds"].mean()), "passes_mean": float(part["passes"].mean()),
            "total_seconds_mean": float(part[clock].mean()),
        })
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- policy summary


def _compare(part: pd.DataFrame, reference: pd.DataFrame, confidence: float) -> dict[str, dict[str, Any]]:
    """Every endpoint of ``part - reference`` (both indexed by seed); time to target on seeds where both reached it."""
    comparisons = {}
    for endpoint in ENDPOINTS:
        a, b = part[endpoint], reference[endpoint]
        if endpoint in ("steps_to_target", "seconds_to_target"):
            both = a.dropna().index.intersection(b.dropna().index)
            a, b = a.loc[both], b.loc[both]
        comparisons[endpoint] = compare_with_baseline(a, b, confidence)
    return comparisons


def _comparison_columns(prefix: str, comparison: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{prefix}_diff": comparison["difference"], f"{prefix}_diff_low": comparison["difference_low"],
            f"{prefix}_diff_high": comparison["difference_high"], f"{prefix}_p": comparison["p_value"],
            f"{prefix}_p_sign_flip": comparison["p_sign_flip"], f"{prefix}_n": comparison["n"]}


def policy_summary(
    curves: pd.DataFrame,
    results: pd.DataFrame,
    target: float,
    baseline: str = "shuffle",
    confidence: float = 0.95,
    alpha: float = 0.05,
    policies: Sequence[str] | None = None,
    control: str | None = CONTROL,
    compared_with_control: Sequence[str] = COMPARED_WITH_CONTROL,
) -> pd.DataFrame:
    """One row per policy: intervals of every endpoint, not-reached counts, and the comparison with ``baseline``.

    For each endpoint ``e`` of :data:`ENDPOINTS`: ``e_mean``, ``e_low``, ``e_high``
    (t interval over seeds; time-to-target over the seeds that reached it) and,
    against the baseline, ``e_diff``, ``e_diff_low``, ``e_diff_high``, ``e_p``,
    ``e_p_sign_flip``, ``e_n`` (pairs used: for time to target only seeds where
    both runs reached it). ``val_auc_p_holm`` and ``test_accuracy_p_holm`` are
    Holm-adjusted over the non-baseline policies; ``verdict`` reads the primary
    endpoint (``val_auc``).

    When ``control`` has runs, each policy of ``compared_with_control`` that has
    runs is also compared with it, in the same way: columns ``e_ctrl_diff``,
    ``e_ctrl_diff_low``, ``e_ctrl_diff_high``, ``e_ctrl_p``, ``e_ctrl_p_sign_flip``,
    ``e_ctrl_n``, ``val_auc_ctrl_p_holm`` and ``test_accuracy_ctrl_p_holm`` (Holm
    over the policies compared with the control, a family of its own) and
    ``control_verdict``; NaN / empty on the other rows. ``control`` names the
    control (empty when it did not run).
    """
    table = run_endpoints(curves, results, target, baseline)
    if baseline not in set(table["policy"]):
        raise ValueError(f"The results have no runs of the baseline policy '{baseline}'.")
    order = list(policies) if policies is not None else sorted(table["policy"].unique(),
                                                                key=lambda p: (p != baseline, p))
    present = set(table["policy"])
    base = table.loc[table["policy"] == baseline].set_index("seed")
    has_control = control is not None and control in present and control != baseline
    against_control = [p for p in order if has_control and p in compared_with_control and p in present and p != control]
    reference = table.loc[table["policy"] == control].set_index("seed") if has_control else None
    rows = []
    for policy in order:
        part = table.loc[table["policy"] == policy].set_index("seed")
        row: dict[str, Any] = {"policy": policy, "n_seeds": len(part),
                               "reached_target": int(part["reached"].sum()),
                               "not_reached": int((~part["reached"].astype(bool)).sum())}
        for column in ("final_val_accuracy", "val_auc", "val_at_budget", "budget_seconds", "test_accuracy",
                       "steps_to_target", "passes_to_target", "seconds_to_target", "seconds", "probe_seconds",
                       "upfront_seconds", "selection_seconds", "total_seconds", "probe_passes", "steps",
                       "distinct_images_trained"):
            if column not in part:  # results written before the equal-compute columns
                continue
            interval = t_interval(part[column], confidence)
            row[f"{column}_mean"], row[f"{column}_low"], row[f"{column}_high"] = interval.mean, interval.low, interval.high
        if policy == baseline:
            none = {"difference": 0.0, "difference_low": math.nan, "difference_high": math.nan,
                    "p_value": math.nan, "p_sign_flip": math.nan, "n": len(part), "test": ""}
            comparisons = {endpoint: none for endpoint in ENDPOINTS}
        else:
            comparisons = _compare(part, base, confidence)
        for endpoint, comparison in comparisons.items():
            row.update(_comparison_columns(endpoint, comparison))
        row["test"] = comparisons["val_auc"]["test"]
        if against_control:
            if policy in against_control:
                for endpoint, comparison in _compare(part, reference, confidence).items():
                    row.update(_comparison_columns(f"{endpoint}_ctrl", comparison))
            else:
                row.update({f"{endpoint}_ctrl{suffix}": math.nan for endpoint in ENDPOINTS
                            for suffix in ("_diff", "_diff_low", "_diff_high", "_p", "_p_sign_flip", "_n")})
        rows.append(row)
    summary = pd.DataFrame(rows)
    others = summary["policy"] != baseline
    for endpoint in ("val_auc", "val_at_budget", "test_accuracy"):
        summary[f"{endpoint}_p_holm"] = math.nan
        summary.loc[others, f"{endpoint}_p_holm"] = holm_adjust(summary.loc[others, f"{endpoint}_p"])
    summary["verdict"] = [
        BASELINE_VERDICT if policy == baseline else verdict(diff, p, True, alpha)
        for policy, diff, p in zip(summary["policy"], summary["val_auc_diff"], summary["val_auc_p_holm"])
    ]
    summary["wallclock_verdict"] = [
        BASELINE_VERDICT if policy == baseline else verdict(diff, p, True, alpha)
        for policy, diff, p in zip(summary["policy"], summary["val_at_budget_diff"], summary["val_at_budget_p_holm"])
    ]
    summary["control"] = control if against_control else ""
    if against_control:
        compared = summary["policy"].isin(against_control)
        for endpoint in ("val_auc", "test_accuracy"):
            summary[f"{endpoint}_ctrl_p_holm"] = math.nan
            summary.loc[compared, f"{endpoint}_ctrl_p_holm"] = holm_adjust(summary.loc[compared, f"{endpoint}_ctrl_p"])
        summary["control_verdict"] = [
            verdict(diff, p, True, alpha) if is_compared else ""
            for is_compared, diff, p in zip(compared, summary["val_auc_ctrl_diff"], summary["val_auc_ctrl_p_holm"])
        ]
    summary["target_validation_accuracy"] = target
    summary["confidence"] = confidence
    summary["alpha"] = alpha
    return summary


# --------------------------------------------------------------------------- the answer in one sentence


def _points(x: float) -> str:
    return f"{100 * x:+.1f}"


def _join(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def answer_sentence(summary: pd.DataFrame, baseline: str = "shuffle") -> str:
    """The experiment's answer in one sentence, read off the verdicts (primary endpoint, Holm-adjusted)."""
    others = summary.loc[summary["policy"] != baseline]
    if len(others) == 0:
        return f"Only the baseline ({baseline}) was run, so nothing was compared."
    alpha = float(summary["alpha"].iloc[0])
    confidence = float(summary["confidence"].iloc[0])
    n = int(summary["n_seeds"].min())
    test = others["test"].iloc[0] or PAIRED_T
    holm = "Holm-adjusted p-values"
    if "control_verdict" in summary.columns and (summary["control_verdict"] != "").any():
        holm += " (within each comparison)"
    method = f"{test}s over {n} seeds, {100 * confidence:.0f}% intervals, {holm}, alpha = {alpha:g}"

    def numbers(group: pd.DataFrame, prefix: str = "val_auc") -> str:
        differences = [f"{_points(r[f'{prefix}_diff'])} [{_points(r[f'{prefix}_diff_low'])}, "
                       f"{_points(r[f'{prefix}_diff_high'])}]" for _, r in group.iterrows()]
        p_values = [f"{r[f'{prefix}_p_holm']:.2g}" for _, r in group.iterrows()]
        return (f"mean validation accuracy over training {_join(differences)} points, "
                f"p = {_join(p_values)}")

    control_clause = ""
    if "control_verdict" in summary.columns and (summary["control_verdict"] != "").any():
        control = str(summary["control"].iloc[0])
        compared = summary.loc[summary["control_verdict"] != ""]
        parts = []
        for word, label in ((FASTER, f"converged faster than {control}"), (SLOWER, "converged slower"),
                            (NO_DIFFERENCE, "showed no detectable difference")):
            group = compared.loc[compared["control_verdict"] == word]
            if len(group):
                parts.append(f"{_join(list(group['policy']))} {label} ({numbers(group, 'val_auc_ctrl')})")
        control_clause = f"; against the {control} control: " + _join(parts)

    faster = others.loc[others["verdict"] == FASTER]
    slower = others.loc[others["verdict"] == SLOWER]
    neutral = others.loc[others["verdict"] == NO_DIFFERENCE]
    if len(faster) == 0 and len(slower) == 0:
        return (f"No: none of the selection policies ({_join(list(others['policy']))}) converged detectably "
                f"faster than {baseline} - no detectable difference ({numbers(others)}){control_clause}"
                f"{wallclock_clause(summary, baseline)} ({method}).")
    clauses = []
    if len(faster):
        clauses.append(f"{_join(list(faster['policy']))} converged faster than {baseline} ({numbers(faster)})")
    if len(slower):
        clauses.append(f"{_join(list(slower['policy']))} converged slower ({numbers(slower)})")
    if len(neutral):
        clauses.append(f"{_join(list(neutral['policy']))} showed no detectable difference ({numbers(neutral)})")
    lead = f"Yes for {_join(list(faster['policy']))}: " if len(faster) else f"No: no policy converged faster than {baseline}; "
    sentence = lead + (", ".join(clauses[:-1]) + " and " + clauses[-1] if len(clauses) > 1 else clauses[0])
    oracle = faster.loc[faster["policy"] == "oracle"]
    if len(oracle) and not math.isnan(oracle.iloc[0]["seconds_to_target_diff"]):
        sentence += (f", though counting its probing the oracle took {oracle.iloc[0]['seconds_to_target_diff']:+.1f} s "
                     f"to the target relative to {baseline}")
    return sentence + control_clause + wallclock_clause(summary, baseline) + f" ({method})."


def wallclock_clause(summary: pd.DataFrame, baseline: str = "shuffle") -> str:
    """The answer at equal wall-clock (selection cost included), as a clause of the sentence; empty for tables
    without it."""
    if "wallclock_verdict" not in summary.columns:
        return ""
    others = summary.loc[summary["policy"] != baseline]
    parts = []
    for word, label in ((FASTER, "higher"), (SLOWER, "lower"), (NO_DIFFERENCE, "no detectable difference")):
        group = others.loc[others["wallclock_verdict"] == word]
        if len(group) == 0:
            continue
        numbers = _join([f"{_points(r['val_at_budget_diff'])} [{_points(r['val_at_budget_diff_low'])}, "
                         f"{_points(r['val_at_budget_diff_high'])}]" for _, r in group.iterrows()])
        p_values = _join([f"{r['val_at_budget_p_holm']:.2g}" for _, r in group.iterrows()])
        parts.append(f"{_join(list(group['policy']))} {label} ({numbers} points, p = {p_values})")
    if not parts:
        return ""
    return (f"; at equal wall-clock (validation accuracy when each run's time, selection cost included, reached "
            f"the {baseline} run's time of the same seed): " + _join(parts))


# --------------------------------------------------------------------------- figure


def convergence_figure(curves_summary: pd.DataFrame, target: float, policies: Sequence[str] | None = None,
                       title: str = "") -> plt.Figure:
    """Validation accuracy against optimizer steps and against wall-clock seconds (training, probing, selection).

    One line per policy (mean over seeds) with its t interval as a band; the
    target accuracy as a dashed line; on the steps panel, dotted lines where a
    learning-rate phase begins. When a policy pays an up-front selection cost (its
    curve starts after 0 s) the seconds axis is logarithmic, so that its curve and
    the others' stay readable side by side.
    """
    policies = list(policies) if policies is not None else list(dict.fromkeys(curves_summary["policy"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True, constrained_layout=True)
    palette = plt.get_cmap("tab10")
    clock = "total_seconds_mean" if "total_seconds_mean" in curves_summary.columns else "seconds_mean"
    starts = curves_summary.loc[curves_summary["step"] == 0, clock]
    log_seconds = bool(len(starts)) and float(starts.max()) > 0
    for i, policy in enumerate(policies):
        part = curves_summary.loc[curves_summary["policy"] == policy].sort_values("step")
        colour = palette(i % 10)
        for ax, x in zip(axes, ("step", clock)):
            if log_seconds and x == clock:
                part = part.loc[part[x] > 0]
            ax.plot(part[x], part["val_accuracy_mean"], color=colour, label=policy, linewidth=1.6)
            ax.fill_between(part[x], part["val_accuracy_low"], part["val_accuracy_high"], color=colour, alpha=0.18,
                            linewidth=0)
    for ax in axes:
        ax.axhline(target, color="0.3", linestyle="--", linewidth=1, label=f"target {target:.2f}")
        ax.grid(alpha=0.3)
    # Phase p starts after the last evaluation of phase p - 1 (all policies share the steps).
    phase_starts = curves_summary.loc[curves_summary["epoch"] > 0].groupby("phase")["step"].min().sort_index()
    steps_per_evaluation = np.diff(np.sort(curves_summary["step"].unique()))
    offset = float(steps_per_evaluation.min()) if len(steps_per_evaluation) else 0.0
    for phase, first_step in phase_starts.iloc[1:].items():
        axes[0].axvline(first_step - offset, color="0.5", linestyle=":", linewidth=1)
        axes[0].annotate(f"phase {phase}", (first_step - offset, 0.02), xycoords=("data", "axes fraction"),
                         fontsize=8, color="0.35", xytext=(3, 0), textcoords="offset points")
    n = int(curves_summary["n_seeds"].max()) if len(curves_summary) else 0
    axes[0].set_xlabel("optimizer steps")
    if log_seconds:
        axes[1].set_xscale("log")
    axes[1].set_xlabel("wall-clock seconds (training, probing and up-front selection), mean over seeds"
                       + (", log scale" if log_seconds else ""))
    axes[0].set_ylabel(f"validation accuracy (mean and 95% t interval, {n} seeds)")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title or "Batch selection: validation accuracy per policy")
    return fig


# --------------------------------------------------------------------------- report fragment


def _ci(mean: float, low: float, high: float, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    if math.isnan(mean):
        return "n/a"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    if math.isnan(low):
        return fmt.format(scale * mean)
    return f"{fmt.format(scale * mean)} [{fmt.format(scale * low)}, {fmt.format(scale * high)}]"


def _ci_of(row, name: str, *args, **kwargs) -> str:
    """:func:`_ci` of ``row[name]`` with its ``_low`` and ``_high`` columns."""
    return _ci(row[name], row[f"{name}_low"], row[f"{name}_high"], *args, **kwargs)


def _p(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3g}"


@dataclass(frozen=True)
class ReportContent:
    """What the report fragment says, independent of its format."""

    title: str
    intro: str
    answer: str
    setup: str
    method: str
    summary_header: list[str]
    summary_rows: list[list[str]]
    epochs_caption: str
    epochs_header: list[str]
    epochs_rows: list[list[str]]
    notes: list[str]
    figure_caption: str
    control_caption: str = ""
    control_header: list[str] = field(default_factory=list)
    control_rows: list[list[str]] = field(default_factory=list)


def report_content(
    summary: pd.DataFrame,
    curves_summary: pd.DataFrame,
    sentence: str,
    setup: Mapping[str, Any],
    notes: Sequence[str] = (),
    baseline: str = "shuffle",
) -> ReportContent:
    """The fragment's text and tables: the answer, the setup, the summary table, accuracy per epoch."""
    confidence = float(summary["confidence"].iloc[0])
    target = float(summary["target_validation_accuracy"].iloc[0])
    pct = f"{100 * confidence:.0f}%"
    header = ["policy", "mean val. acc. over training (%)", "diff. vs shuffle (Holm p)", "final test acc. (%)",
              "diff. vs shuffle (Holm p)", "steps to target", "diff. (p, pairs)", "seconds to target",
              "diff. (p)", "not reached", "probe passes / run", "distinct images trained / run", "verdict", "test"]
    wallclock = "wallclock_verdict" in summary.columns
    if wallclock:
        header[-2:-2] = [f"val. acc. at {baseline}'s wall-clock (%)", "diff. vs shuffle (Holm p)",
                         "seconds / run (selection)", "wall-clock verdict"]
    rows = []
    for _, r in summary.iterrows():
        is_base = r["policy"] == baseline
        rows.append([
            str(r["policy"]),
            _ci(r["val_auc_mean"], r["val_auc_low"], r["val_auc_high"]),
            "-" if is_base else f"{_ci_of(r, 'val_auc_diff', signed=True)}"
                                f" (p {_p(r['val_auc_p_holm'])})",
            _ci(r["test_accuracy_mean"], r["test_accuracy_low"], r["test_accuracy_high"]),
            "-" if is_base else f"{_ci_of(r, 'test_accuracy_diff', signed=True)}"
                                f" (p {_p(r['test_accuracy_p_holm'])})",
            _ci(r["steps_to_target_mean"], r["steps_to_target_low"], r["steps_to_target_high"], 1, 0),
            "-" if is_base else f"{_ci_of(r, 'steps_to_target_diff', 1, 0, True)}"
                                f" (p {_p(r['steps_to_target_p'])}, {int(r['steps_to_target_n'])})",
            _ci(r["seconds_to_target_mean"], r["seconds_to_target_low"], r["seconds_to_target_high"], 1, 1),
            "-" if is_base else f"{_ci_of(r, 'seconds_to_target_diff', 1, 1, True)}"
                                f" (p {_p(r['seconds_to_target_p'])})",
            f"{int(r['not_reached'])} of {int(r['n_seeds'])}",
            f"{r['probe_passes_mean']:.0f}",
            f"{r['distinct_images_trained_mean']:.0f}",
            *([_ci(r["val_at_budget_mean"], r["val_at_budget_low"], r["val_at_budget_high"]),
               "-" if is_base else f"{_ci_of(r, 'val_at_budget_diff', signed=True)}"
                                   f" (p {_p(r['val_at_budget_p_holm'])})",
               f"{r.get('total_seconds_mean', r['seconds_mean']):.1f} "
               f"({r.get('selection_seconds_mean', r['probe_seconds_mean']):.1f})",
               str(r["wallclock_verdict"])] if wallclock else []),
            str(r["verdict"]),
            str(r["test"]) or "-",
        ])
    control_caption, control_header, control_rows = "", [], []
    if "control_verdict" in summary.columns and (summary["control_verdict"] != "").any():
        control = str(summary["control"].iloc[0])
        control_caption = (f"Against the {control} control (a random subset of the batches, as many as learned "
                           f"keeps, cycled for the same steps): policy minus {control}, paired by seed; the accuracy "
                           "p-values are Holm-adjusted over the policies in this table. A negative difference means "
                           "the chosen batches did worse than random batches of the same count.")
        control_header = ["policy", f"mean val. acc. over training: diff. vs {control} (Holm p)",
                          f"final test acc.: diff. vs {control} (Holm p)", "steps to target: diff. (p, pairs)",
                          "seconds to target: diff. (p)", "verdict", "test"]
        for _, r in summary.loc[summary["control_verdict"] != ""].iterrows():
            control_rows.append([
                str(r["policy"]),
                f"{_ci_of(r, 'val_auc_ctrl_diff', signed=True)}"
                f" (p {_p(r['val_auc_ctrl_p_holm'])})",
                f"{_ci_of(r, 'test_accuracy_ctrl_diff', signed=True)}"
                f" (p {_p(r['test_accuracy_ctrl_p_holm'])})",
                f"{_ci_of(r, 'steps_to_target_ctrl_diff', 1, 0, True)}"
                f" (p {_p(r['steps_to_target_ctrl_p'])}, {int(r['steps_to_target_ctrl_n'])})",
                f"{_ci_of(r, 'seconds_to_target_ctrl_diff', 1, 1, True)}"
                f" (p {_p(r['seconds_to_target_ctrl_p'])})",
                str(r["control_verdict"]),
                str(r["test"]) or "-",
            ])
    ends = curves_summary.sort_values("step").groupby(["policy", "epoch"]).tail(1)
    policies = list(summary["policy"])
    epochs_rows = []
    for epoch in sorted(ends["epoch"].unique()):
        at = ends.loc[ends["epoch"] == epoch].set_index("policy")
        cells = [_ci(at.loc[p, "val_accuracy_mean"], at.loc[p, "val_accuracy_low"], at.loc[p, "val_accuracy_high"])
                 if p in at.index else "n/a" for p in policies]
        epochs_rows.append([str(int(epoch)), str(int(at["phase"].iloc[0])), *cells])
    return ReportContent(
        title='Batch selection: does training on the "best" mini-batches converge faster?',
        intro=f"The paper's open question (section 5, future work 2), tested: {_count_words(len(summary))} policies "
              "with the same model, data, batch size, learning-rate schedule and number of optimizer steps "
              "(docs/batch_selection.md).",
        answer=sentence,
        setup="; ".join(f"{key}: {value}" for key, value in setup.items()) + ".",
        method=(f"Means over seeds with {pct} t intervals; accuracies in percent. Differences are policy minus "
                f"{baseline}, paired by seed (same initial weights, same validation split), tested with the test "
                "named in the last column; the two accuracy columns' p-values are Holm-adjusted over the policies. "
                f"The target is a validation accuracy of {100 * target:.1f}%, fixed before the run; steps and "
                "seconds to it average the seeds that reached it, their differences use the seeds where both runs "
                "did (their p-values are not adjusted). Seconds count training steps, drawing the batches, the "
                "oracle's gradient probing and a policy's up-front selection cost (learned: the measured seconds "
                "of the gradient_training run whose distances it uses), not evaluations. Distinct images trained "
                "counts the training images used at least once in a run. The verdict reads the first accuracy "
                "column (the primary endpoint, equal optimizer steps)."
                + (f" Equal wall-clock: the validation accuracy each run had when its seconds (selection "
                   f"included; in brackets the selection's share) reached the {baseline} run's seconds of the "
                   "same seed (a run still selecting by then counts with its initial model), Holm-adjusted over "
                   "the policies; the wall-clock verdict reads it." if wallclock else "")),
        summary_header=header,
        summary_rows=rows,
        epochs_caption=f"Validation accuracy at the end of each epoch (%, mean [{pct} interval]):",
        epochs_header=["epoch", "phase", *policies],
        epochs_rows=epochs_rows,
        notes=list(notes),
        figure_caption="Validation accuracy against optimizer steps (left) and against wall-clock seconds of "
                       "training, probing and up-front selection (right); lines are means over seeds, bands "
                       f"{pct} t intervals, the dashed line is the target.",
        control_caption=control_caption,
        control_header=control_header,
        control_rows=control_rows,
    )


def _count_words(n: int) -> str:
    words = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
    return words[n] if 0 <= n < len(words) else str(n)


def markdown_fragment(content: ReportContent, figure_name: str = "") -> str:
    """The fragment as Markdown (figure referenced by its dataset name)."""
    def table(header: list[str], rows: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
            "| " + " | ".join(row) + " |" for row in rows]

    lines = [f"## {content.title}", "", content.intro, "", f"**Answer.** {content.answer}", "",
             f"**Setup.** {content.setup}", "", content.method, ""]
    lines += table(content.summary_header, content.summary_rows)
    if content.control_rows:
        lines += ["", content.control_caption, ""] + table(content.control_header, content.control_rows)
    lines += ["", content.epochs_caption, ""] + table(content.epochs_header, content.epochs_rows)
    if content.notes:
        lines += ["", "**Notes.**", ""] + [f"- {note}" for note in content.notes]
    if figure_name:
        lines += ["", f"Figure `{figure_name}`: {content.figure_caption}"]
    return "\n".join(lines) + "\n"


def html_fragment(content: ReportContent, figure_png: bytes | None = None) -> str:
    """The fragment as self-contained HTML (a ``<section>``; the figure embedded as a base64 PNG)."""

    def esc(text: str) -> str:
        return html.escape(str(text))

    def table(header: list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    parts = [f'<section id="batch-selection"><h2>{esc(content.title)}</h2>', f"<p>{esc(content.intro)}</p>",
             f"<p><b>Answer.</b> {esc(content.answer)}</p>", f"<p><b>Setup.</b> {esc(content.setup)}</p>",
             f'<p class="note">{esc(content.method)}</p>', table(content.summary_header, content.summary_rows)]
    if content.control_rows:
        parts += [f"<p>{esc(content.control_caption)}</p>", table(content.control_header, content.control_rows)]
    if figure_png is not None:
        encoded = base64.b64encode(figure_png).decode("ascii")
        parts.append(f'<figure><img alt="batch selection convergence" src="data:image/png;base64,{encoded}">'
                     f"<figcaption>{esc(content.figure_caption)}</figcaption></figure>")
    parts += [f"<p>{esc(content.epochs_caption)}</p>", table(content.epochs_header, content.epochs_rows)]
    if content.notes:
        parts.append("<p><b>Notes.</b></p><ul>" + "".join(f"<li>{esc(n)}</li>" for n in content.notes) + "</ul>")
    parts.append("</section>")
    return "\n".join(parts) + "\n"
