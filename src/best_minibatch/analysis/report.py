"""The run's report: one self-contained HTML page (figures embedded as base64 PNG).

Knows nothing of Kedro. :func:`run_setup` derives what was run from the tables;
:func:`render_report` lays out the setup, every ordering (skipped ones with the
reason), the paper's claims with their verdicts and numbers, the confounds, the
gradient-noise cross-check, the best and worst batches, and the figures.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from best_minibatch.analysis.statistics import (
    CONTROL_FAILS,
    FIXED_ORDER,
    NOT_SEPARABLE,
    claim_answers,
    epoch_phase_table,
    phase_spans,
    summarise_trace_check,
    with_seed,
)
from best_minibatch.config import Section


@dataclass(frozen=True)
class VisualizeConfig:
    """The ``visualize`` section, every key checked (conf/<env>/parameters_visualize.yml)."""

    report_title: str = "Run report"
    report_png_dpi: int = 110

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> VisualizeConfig:
        section = Section(params, "visualize", ("report_title", "report_png_dpi"),
                          where="conf/<env>/parameters_visualize.yml")
        return cls(report_title=section.text("report_title", cls.report_title, "Use e.g. 'Run report'."),
                   report_png_dpi=section.integer("report_png_dpi", cls.report_png_dpi, 10, "Use e.g. 110."))


VERDICT_COLORS = {"supported": "#d9f2d9", "contradicted": "#f9d6d5", "undecided": "#eeeeee"}

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .85em; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #444; } .note { font-size: .9em; color: #444; }
details summary { cursor: pointer; font-weight: 600; } pre { background: #f7f7f7; padding: .6em; overflow-x: auto; }
"""


def _escape(value: Any) -> str:
    return html.escape(str(value))


def _format(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        if round(value, digits) == 0:
            value = abs(value)  # no "-0.000"
        if value != 0 and (abs(value) < 10 ** -(digits - 1) or abs(value) >= 10**5):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}" if abs(value) < 10 else f"{value:.{max(digits - 2, 1)}f}"
    return str(value)


#: Columns that hold counts or indices: shown without decimals even when NaN made them float.
INTEGER_COLUMNS = {"phase", "n_group", "n_rest", "n_epochs", "n_phases", "n_batches", "batch", "rank",
                   "first_epoch", "last_epoch", "epoch", "seed", "n_seeds", "seeds_agreeing",
                   "adjusted_seeds_agreeing"}


def html_table(table: pd.DataFrame, columns: Mapping[str, str], row_colors: Sequence[str] | None = None) -> str:
    """``table``'s ``columns`` (name -> header) as an HTML table; numbers right-aligned."""
    head = "".join(f"<th>{_escape(title)}</th>" for title in columns.values())
    body = []
    for position in range(len(table)):
        style = f' style="background:{row_colors[position]}"' if row_colors and row_colors[position] else ""
        cells = []
        for column in columns:
            value = table[column].iloc[position]
            numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            if numeric and column in INTEGER_COLUMNS and np.isfinite(value):
                value = int(value)
            text = _escape(_format(value))
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        body.append(f"<tr{style}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def run_setup(
    histories: Mapping[str, pd.DataFrame],
    assignments: Mapping[str, pd.DataFrame],
    image_index: pd.DataFrame,
) -> dict[str, Any]:
    """What was run, read off the tables: data size, batch size and count, epochs, phases and seeds."""
    train = image_index[image_index["split"] == "train"]
    used = next((a for a in assignments.values() if len(a)), None)
    history = next((h for h in histories.values() if len(h)), None)
    setup: dict[str, Any] = {
        "n_train": len(train),
        "n_test": int((image_index["split"] == "test").sum()),
        "n_classes": int(train["label"].nunique()),
        "batch_size": int(used.groupby("batch").size().max()) if used is not None else None,
        "n_batches": int(used["batch"].nunique()) if used is not None else None,
    }
    if used is not None:
        setup["n_dropped"] = setup["n_train"] - setup["batch_size"] * setup["n_batches"]
    if history is not None:
        setup["n_epochs"] = int(history["epoch"].nunique())
        setup["phases"] = phase_spans(epoch_phase_table(history, "training_history"))
        setup["seeds"] = sorted({int(s) for h in histories.values() if len(h) for s in with_seed(h)["seed"]})
    return setup


def _figure_html(name: str, png: bytes, caption: str) -> str:
    encoded = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{_escape(name)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption><b>{_escape(name)}</b>. {_escape(caption)}</figcaption></figure>")


FIGURE_CAPTIONS = {
    "heatmap": "The paper's heat map: one panel per learning-rate phase, x = batch (ascending metric), y = epoch; "
               "light = gradient closer to the full gradient; with several seeds each cell is the mean over the "
               "seeds (the seed spread figure shows how much they differ). Top: ‖g_k − g_full‖; bottom: noise units, the "
               "z-score against random batches of the same epoch probed at the same parameters (0 = a random "
               "batch; the cross-network null for an ordering trained without null batches, see the caveat "
               "above). One colour scale per row for all phases.",
    "seed_spread": "Per ordering (rows) and phase (columns): each seed's mean distance per batch over the phase, in "
                   "noise units (thin lines), their mean over seeds (thick; the value the claims test) and ± one "
                   "standard deviation across seeds (band); each title gives that standard deviation's median over "
                   "the batches. Structure that one seed shows and the others do not is not a property of the "
                   "batches.",
    "distance_by_rank": "Per phase: each metric's mean distance per batch against its rank, over the random "
                        "ordering's mean and 95% range; top raw, bottom in noise units. Each ordering trains its "
                        "own network, so whole-curve offsets from the band mix batch composition with differences "
                        "between networks.",
    "batches": "Images and class mix of the best and worst batch (lowest / highest mean noise-unit distance) "
               "of each phase.",
    "training_curves": "Loss and accuracy per epoch (the mean over the seeds); dotted lines mark the learning-rate "
                       "phases.",
}


def _caption(name: str) -> str:
    return next((caption for prefix, caption in FIGURE_CAPTIONS.items() if name.startswith(prefix)), "")


def render_report(
    *,
    setup: Mapping[str, Any],
    ordering_status: pd.DataFrame,
    claims: pd.DataFrame,
    comparisons: pd.DataFrame,
    confounds: pd.DataFrame,
    best_worst: pd.DataFrame,
    trace_check: pd.DataFrame,
    histories: Mapping[str, pd.DataFrame],
    figures: Mapping[str, Mapping[str, bytes]],
    parameters: Mapping[str, Any],
    null_ordering: str,
    alpha: float,
    title: str = "What's the best mini-batch? Run report",
    batch_selection_section: str | None = None,
    position_effects: pd.DataFrame | None = None,
) -> str:
    """The whole report as one HTML document (no external references).

    ``batch_selection_section`` is the HTML section the batch_selection pipeline writes
    (None until that separate experiment has run).
    """
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{_escape(title)}</h1>"]
    parts.append(_setup_section(setup, ordering_status, histories, parameters, null_ordering))
    parts.append(_claims_section(claims, alpha, null_ordering))
    parts.append(_comparisons_section(comparisons))
    parts.append(_confounds_section(confounds))
    if position_effects is not None:
        parts.append(_position_section(position_effects))
    parts.append(_trace_section(trace_check, null_ordering))
    parts.append(_best_worst_section(best_worst))
    parts.append(_skipped_section(ordering_status))
    parts.append(batch_selection_section or (
        "<h2>Do the best batches train faster?</h2><p>Not run yet: <code>kedro run "
        "--pipeline=batch_selection</code> (about 7 minutes on a 2-core CPU), then <code>kedro run "
        "--pipeline=visualize</code> to include its answer here.</p>"))
    parts.append("<h2>Figures</h2>")
    for section, pngs in figures.items():
        parts.append(f"<h3>{_escape(section.replace('_', ' '))}</h3>")
        parts.extend(_figure_html(name, png, _caption(name)) for name, png in pngs.items())
    parts.append("</body></html>")
    return "\n".join(parts)


def _setup_section(setup, ordering_status, histories, parameters, null_ordering) -> str:
    lines = ["<h2>Setup</h2><ul>"]
    lines.append(f"<li>{setup['n_train']} training and {setup['n_test']} test images, {setup['n_classes']} classes.</li>")
    if setup.get("batch_size"):
        lines.append(f"<li>Batches of {setup['batch_size']} images, {setup['n_batches']} per epoch, in a fixed "
                     f"order per ordering ({setup.get('n_dropped', 0)} images with the largest sort keys left out).</li>")
    if "phases" in setup:
        lines.append(f"<li>{setup['n_epochs']} epochs in {len(setup['phases'])} learning-rate phases "
                     "(a phase = consecutive epochs with one learning rate, read from the training history):</li>")
    if setup.get("seeds"):
        seeds = setup["seeds"]
        lines.append(f"<li>{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}): every "
                     "ordering trains once per seed (other initial weights, the same batches); the tables and "
                     "heat maps pool the seeds, the claims show every seed's effect.</li>")
    lines.append(f"<li>Null control: the <b>{_escape(null_ordering)}</b> ordering (images assigned to batches at "
                 "random).</li></ul>")
    if "phases" in setup:
        lines.append(html_table(setup["phases"], {"phase": "phase", "first_epoch": "first epoch",
                                                  "last_epoch": "last epoch", "n_epochs": "epochs",
                                                  "learning_rate": "learning rate"}))
    lines.append("<h3>Orderings</h3>")
    table = ordering_status.copy()
    # Each seed's last epoch, averaged over the seeds.
    finals = {o: with_seed(h).sort_values("epoch").groupby("seed").last()[["train_accuracy", "test_accuracy",
                                                                             "test_loss"]].mean()
              for o, h in histories.items() if len(h)}
    for column in ("train_accuracy", "test_accuracy", "test_loss"):
        table[f"final_{column}"] = [finals[o][column] if o in finals else np.nan for o in table["ordering"]]
    table["reason"] = [r if s == "ok" else "see Skipped metrics" for r, s in zip(table["reason"], table["status"])]
    lines.append(html_table(table, {"ordering": "ordering", "status": "status", "reason": "reason",
                                    "n_epochs": "epochs", "n_phases": "phases", "n_batches": "batches",
                                    **({"n_seeds": "seeds"} if "n_seeds" in table else {}),
                                    "final_train_accuracy": "final train accuracy",
                                    "final_test_accuracy": "final test accuracy", "final_test_loss": "final test loss"}))
    lines.append(_provenance_html(ordering_status))
    shown = {k: parameters[k] for k in ("ingest_cifar", "score_metrics", "sort_batches", "gradient_training",
                                        "distance_analysis", "visualize") if k in parameters}
    lines.append("<details><summary>Parameters of this run</summary><pre>"
                 f"{_escape(json.dumps(shown, indent=2, default=str))}</pre></details>")
    return "\n".join(lines)


def _provenance_html(ordering_status: pd.DataFrame) -> str:
    """What each metric's scores rest on (the perceptual metric's weights: source and sha256), where recorded."""
    if "provenance" not in ordering_status:
        return ""
    recorded = ordering_status[ordering_status["provenance"].fillna("") != ""]
    if recorded.empty:
        return ""
    items = "".join(f"<li><b>{_escape(r.ordering)}</b>: {_escape(r.provenance)}</li>" for r in recorded.itertuples())
    return f"<h3>Pretrained weights</h3><ul>{items}</ul>"


def _short_verdict(verdict: str) -> str:
    """Verdicts as shown in tables: a skipped metric's long reason is listed once, under Skipped metrics."""
    if verdict.startswith("not tested (metric skipped"):
        return "not tested: metric skipped (reason under Skipped metrics)"
    return verdict


def _finding(row: pd.Series) -> str:
    """One claim row as a sentence with its numbers."""
    kind = " (class-stratified)" if row.get("stratified", False) else ""
    where = f"<b>{_escape(row.get('metric', row['ordering']))}{kind}, phase {int(row['phase'])}</b>"
    if row["verdict"] not in (*VERDICT_COLORS, CONTROL_FAILS, FIXED_ORDER):
        return f"<li>{where}: {_escape(_short_verdict(row['verdict']))}.</li>"
    direction = "closer to" if row["expected_sign"] < 0 else "farther from"
    text = (f"<li>{where}: claim “{_escape(row['group'])} {direction} the full gradient than the "
            f"{_escape(row['rest'])}” — <b>{_escape(row['verdict'])}</b> (rank-biserial "
            f"{_format(row['rank_biserial'], 2)}, Holm p {_format(row['p_holm'])}; mean difference "
            f"{row['difference']:+.2f} z, {_format(row.get('ratio_difference'), 3)} in noise ratio")
    n_seeds = row.get("n_seeds", 1)
    if pd.notna(n_seeds) and n_seeds > 1:
        text += (f"; seeds agreeing in sign: {int(row['seeds_agreeing'])} of {int(n_seeds)}, "
                 f"{_escape(row['seed_differences'])}")
    text += ")"
    if row["verdict"] == CONTROL_FAILS:
        text += (f"; the test alone says <b>{_escape(row['test_verdict'])}</b>, but the control "
                 f"{_escape(row['control'])} itself gets <b>{_escape(row['control_verdict'])}</b> for this comparison "
                 "and phase, so the design, not the metric, can produce it")
    elif row["verdict"] == FIXED_ORDER:
        text += (f"; the test alone says <b>{_escape(row['test_verdict'])}</b>, but in the fixed order a batch's rank "
                 "is its place in the epoch")
    elif row.get("pooled_verdict", row["verdict"]) != row.get("test_verdict", row["verdict"]):
        text += (f"; the pooled test alone says <b>{_escape(row['pooled_verdict'])}</b>, but not every seed's "
                 "effect has its sign")
    if row.get("adjusted_test") == "freedman-lane":
        text += (f"; class composition held fixed by regression (Freedman-Lane): <b>"
                 f"{_escape(row['adjusted_verdict'])}</b> (coefficient {row['adjusted_difference']:+.2f} z, Holm p "
                 f"{_format(row['adjusted_p_holm'])}, R² of the group on the composition "
                 f"{_format(row['composition_r2'], 2)})")
    elif isinstance(row.get("adjusted_test"), str) and row["adjusted_test"].startswith(NOT_SEPARABLE):
        text += (f"; the group is not separable from the class composition (R² {_format(row['composition_r2'], 2)}):"
                 " no adjusted verdict")
    return text + ".</li>"


def _answer_lines(claims: pd.DataFrame) -> list[str]:
    """One line per claim and phase of the metric: plain and stratified readings and the attribution."""
    if "attribution" not in claims:
        return []
    table = claim_answers(claims)
    if table.empty:
        return []
    table = table.assign(**{column: table[column].map(_short_verdict) for column in ("plain", "adjusted", "stratified")})
    return ["<h3>Metric or class mix?</h3><p>Each claim in its plain ordering (the paper's batches), the same "
            "with the class composition held fixed by regression, and in the class-stratified ordering (every "
            "batch the same number of images of each class: class fixed by design). <b>Attribution</b>: "
            "<i>metric</i> when the stratified ordering has a verdict; <i>class mix</i> when only the plain ordering "
            "has one (no effect was detected with class held fixed: absence of evidence at this size, see the "
            "calibration in docs/analysis.md, not proof that the metric does nothing); <i>none detected</i>; "
            "<i>not assessed</i> when a reading is gated or confounded.</p>"
            + html_table(table, {"claim": "claim", "metric": "metric", "phase": "phase", "plain": "plain ordering",
                                 "adjusted": "plain, composition held fixed", "stratified": "stratified ordering",
                                 "attribution": "attribution"})]


def _claims_section(claims: pd.DataFrame, alpha: float, null_ordering: str) -> str:
    tested = claims[claims["verdict"].isin([*VERDICT_COLORS, CONTROL_FAILS, FIXED_ORDER])]
    counts = tested["verdict"].value_counts().to_dict()
    summary = ", ".join(f"{counts.get(v, 0)} {v}" for v in (*VERDICT_COLORS, CONTROL_FAILS, FIXED_ORDER)
                        if counts.get(v, 0) or v in VERDICT_COLORS)
    orders = set(claims.get("batch_order", pd.Series(dtype=str)).dropna())
    lines = [
        "<h2>The paper's claims, tested</h2>",
        f"<p><b>Tested: {len(tested)}; {summary}. Not tested: {len(claims) - len(tested)}.</b> Each count is of "
        "rows: one claim, for one ordering (a metric's plain or class-stratified batches), in one phase.</p>",
    ]
    if "fixed" in orders:
        lines.append("<p><b>This run trained its batches in the paper's fixed order</b>: a batch's rank in the sorted "
                     "metric is also its place in the epoch, and the batches trained last shaped the parameters "
                     "every batch is probed at. Every verdict is therefore labelled <i>confounded: fixed order</i> "
                     "(the test's own result is in column <i>test verdict</i>); "
                     "<code>gradient_training.batch_order: shuffled</code> (the default) removes the confound.</p>")
    lines += [
        "<ul>" + "".join(_finding(row) for _, row in claims.iterrows()) + "</ul>",
        *_answer_lines(claims),
        f"<p class='note'><b>How a verdict is reached.</b> Units are batches; each contributes its mean distance "
        f"over the phase's epochs and the seeds in noise units (the z-score against random batches probed by "
        f"<i>the same network at the same parameters</i>, <code>gradient_training.null_batches</code>, with one "
        f"noise scale pooled over the phase's epochs and seeds). The primary statistic is the "
        f"<b>rank-biserial correlation</b> of group vs rest (negative = the group is closer to the full gradient), "
        f"tested by permuting the group labels (the Mann-Whitney test): a few far-out batches (single-class ones "
        f"sit 2-4 z out) cannot hide a shift of the bulk, as they can a mean difference (shown beside it, with the "
        f"difference in noise ratio, which does not depend on the null's scale). A claim is <b>supported</b> when "
        f"its Holm-adjusted p-value is below α = {alpha:g}, the effect has the claimed sign <b>and every seed "
        f"agrees</b>; <b>contradicted</b> likewise with the opposite sign; <b>undecided</b> otherwise. "
        f"<b>One Holm family</b> holds every p-value the verdicts read: the primary and the class-adjusted test of "
        f"every tested row. <b>The gate:</b> each ordering's control (the {_escape(null_ordering)} ordering of the "
        f"same kind: plain or stratified, trained with its own random batching per seed) gets the same test at the "
        f"unadjusted α; when the control itself gets a verdict, the claim reads <i>{CONTROL_FAILS}</i>. "
        f"<b>Class composition:</b> for plain orderings, Freedman-Lane's permutation test of the group's "
        f"coefficient in distance ~ group + class counts; a group that the composition predicts with R² above 0.9 "
        f"is <i>not separable</i>. An effect that is undecided after adjustment is <i>not</i> thereby explained by "
        f"class (the adjustment removes power along with the confound); the stratified ordering is the designed "
        f"comparison.</p>",
        "<p class='note'><b>Seeds.</b> Every ordering trains once per seed of <code>gradient_training.seeds</code>. "
        "A metric's batches are the same in every seed; a control draws its own batching per seed, so its "
        "agreement across seeds is a replication of the batching. Each seed's own effect is in column <i>per "
        "seed</i> (table <code>batch_group_comparisons_by_seed</code>); <i>pooled verdict</i> keeps the pooled "
        "test's verdict without the seed rule.</p>",
    ]
    shown = claims.assign(**{column: claims[column].map(_short_verdict)
                             for column in ("verdict", "adjusted_verdict", "test_verdict", "pooled_verdict",
                                            "control_verdict") if column in claims})
    colors = [VERDICT_COLORS.get(v, "#fff7d6") for v in claims["verdict"]]
    lines.append(html_table(shown, {
        "claim": "claim (paper, section 5)", "ordering": "ordering", "phase": "phase", "expected": "expected",
        "batch_order": "order", "n_group": "n group", "n_rest": "n rest", "rank_biserial": "rank-biserial",
        "p_value": "p", "p_holm": "p (Holm)", "difference": "mean difference (z)",
        "ratio_difference": "difference (noise ratio)", "distance_difference": "difference (raw distance)",
        **{column: title for column, title in (("n_seeds", "seeds"), ("seeds_agreeing", "seeds agreeing in sign"),
                                               ("seed_differences", "rank-biserial per seed"),
                                               ("pooled_verdict", "pooled verdict"),
                                               ("test_verdict", "test verdict"),
                                               ("control", "control"), ("control_verdict", "control's verdict"))
           if column in shown},
        "verdict": "verdict",
        "adjusted_difference": "group coefficient, composition fixed (z)", "composition_r2": "R² group ~ composition",
        "adjusted_p_holm": "p (Holm), composition fixed",
        **({"adjusted_seeds_agreeing": "seeds agreeing, composition fixed"}
           if "adjusted_seeds_agreeing" in shown else {}),
        "adjusted_verdict": "verdict, composition fixed",
        **({"attribution": "attribution"} if "attribution" in shown else {}),
    }, colors))
    return "\n".join(lines)


def _comparisons_section(comparisons: pd.DataFrame) -> str:
    return ("<details><summary>Every ordering × phase × comparison (including the controls, which should "
            "show nothing); Holm over this whole table (a screening view: the verdicts' family is the claims "
            "table)</summary>"
            + html_table(comparisons, {
                "ordering": "ordering", "phase": "phase", "comparison": "comparison", "n_group": "n group",
                "n_rest": "n rest", "rank_biserial": "rank-biserial", "p_value": "p", "p_holm": "p (Holm)",
                "mean_group": "mean group (z)", "mean_rest": "mean rest (z)", "difference": "mean difference",
                "mean_p_value": "p (mean difference)", "cohens_d": "Cohen's d",
                **{c: t for c, t in (("seeds_agreeing", "seeds agreeing in sign"), ("n_seeds", "seeds"),
                                     ("seed_differences", "rank-biserial per seed")) if c in comparisons},
                "adjusted_test": "composition held fixed", "adjusted_difference": "group coefficient (z)",
                "composition_r2": "R² group ~ composition", "adjusted_p_holm": "p (Holm), composition fixed",
                "test": "test"})
            + "</details>")


def _confounds_section(confounds: pd.DataFrame) -> str:
    if confounds.empty:
        return "<h2>Confounds</h2><p>No orderings with distances.</p>"
    table = confounds.assign(
        interval=[f"[{_format(lo, 2)}, {_format(hi, 2)}]" for lo, hi in zip(confounds["ci_low"], confounds["ci_high"])]
    )
    confidence = float(confounds["confidence"].iloc[0])
    colors = ["#fff7d6" if flag else "" for flag in table["ci_excludes_zero"]]
    return ("<h2>Confounds</h2><p>Per ordering and phase: Spearman rank correlation of the batch's metric "
            "value and of its class entropy with its mean distance (noise units), and the metric's partial "
            f"correlation given class entropy; {confidence:.0%} bootstrap intervals over batches. Highlighted: "
            "interval excludes zero. A metric correlation that disappears in the partial one is carried by the "
            "class mix.</p>"
            + html_table(table, {"ordering": "ordering", "phase": "phase", "description": "correlation",
                                 "spearman": "ρ", "interval": "interval", "n_batches": "batches"}, colors))


def _position_section(effects: pd.DataFrame) -> str:
    heading = "<h2>Place in the epoch</h2>"
    if effects.empty:
        return heading + "<p>No ordering has two consecutive epochs of distances.</p>"
    fixed = bool((effects["batch_order"] == "fixed").all())
    table = effects.assign(**{
        f"{name}_text": ["–" if pd.isna(m) else f"{_format(m, 2)} ± {_format(se, 2)} ({n} of {u} negative)"
                         for m, se, n, u in
                         zip(effects[f"{name}_spearman"], effects[f"{name}_se"], effects[f"{name}_negative"],
                             effects["n_units"])]
        for name in ("rank", "previous_position", "rank_given_position")})
    note = ("All runs trained their batches in the paper's fixed order, so a batch's rank is also its place in the "
            "epoch and the two cannot be told apart; rerun gradient_training with "
            "<code>--params gradient_training.batch_order=shuffled</code> to separate them." if fixed else
            "With a shuffled order the rank and the place in the previous epoch vary independently; the partial "
            "correlation is the rank's association with distance that the place does not carry.")
    return (heading + "<p>Per ordering and phase, within each epoch (after the first) and seed: Spearman correlation "
            "of a batch's distance with its rank in the sorted order and with its place in the previous epoch (the "
            "epoch whose steps made the parameters it is probed at; larger = trained more recently), and the rank's "
            "partial correlation given that place; the mean over seed-epochs ± its standard error with the batching "
            "as the unit (seed-epochs of one batching share its batches; a metric has one batching, so no standard "
            "error; a control has one per seed). " + note + "</p>"
            + html_table(table, {"ordering": "ordering", "phase": "phase", "batch_order": "order",
                                 "rank_text": "ρ(rank)", "previous_position_text": "ρ(place in previous epoch)",
                                 "rank_given_position_text": "ρ(rank | place)", "n_units": "seed-epochs",
                                 **({"n_batchings": "batchings"} if "n_batchings" in effects else {}),
                                 "n_batches": "batches"}))


def _trace_section(trace_check: pd.DataFrame, null_ordering: str) -> str:
    lines = ["<h2>Gradient-noise cross-check</h2>",
             f"<p>For the {_escape(null_ordering)} ordering's batches, sampling theory (without replacement, "
             "batch gradient = mean of per-example gradients) gives E‖g_k − g_full‖² = tr(Σ)/m · (N − m)/(N − 1), "
             "with tr(Σ) the mean squared deviation of the per-example gradients (1/N normalisation). "
             "BatchNorm in training mode breaks the premise, so a ratio away from 1 measures its effect.</p>"]
    summary = summarise_trace_check(trace_check)
    if summary.empty:
        lines.append("<p><b>Not measured</b>: the training history carries no <code>gradient_variance_trace</code> "
                     "(with <code>n_train</code> and <code>batch_size</code>).</p>")
    else:
        lines.append(html_table(summary, {"phase": "phase", "n_epochs": "epochs measured",
                                          "median_ratio": "median observed / expected", "min_ratio": "min",
                                          "max_ratio": "max"}))
    return "\n".join(lines)


def _best_worst_section(best_worst: pd.DataFrame) -> str:
    return ("<h2>Best and worst batches</h2><details><summary>Per ordering and phase, by mean noise-unit "
            "distance (images: figures below)</summary>" + html_table(best_worst, {
                "ordering": "ordering", "phase": "phase", "kind": "kind", "rank": "rank", "batch": "batch",
                "noise_z_mean": "mean z", "noise_ratio_mean": "mean ratio to random", "distance_mean": "mean distance",
                "metric_mean": "batch metric mean", "class_entropy": "class entropy"}) + "</details>")


def _skipped_section(ordering_status: pd.DataFrame) -> str:
    skipped = ordering_status[ordering_status["status"] != "ok"]
    if skipped.empty:
        return "<h2>Skipped metrics</h2><p>None: every ordering ran.</p>"
    items = "".join(f"<li><b>{_escape(r.ordering)}</b> ({_escape(r.status)}): {_escape(r.reason)}</li>"
                    for r in skipped.itertuples())
    return f"<h2>Skipped metrics</h2><ul>{items}</ul>"
