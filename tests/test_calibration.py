"""Calibration and power of the claim family, on simulated worlds cut from real CIFAR-10 labels.

A metric that scores images with seeded random numbers is registered here only (it never
reaches the project's registry outside this module): every ordering of a null world is cut
from it by the project's own sort_batches (plain and stratified; the control with one batching
per seed), distances get a class-composition term, a persistent batch term, a place-in-the-epoch
term and noise (best_minibatch.analysis.calibration), and the project's own analysis gives the
verdicts. scripts/calibration.py prints the same figures with more worlds (docs/analysis.md).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from best_minibatch.analysis import calibration as cal
from best_minibatch.analysis import statistics as analysis
from best_minibatch.metrics.scoring import METRICS, register_metric

TEST_METRIC = "seeded_random_for_tests"
WORLD = cal.SimulatedWorld(n_seeds=2, phase_epochs=(2, 2, 2), recency=2.0)
PERMUTATIONS = 1000
ALPHA = 0.05


@pytest.fixture(scope="module")
def null_metric():
    """A metric of seeded uniform random scores, registered for this module only."""
    @register_metric(TEST_METRIC, description="test only: seeded uniform random scores", defaults={"seed": 0})
    def seeded_random(images, options):
        return pd.DataFrame({"score": np.random.default_rng(options["seed"]).random(len(images))})

    yield METRICS[TEST_METRIC]
    del METRICS[TEST_METRIC]


@pytest.fixture(scope="module")
def world_inputs(sample_dataset, null_metric):
    index = sample_dataset.index
    train = index[index["split"] == "train"].sort_values("row")
    labels = np.zeros(int(train["image_id"].max()) + 1, dtype=np.int64)
    labels[train["image_id"].to_numpy()] = train["label"].to_numpy()
    images = sample_dataset.images["train"].numpy()

    def score(name: str, draw: int) -> pd.DataFrame:
        seed = int(cal.world_seed("scores", draw, name).integers(2**31))
        scores = null_metric.score(images, {"seed": seed})
        return scores.assign(image_id=train["image_id"].to_numpy())[["image_id", "score"]]

    return index, labels, score


def null_worlds(world_inputs, order: str, worlds: int) -> list[pd.DataFrame]:
    index, labels, score = world_inputs
    tables = []
    for draw in range(worlds):
        batchings = cal.null_batchings(index, TEST_METRIC, 100, draw, score, WORLD.n_seeds)
        run = cal.simulate_run(batchings, labels, WORLD, order, cal.world_seed("test world", draw, order))
        tables.append(cal.analyse(run, PERMUTATIONS, alpha=ALPHA))
    return tables


def binomial_bound(n: int, p: float = ALPHA, level: float = 0.999) -> float:
    """The share a Binomial(n, p) count stays below with probability ``level``."""
    return float(stats.binom.ppf(level, n, p) / n)


def test_the_null_worlds_are_cut_by_the_project_from_the_test_metric(world_inputs):
    index, _, score = world_inputs
    batchings = cal.null_batchings(index, TEST_METRIC, 100, 0, score, WORLD.n_seeds)
    assert set(batchings) == {f"{m}{s}" for m in cal.SIMULATED_METRICS for s in ("", "_stratified")}
    assignments, summary = batchings["random"]
    assert sorted(summary["batching"].unique()) == [0, 1]  # the control: one batching per seed
    assert (assignments["metric"] == "random").all()  # the project's control metric
    assert (batchings["intensity"][0]["metric"] == TEST_METRIC).all()
    assert sorted(batchings["intensity"][1]["batching"].unique()) == [0]  # a metric: one batching
    counts = batchings["edges_stratified"][1].filter(like="class_count_")
    assert (counts.to_numpy() == 10).all()  # 100 per batch, 10 classes: class held fixed


@pytest.mark.slow
def test_the_false_verdict_rate_under_the_null_stays_within_a_binomial_bound_of_alpha_shuffled(world_inputs):
    """Shuffled order (the default): the primary test's per-row rate of p < alpha is within a binomial bound
    of alpha, and so is the share of claim families with any decided final verdict (Holm's family-wise level)."""
    tables = null_worlds(world_inputs, "shuffled", worlds=15)
    rates = cal.verdict_rates(tables)
    raw = np.concatenate([t["p_value"].to_numpy(float) for t in tables])
    adjusted = np.concatenate([t["adjusted_p_value"].dropna().to_numpy(float) for t in tables])
    assert (raw < ALPHA).mean() <= binomial_bound(len(raw))
    assert (adjusted < ALPHA).mean() <= binomial_bound(len(adjusted))
    assert rates["final_worlds"] <= binomial_bound(rates["worlds"])
    assert rates["adjusted_final_worlds"] <= binomial_bound(rates["worlds"])
    # the primary p-values are not piled at 1 either (a test that never rejects would pass the bounds above)
    assert 0.3 < np.median(raw) < 0.7


@pytest.mark.slow
def test_the_place_in_the_epoch_gives_no_verdict_once_the_fixed_order_is_labelled(world_inputs):
    """Fixed order: rank is the place in the epoch; whatever the tests say, every reading is the confound label."""
    tables = null_worlds(world_inputs, "fixed", worlds=6)
    for table in tables:
        tested = table[~table["verdict"].str.startswith("not tested")]
        assert set(tested["verdict"]) == {analysis.FIXED_ORDER}
    assert cal.verdict_rates(tables)["final_rows"] == 0.0


@pytest.mark.slow
def test_a_planted_shift_of_one_between_batch_sd_is_detected(world_inputs):
    """Power: intensity's upper quartile closer by 1.0 between-batch sd in phase 1 (both of its orderings) is
    called supported in the stratified ordering or after Freedman-Lane's adjustment in most worlds, and never
    contradicted; 0.5 sd is detected less often."""
    index, labels, score = world_inputs
    found = {}
    for shift in (0.5, 1.0):
        readings = []
        for draw in range(8):
            batchings = cal.null_batchings(index, TEST_METRIC, 100, draw, score, WORLD.n_seeds)
            planted = cal.planted_shift(WORLD, batchings, "intensity", shift)
            run = cal.simulate_run(batchings, labels, WORLD, "shuffled", cal.world_seed("power", draw, shift),
                                   planted)
            claims = cal.analyse(run, PERMUTATIONS).set_index(["claim_id", "ordering", "phase"])
            key = "first_phase_upper_quartile_closest"
            readings.append((claims.loc[(key, "intensity_stratified", 1), "verdict"],
                             claims.loc[(key, "intensity", 1), "adjusted_verdict"]))
        assert not any("contradicted" in pair for pair in readings)
        found[shift] = np.mean(["supported" in pair for pair in readings])
    assert found[1.0] >= 0.5
    assert found[1.0] >= found[0.5]
