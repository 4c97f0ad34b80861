"""Tests of ``best_minibatch.analysis.report``: the HTML report states the setup, lists every ordering and the claims."""

from __future__ import annotations

import base64
import re

import numpy as np
import pandas as pd
import pytest

from best_minibatch.analysis import report
from best_minibatch.analysis import statistics as analysis
from tests.test_analysis import SKIP_REASON, planted_effects, run_analysis, synthetic_run

PNG = b"\x89PNG\r\n\x1a\nfake"


def _report(with_trace=False, skipped=("perceptual",), figures=None, reason=SKIP_REASON, batch_selection_section=None,
            seeds=None, seed_effects=None, batch_order="shuffled"):
    run = synthetic_run(effects=planted_effects(20), n_batches=20, phase_lengths=(2, 2, 2), skipped=skipped,
                        with_trace=with_trace, seeds=seeds, seed_effects=seed_effects, batch_order=batch_order)
    if skipped:
        run["orderings"][skipped[0]]["metric_status"]["reason"] = reason
    result = run_analysis(run, n_permutations=1000)
    noise_units = result["noise_units"]
    histories = {o: t["training_history"] for o, t in run["orderings"].items()}
    trace = analysis.gradient_noise_trace_check(noise_units[noise_units["ordering"] == "random"], histories["random"])
    setup = report.run_setup(histories, {o: t["batch_assignments"] for o, t in run["orderings"].items()},
                             run["image_index"])
    page = report.render_report(
        setup=setup, ordering_status=result["status"], claims=result["claims"], comparisons=result["comparisons"],
        confounds=analysis.confound_correlations(result["batch_stats"], n_bootstrap=200),
        best_worst=analysis.best_and_worst_batches(result["batch_stats"]), trace_check=trace, histories=histories,
        figures=figures if figures is not None else {"distance_heatmaps": {"heatmap_edges": PNG},
                                                     "training_curves": {"training_curves": PNG}},
        parameters={"distance_analysis": {"alpha": 0.05}, "unrelated": {"x": 1}}, null_ordering="random",
        alpha=0.05, title="A report", batch_selection_section=batch_selection_section,
        position_effects=analysis.position_effects(noise_units),
    )
    return page, result, setup


@pytest.fixture(scope="module")
def page_and_result():
    return _report()


def test_setup_is_read_off_the_tables(page_and_result):
    page, _, setup = page_and_result
    assert setup["n_train"] == 83 and setup["batch_size"] == 4 and setup["n_batches"] == 20
    assert setup["n_dropped"] == 3 and setup["n_epochs"] == 6
    assert setup["phases"]["learning_rate"].tolist() == [0.1, 0.01, 0.001]
    assert "83 training and 0 test images, 4 classes" in page
    assert "Batches of 4 images, 20 per epoch" in page
    assert "6 epochs in 3 learning-rate phases" in page


def test_report_lists_every_ordering_and_the_skipped_metric_with_its_reason(page_and_result):
    page, result, _ = page_and_result
    for ordering in result["status"]["ordering"]:
        assert f"<td>{ordering}</td>" in page
    skipped_section = page.split("<h2>Skipped metrics</h2>")[1].split("<h2>")[0]
    assert f"<b>perceptual</b> (skipped): {SKIP_REASON}" in skipped_section


def test_report_holds_every_claim_with_its_verdict_and_numbers(page_and_result):
    page, result, _ = page_and_result
    claims_section = page.split("<h2>The paper's claims, tested</h2>")[1].split("<h2>")[0]
    rows = re.findall(r"<tr style=[^>]*>(.*?)</tr>", claims_section)
    assert len(rows) == len(result["claims"])
    for row, (_, claim) in zip(rows, result["claims"].iterrows()):
        assert f"<td>{report._short_verdict(claim['verdict'])}</td>" in row
        assert f"<td>{claim['ordering']}</td><td class=\"num\">{claim['phase']}</td>" in row
        if claim["verdict"] in report.VERDICT_COLORS:
            assert f"{claim['difference']:.3f}" in row
    tested = result["claims"]["verdict"].isin(report.VERDICT_COLORS)
    counts = result["claims"].loc[tested, "verdict"].value_counts()
    assert (f"Tested: {tested.sum()}; {counts.get('supported', 0)} supported, "
            f"{counts.get('contradicted', 0)} contradicted, {counts.get('undecided', 0)} undecided.") in claims_section


def test_report_states_each_finding_with_its_control_and_class_readings():
    page, _, _ = _report()
    findings = page.split("<h2>The paper's claims, tested</h2>")[1].split("</ul>")[0]
    assert findings.count("<li>") == 12  # 9 tested rows; perceptual skipped: phase 1, and phases 2 and 3
    assert ("<b>intensity, phase 1</b>: claim “upper quartile of the metric closer to the full gradient than the "
            "other 75%” — <b>supported</b>") in findings
    assert "<b>perceptual, phase 1</b>: not tested: metric skipped" in findings
    for phase in (2, 3):  # like the tested metrics' rows of the claim about later phases
        assert f"<b>perceptual, phase {phase}</b>: not tested: metric skipped" in findings
    assert "Tested: 9;" in page and "Not tested: 3.</b>" in page
    assert "class composition held fixed by regression (Freedman-Lane)" in findings
    # a control with the same effect gates the claim, and the sentence says why
    effect = np.where((np.arange(40) + 0.5) / 40 > 0.75, -3.0, 0.0)
    run = synthetic_run(phase_lengths=(3,), learning_rates=(0.1,), skipped=(), seed=3,
                        effects={("intensity", 1): effect, ("random", 1): effect})
    row = run_analysis(run, n_permutations=2000)["claims"].set_index(["claim_id", "ordering"]).loc[
        ("first_phase_upper_quartile_closest", "intensity")]
    sentence = report._finding(pd.concat([row, pd.Series({"ordering": "intensity"})]))
    assert "<b>invalid: control fails</b>" in sentence and "the control random itself gets <b>supported</b>" in sentence
    # a fixed-order run: every reading is the confound label, the test's own result beside it
    page, _, _ = _report(batch_order="fixed", figures={})
    assert "This run trained its batches in the paper's fixed order" in page
    assert "<b>confounded: fixed order</b>" in page


def test_report_is_self_contained_with_embedded_figures(page_and_result):
    page, _, _ = page_and_result
    assert page.count(f'src="data:image/png;base64,{base64.b64encode(PNG).decode()}"') == 2
    assert "http://" not in page and "https://" not in page
    assert "&quot;unrelated&quot;" not in page and "&quot;distance_analysis&quot;" in page


def test_trace_check_is_reported_as_not_measured_or_with_its_ratio(page_and_result):
    page, _, _ = page_and_result
    assert "<b>Not measured</b>" in page
    measured, _, _ = _report(with_trace=True, figures={})
    section = measured.split("<h2>Gradient-noise cross-check</h2>")[1].split("<h2>")[0]
    assert "Not measured" not in section
    assert section.count("<td class=\"num\">0.800</td>") == 4 * 3  # phases 1-3 and all: median, min, max


def test_report_escapes_text_from_the_tables():
    page, _, _ = _report(reason="weights <missing> & more", figures={})
    assert "weights &lt;missing&gt; &amp; more" in page
    assert "<missing>" not in page


def test_report_without_skipped_metrics_says_so():
    page, _, _ = _report(skipped=(), figures={})
    assert "<h2>Skipped metrics</h2><p>None: every ordering ran.</p>" in page


def test_report_includes_batch_selection_once_it_has_run(page_and_result):
    page, _, _ = page_and_result
    assert "Not run yet" in page and "--pipeline=batch_selection" in page
    section = '<section id="batch-selection"><h2>Do the best batches train faster?</h2><p>No.</p></section>'
    page_with, _, _ = _report(batch_selection_section=section)
    assert section in page_with and "Not run yet" not in page_with


def test_report_shows_each_seeds_effect_and_the_agreement_rule():
    """Three seeds; in phase 1 seed 2 has intensity's upper-quartile effect the other way round."""
    upper = np.where((np.arange(20) + 0.5) / 20 > 0.75, 1.0, 0.0)
    page, result, setup = _report(seeds=(0, 1, 2), seed_effects={("intensity", 1, 2): upper}, figures={})
    assert setup["seeds"] == [0, 1, 2]
    assert "3 seeds (0, 1, 2): every ordering trains once per seed" in page
    assert ("A claim is <b>supported</b> when its Holm-adjusted p-value is below α = 0.05, the effect has the "
            "claimed sign <b>and every seed agrees</b>") in page
    row = result["claims"].set_index(["claim_id", "ordering", "phase"]).loc[
        ("first_phase_upper_quartile_closest", "intensity", 1)]
    assert (row["pooled_verdict"], row["verdict"], row["seeds_agreeing"]) == ("supported", "undecided", 2)
    findings = page.split("<h2>The paper's claims, tested</h2>")[1].split("</ul>")[0]
    sentence = next(item for item in findings.split("<li>") if item.startswith("<b>intensity, phase 1</b>"))
    assert "<b>undecided</b>" in sentence and "seeds agreeing in sign: 2 of 3, seed 0: " in sentence
    assert "the pooled test alone says <b>supported</b>, but not every seed's effect has its sign" in sentence
    table = page.split("<h2>The paper's claims, tested</h2>")[1].split("<h2>")[0]
    assert "<th>rank-biserial per seed</th>" in table and "<th>seeds agreeing in sign</th>" in table
    assert f"<td>{row['seed_differences']}</td>" in table
    # The orderings table: the seed count, and final accuracies as the seeds' mean (the synthetic seeds' final
    # test accuracies are 0.60, 0.58 and 0.56).
    orderings = page.split("<h3>Orderings</h3>")[1].split("</table>")[0]
    assert "<th>seeds</th>" in orderings
    intensity = next(r for r in orderings.split("<tr>") if r.startswith("<td>intensity</td>"))
    assert '<td class="num">3</td>' in intensity and '<td class="num">0.580</td>' in intensity


def test_report_says_a_fixed_order_cannot_tell_rank_from_place():
    page, result, _ = _report(batch_order="fixed", figures={})
    section = page.split("<h2>Place in the epoch</h2>")[1].split("<h2>")[0]
    assert "batch_order=shuffled" in section and "cannot be told apart" in section
    assert section.count("<td>fixed</td>") == len(result["noise_units"].groupby(["ordering", "phase"]))


def test_report_says_a_shuffled_order_separates_rank_from_place(page_and_result):
    section = page_and_result[0].split("<h2>Place in the epoch</h2>")[1].split("<h2>")[0]
    assert "With a shuffled order the rank and the place in the previous epoch vary independently" in section
    assert "with the batching as the unit" in section
