"""Tests of ``best_minibatch.analysis.statistics``: phases, noise units, the claims as tests, confounds, the trace identity.

``synthetic_run`` builds every input table of the analysis with the schemas of
``docs/data_flow.md``; the figure, report and pipeline tests reuse it.
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from best_minibatch.analysis import statistics as analysis
from best_minibatch.training.probing import batch_gradient, distance_measures

CLASS_NAMES = ("airplane", "automobile", "bird", "cat")
ORDERINGS = ("intensity", "color", "edges", "perceptual", "random")
SKIP_REASON = "LPIPS AlexNet weights not found at /nowhere/alexnet.pth"


def _class_mix(rng: np.random.Generator, batch_size: int, n_batches: int) -> np.ndarray:
    """Label of each of ``n_batches * batch_size`` images, batch by batch, with varied class balance."""
    labels = []
    for _ in range(n_batches):
        weights = rng.dirichlet(np.full(len(CLASS_NAMES), 2.0))
        labels.append(rng.choice(len(CLASS_NAMES), size=batch_size, p=weights))
    return np.concatenate(labels)


def synthetic_run(
    orderings=ORDERINGS,
    phase_lengths=(3, 3, 3),
    learning_rates=(0.1, 0.01, 0.001),
    n_batches=40,
    batch_size=4,
    effects=None,
    skipped=("perceptual",),
    noise=1.0,
    seed=0,
    with_trace=False,
    seeds=None,
    seed_effects=None,
    batch_order="shuffled",
    class_effect=0.0,
    class_trend=False,
):
    """All inputs of ``distance_analysis`` and ``visualize`` for a fake run.

    ``batch_order``: ``shuffled`` (the default: a fresh order of the batches every epoch,
    recorded in ``position``) or ``fixed`` (batch k at step k, the paper's order).
    ``class_effect``: noise units added per image of the first class above the batch size's
    share (a pure class-composition effect, whatever the metric); ``class_trend``: a metric
    ordering's batches hold more images of the first class the higher their rank (as bright
    images are often planes), so the class effect looks like a metric effect. An ordering named
    ``<metric>_stratified`` gets batches with the same number of images of each class.

    ``effects[(ordering, phase)]`` is an array of per-batch offsets in noise units
    (standard deviations of the random batches of the epoch) added to that
    ordering's distances in that phase. Each epoch has its own gradient scale
    (falling by orders of magnitude with the phase), so raw distances of different
    phases are not comparable but noise units are.

    ``seeds``: training seeds (``None``: one run, tables without a ``seed`` column,
    as written before seeds existed); each seed gets its own noise, and
    ``seed_effects[(ordering, phase, seed)]`` replaces ``effects`` for that seed.
    """
    effects = effects or {}
    seed_effects = seed_effects or {}
    rng = np.random.default_rng(seed)
    n_train = n_batches * batch_size + 3  # three images are dropped by every ordering
    labels = rng.integers(0, len(CLASS_NAMES), size=n_train)
    image_index = pd.DataFrame(
        {
            "image_id": np.arange(n_train, dtype=np.int64),
            "split": "train",
            "row": np.arange(n_train, dtype=np.int64),
            "label": labels.astype(np.int64),
            "class_name": [CLASS_NAMES[i] for i in labels],
            "source": [f"synthetic:{i}" for i in range(n_train)],
        }
    )
    train_images = torch.from_numpy(rng.integers(0, 256, size=(n_train, 8, 8, 3), dtype=np.uint8))
    epochs, epoch_rates, epoch_phases = [], [], []
    for phase, (length, rate) in enumerate(zip(phase_lengths, learning_rates), start=1):
        for _ in range(length):
            epochs.append(len(epochs) + 1)
            epoch_rates.append(rate)
            epoch_phases.append(phase)
    scale = {e: 10.0 * rate * (1 + 0.1 * e) for e, rate in zip(epochs, epoch_rates)}
    run = {"image_index": image_index, "train_images": train_images, "orderings": {}}
    for ordering in orderings:
        tables = {}
        if ordering in skipped:
            tables["metric_status"] = {"metric": ordering, "status": "skipped", "reason": SKIP_REASON}
            tables["null_distances"] = pd.DataFrame({"epoch": pd.Series(dtype="int64"),
                                                     "draw": pd.Series(dtype="int64"),
                                                     "distance": pd.Series(dtype="float64")})
            tables["gradient_distances"] = pd.DataFrame(
                {c: pd.Series(dtype=t) for c, t in _DISTANCE_DTYPES.items()}
            )
            tables["training_history"] = pd.DataFrame({c: pd.Series(dtype=t) for c, t in _HISTORY_DTYPES.items()})
            tables["batch_summary"] = pd.DataFrame({c: pd.Series(dtype="float64") for c in ("batch", "metric_mean")})
            tables["batch_assignments"] = pd.DataFrame(
                {c: pd.Series(dtype="int64") for c in ("batch", "position", "image_id")}
            )
            run["orderings"][ordering] = tables
            continue
        tables["metric_status"] = {"metric": ordering, "status": "ok", "reason": None}
        # Trained without the same-parameter null: noise units fall back on the null ordering's batches.
        tables["null_distances"] = pd.DataFrame({"epoch": pd.Series(dtype="int64"), "draw": pd.Series(dtype="int64"),
                                                 "distance": pd.Series(dtype="float64")})
        image_ids = rng.permutation(n_train)[: n_batches * batch_size]
        assignments = pd.DataFrame(
            {
                "metric": ordering,
                "batch": np.repeat(np.arange(n_batches), batch_size),
                "position": np.tile(np.arange(batch_size), n_batches),
                "image_id": image_ids.astype(np.int64),
                "metric_value": np.sort(rng.normal(size=n_batches * batch_size)),
            }
        )
        tables["batch_assignments"] = assignments
        batch_labels = labels[image_ids].reshape(n_batches, batch_size)
        if ordering.endswith("_stratified"):  # one image of each class per batch (batch_size 4, 4 classes)
            batch_labels = np.tile(np.arange(len(CLASS_NAMES)), (n_batches, batch_size // len(CLASS_NAMES)))
        elif class_trend and not ordering.startswith("random"):
            rising = np.argsort((batch_labels == 0).sum(axis=1), kind="stable")
            batch_labels = batch_labels[rising]
            image_ids = image_ids.reshape(n_batches, batch_size)[rising].ravel()
            assignments["image_id"] = image_ids.astype(np.int64)
        counts = np.stack([(batch_labels == c).sum(axis=1) for c in range(len(CLASS_NAMES))], axis=1)
        class_offset = class_effect * (counts[:, 0] - batch_size / len(CLASS_NAMES))
        shares = counts / batch_size
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.nansum(np.where(shares > 0, shares * np.log(shares), 0.0), axis=1)
        metric_mean = assignments.groupby("batch")["metric_value"].mean().to_numpy()
        summary = pd.DataFrame(
            {
                "metric": ordering,
                "batch": np.arange(n_batches),
                "metric_min": assignments.groupby("batch")["metric_value"].min().to_numpy(),
                "metric_mean": metric_mean,
                "metric_max": assignments.groupby("batch")["metric_value"].max().to_numpy(),
                "class_entropy": entropy,
            }
        )
        for c, name in enumerate(CLASS_NAMES):
            summary[f"class_count_{name}"] = counts[:, c]
        tables["batch_summary"] = summary
        rows = []
        for run_seed, epoch, rate, phase in ((s, *e) for s in (seeds or (0,))
                                              for e in zip(epochs, epoch_rates, epoch_phases)):
            offset = effects.get((ordering, phase), np.zeros(n_batches))
            offset = seed_effects.get((ordering, phase, run_seed), offset)
            z = offset + class_offset + noise * rng.normal(size=n_batches)
            position = rng.permutation(n_batches) if batch_order == "shuffled" else np.arange(n_batches)
            distance = scale[epoch] * (1.0 + 0.05 * z)
            full = scale[epoch] * 0.5
            rows.append(
                pd.DataFrame(
                    {
                        "ordering": ordering,
                        **({"seed": run_seed} if seeds is not None else {}),
                        "epoch": epoch,
                        "phase": phase,
                        "learning_rate": rate,
                        "batch": np.arange(n_batches),
                        "distance": distance,
                        "cosine_similarity": rng.uniform(0.2, 0.9, size=n_batches),
                        "relative_distance": distance / full,
                        "grad_norm": distance + full,
                        "full_grad_norm": full,
                        "position": position,
                    }
                )
            )
        tables["gradient_distances"] = pd.concat(rows, ignore_index=True)
        histories = []
        for index, run_seed in enumerate(seeds or (0,)):
            own = tables["gradient_distances"]
            own = own[own["seed"] == run_seed] if seeds is not None else own
            histories.append(pd.DataFrame(
                {
                    "ordering": ordering,
                    **({"seed": run_seed} if seeds is not None else {}),
                    "epoch": epochs,
                    "phase": epoch_phases,
                    "learning_rate": epoch_rates,
                    "train_loss": np.linspace(2.0, 0.5, len(epochs)) + 0.05 * index,
                    "train_accuracy": np.linspace(0.2, 0.8, len(epochs)) - 0.02 * index,
                    "test_loss": np.linspace(2.1, 0.9, len(epochs)) + 0.05 * index,
                    "test_accuracy": np.linspace(0.2, 0.6, len(epochs)) - 0.02 * index,
                    "mean_distance": own.groupby("epoch")["distance"].mean().to_numpy(),
                    "seconds": 1.0,
                }
            ))
        history = pd.concat(histories, ignore_index=True)
        if with_trace:
            m, n = batch_size, n_train
            observed = tables["gradient_distances"].assign(sq=lambda t: t["distance"] ** 2)
            keys = ["seed", "epoch"] if seeds is not None else ["epoch"]
            observed = observed.groupby(keys)["sq"].mean().to_numpy()
            history["gradient_variance_trace"] = observed * m * (n - 1) / (n - m) * 1.25
            history["n_train"] = n
            history["batch_size"] = m
        tables["training_history"] = history
        run["orderings"][ordering] = tables
    return run


_DISTANCE_DTYPES = {
    "ordering": "str", "epoch": "int64", "phase": "int64", "learning_rate": "float64", "batch": "int64",
    "distance": "float64", "cosine_similarity": "float64", "relative_distance": "float64",
    "grad_norm": "float64", "full_grad_norm": "float64", "position": "int64",
}
_HISTORY_DTYPES = {
    "ordering": "str", "epoch": "int64", "phase": "int64", "learning_rate": "float64",
    "train_loss": "float64", "train_accuracy": "float64", "test_loss": "float64",
    "test_accuracy": "float64", "mean_distance": "float64", "seconds": "float64",
}


def run_analysis(run, null="random", n_permutations=5000, alpha=0.05):
    """The whole analysis on a ``synthetic_run``, as the pipeline does it, returning every table."""
    per = run["orderings"]
    distances = {o: t["gradient_distances"] for o, t in per.items()}
    noise_units = analysis.noise_unit_distances(distances, null)
    summaries = {o: t["batch_summary"] for o, t in per.items()}
    batch_stats = analysis.batch_phase_statistics(noise_units, summaries)
    by_seed = analysis.batch_phase_statistics_by_seed(noise_units, summaries)
    status = analysis.ordering_status_table({o: t["metric_status"] for o, t in per.items()}, distances)
    comparisons = analysis.compare_batch_groups(batch_stats, n_permutations=n_permutations, seed=1,
                                                batch_stats_by_seed=by_seed)
    claims = analysis.claim_verdicts(comparisons, status, alpha=alpha)
    return {"noise_units": noise_units, "batch_stats": batch_stats, "batch_stats_by_seed": by_seed,
            "status": status, "comparisons": comparisons, "claims": claims,
            "seed_comparisons": analysis.seed_group_differences(by_seed)}


def _positions(n_batches):
    return (np.arange(n_batches) + 0.5) / n_batches


def planted_effects(n_batches=40, size=3.0):
    """Phase 1: intensity's upper quartile closer, colour's extremes farther; phase 2: every metric's
    extremes farther; phase 3: nothing."""
    position = _positions(n_batches)
    upper = np.where(position > 0.75, -size, 0.0)
    extremes = np.where((position < 0.1) | (position > 0.9), size, 0.0)
    effects = {("intensity", 1): upper, ("color", 1): extremes}
    for metric in ("intensity", "color", "edges"):
        effects[(metric, 2)] = extremes
    return effects


# --------------------------------------------------------------------------- phases


def test_phases_are_the_ones_training_recorded_not_rederived_from_learning_rates():
    # Two phases with the same learning rate stay two phases (the history says so).
    table = pd.DataFrame({"epoch": [3, 1, 2, 4], "phase": [2, 1, 1, 3], "learning_rate": [0.1, 0.1, 0.1, 0.01]})
    got = analysis.epoch_phase_table(table, "intensity.gradient_distances")
    assert got["epoch"].tolist() == [1, 2, 3, 4] and got["phase"].tolist() == [1, 1, 2, 3]


def test_epoch_with_two_learning_rates_is_an_error_naming_the_table():
    table = pd.DataFrame({"epoch": [1, 1], "phase": [1, 1], "learning_rate": [0.1, 0.2]})
    with pytest.raises(analysis.AnalysisInputError, match="edges.gradient_distances.*epochs \\[1\\]"):
        analysis.epoch_phase_table(table, "edges.gradient_distances")


def test_noise_units_carry_the_phase_training_recorded():
    run = synthetic_run(phase_lengths=(2, 2), learning_rates=(0.1, 0.01), n_batches=8)
    distances = {o: t["gradient_distances"].assign(phase=7) for o, t in run["orderings"].items()}
    noise_units = analysis.noise_unit_distances(distances, "random")
    assert noise_units["phase"].unique().tolist() == [7]


# --------------------------------------------------------------------------- noise units


def test_noise_units_use_each_orderings_same_network_null_and_keep_the_cross_network_one():
    distances = {
        "random": pd.DataFrame({"ordering": "random", "epoch": 1, "phase": 1, "learning_rate": 0.1,
                                "batch": [0, 1, 2], "distance": [1.0, 2.0, 3.0]}),
        "edges": pd.DataFrame({"ordering": "edges", "epoch": 1, "phase": 1, "learning_rate": 0.1,
                               "batch": [0, 1], "distance": [4.0, 2.0]}),
        "color": pd.DataFrame({"ordering": "color", "epoch": 1, "phase": 1, "learning_rate": 0.1,
                               "batch": [0, 1], "distance": [4.0, 2.0]}),
    }
    for table in distances.values():
        table["cosine_similarity"], table["relative_distance"] = 0.5, 1.0
    nulls = {  # edges' own random batches at its own parameters: mean 3, sd 1; color was trained without
        "edges": pd.DataFrame({"epoch": 1, "draw": [0, 1, 2], "distance": [2.0, 3.0, 4.0]}),
        "color": pd.DataFrame({"epoch": [], "draw": [], "distance": []}),
    }
    out = analysis.noise_unit_distances(distances, "random", nulls).set_index(["ordering", "batch"])
    assert out.loc[("edges", 0), "noise_z"] == pytest.approx(1.0)  # (4 - 3) / 1, same network
    assert out.loc[("edges", 0), "noise_ratio"] == pytest.approx(4 / 3)
    assert out.loc[("edges", 0), "null_source"] == "same_network"
    assert out.loc[("edges", 0), "noise_z_cross"] == pytest.approx(2.0)  # (4 - 2) / 1 against random's batches
    assert out.loc[("color", 0), "null_source"] == "cross_network"  # no null of its own: the cross-network z
    assert out.loc[("color", 0), "noise_z"] == pytest.approx(2.0) == out.loc[("color", 0), "noise_z_cross"]


def test_noise_units_are_z_scores_and_ratios_against_random_batches_of_the_same_epoch():
    rows = []
    for epoch, (random_d, metric_d) in enumerate([([1.0, 2.0, 3.0], [4.0, 2.0]), ([10.0, 30.0, 20.0], [5.0, 40.0])], 1):
        for b, d in enumerate(random_d):
            rows.append(("random", epoch, b, d))
        for b, d in enumerate(metric_d):
            rows.append(("edges", epoch, b, d))
    table = pd.DataFrame(rows, columns=["ordering", "epoch", "batch", "distance"])
    table["learning_rate"] = 0.1
    table["phase"] = 1
    table["cosine_similarity"] = 0.5
    table["relative_distance"] = 1.0
    distances = {o: t for o, t in table.groupby("ordering")}
    out = analysis.noise_unit_distances(distances, "random").set_index(["ordering", "epoch", "batch"])
    # epoch 1: random mean 2, sample sd 1; epoch 2: mean 20, sd 10
    assert out.loc[("edges", 1, 0), "noise_z"] == pytest.approx(2.0)
    assert out.loc[("edges", 1, 0), "noise_ratio"] == pytest.approx(2.0)
    assert out.loc[("edges", 2, 0), "noise_z"] == pytest.approx(-1.5)
    assert out.loc[("edges", 2, 1), "noise_ratio"] == pytest.approx(2.0)
    random_z = out.loc["random"].groupby("epoch")["noise_z"]
    assert random_z.mean().abs().max() < 1e-12
    assert random_z.std().to_numpy() == pytest.approx([1.0, 1.0])


def test_noise_units_do_not_change_when_an_epochs_gradient_scale_changes():
    run = synthetic_run(phase_lengths=(2, 2), learning_rates=(0.1, 0.01), n_batches=10)
    distances = {o: t["gradient_distances"] for o, t in run["orderings"].items()}
    scaled = {o: t.assign(distance=np.where(t["epoch"] == 3, t["distance"] * 1000, t["distance"]))
              for o, t in distances.items()}
    before = analysis.noise_unit_distances(distances, "random")
    after = analysis.noise_unit_distances(scaled, "random")
    np.testing.assert_allclose(after["noise_z"], before["noise_z"], rtol=1e-10)
    np.testing.assert_allclose(after["noise_ratio"], before["noise_ratio"], rtol=1e-10)
    assert not np.allclose(after["distance"], before["distance"])


def test_missing_null_ordering_is_an_error_naming_the_parameter():
    run = synthetic_run(phase_lengths=(2,), learning_rates=(0.1,), n_batches=8, skipped=("random",))
    distances = {o: t["gradient_distances"] for o, t in run["orderings"].items()}
    message = "null ordering 'random' \\(distance_analysis.null_ordering\\) has no distance rows"
    with pytest.raises(analysis.AnalysisInputError, match=message):
        analysis.noise_unit_distances(distances, "random")
    with pytest.raises(analysis.AnalysisInputError, match="null_ordering is 'shuffled'"):
        analysis.noise_unit_distances(distances, "shuffled")


def test_missing_column_is_an_error_naming_the_dataset():
    run = synthetic_run(phase_lengths=(2,), learning_rates=(0.1,), n_batches=8)
    distances = {o: t["gradient_distances"] for o, t in run["orderings"].items()}
    distances["edges"] = distances["edges"].drop(columns=["cosine_similarity"])
    with pytest.raises(analysis.AnalysisInputError, match="edges.gradient_distances lacks.*cosine_similarity"):
        analysis.noise_unit_distances(distances, "random")


def test_batch_phase_statistics_are_means_and_spreads_over_the_phase_epochs():
    run = synthetic_run(phase_lengths=(3, 2), learning_rates=(0.1, 0.01), n_batches=8)
    result = run_analysis(run)
    stats_table = result["batch_stats"].set_index(["ordering", "phase", "batch"])
    raw = run["orderings"]["edges"]["gradient_distances"]
    phase_two_batch_5 = raw[(raw["epoch"].isin([4, 5])) & (raw["batch"] == 5)]
    row = stats_table.loc[("edges", 2, 5)]
    assert row["n_epochs"] == 2 and row["first_epoch"] == 4 and row["last_epoch"] == 5
    assert row["distance_mean"] == pytest.approx(phase_two_batch_5["distance"].mean())
    assert row["distance_std"] == pytest.approx(phase_two_batch_5["distance"].std())
    assert row["cosine_similarity_std"] == pytest.approx(phase_two_batch_5["cosine_similarity"].std())
    summary = run["orderings"]["edges"]["batch_summary"].set_index("batch")
    assert row["class_entropy"] == pytest.approx(summary.at[5, "class_entropy"])
    assert set(result["batch_stats"]["ordering"]) == {"intensity", "color", "edges", "random"}


# --------------------------------------------------------------------------- claims


def test_planted_structure_gives_exactly_the_planted_verdicts():
    run = synthetic_run(effects=planted_effects(), seed=3)
    claims = run_analysis(run)["claims"].set_index(["claim_id", "ordering", "phase"])["verdict"]
    expected = {
        ("first_phase_upper_quartile_closest", "intensity", 1): "supported",
        ("first_phase_upper_quartile_closest", "perceptual", 1): f"not tested (metric skipped: {SKIP_REASON})",
        ("first_phase_color_extremes_better", "color", 1): "contradicted",
        ("first_phase_edges_middle_better", "edges", 1): "undecided",
        ("later_phases_extremes_worse", "intensity", 2): "supported",
        ("later_phases_extremes_worse", "color", 2): "supported",
        ("later_phases_extremes_worse", "edges", 2): "supported",
        ("later_phases_extremes_worse", "perceptual", 2): f"not tested (metric skipped: {SKIP_REASON})",
        ("later_phases_extremes_worse", "perceptual", 3): f"not tested (metric skipped: {SKIP_REASON})",
        ("later_phases_extremes_worse", "intensity", 3): "undecided",
        ("later_phases_extremes_worse", "color", 3): "undecided",
        ("later_phases_extremes_worse", "edges", 3): "undecided",
    }
    assert claims.to_dict() == expected


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_null_run_leaves_every_claim_undecided(seed):
    run = synthetic_run(skipped=(), seed=seed)
    claims = run_analysis(run)["claims"]
    assert len(claims) == 2 + 1 + 1 + 4 * 2
    assert set(claims["verdict"]) == {"undecided"}


def test_a_skipped_metric_has_a_not_tested_row_per_phase_like_a_tested_metric():
    """A skipped metric's rows are labelled with the phases a tested metric's rows have, and count the same."""
    run = synthetic_run(effects=planted_effects(), seed=3)  # three phases, perceptual skipped
    claims = run_analysis(run)["claims"]
    later = claims[claims["claim_id"] == "later_phases_extremes_worse"]
    phases = later.groupby("ordering")["phase"].apply(list).to_dict()
    assert phases == {"intensity": [2, 3], "color": [2, 3], "edges": [2, 3], "perceptual": [2, 3]}
    skipped = later[later["ordering"] == "perceptual"]
    assert skipped["verdict"].str.startswith("not tested (metric skipped").all()
    assert skipped["p_holm"].isna().all()  # not tested: outside Holm's family


def test_claims_after_the_first_phase_are_not_tested_in_a_one_phase_run():
    run = synthetic_run(phase_lengths=(3,), learning_rates=(0.1,), skipped=())
    claims = run_analysis(run)["claims"]
    later = claims[claims["claim_id"] == "later_phases_extremes_worse"]
    assert len(later) == 4
    assert set(later["verdict"]) == {"not tested (the run has only one phase)"}


CLASS_DESIGN = ("intensity", "random", "intensity_stratified", "random_stratified")


def test_a_pure_class_effect_is_attributed_to_class_not_to_the_metric():
    """Planted: the distance grows with the batch's count of one class, and intensity's top batches hold more of
    that class; the metric itself does nothing. The plain ordering shows an effect, the stratified ordering
    (class held fixed) shows none, and Freedman-Lane's adjustment gives no verdict: attributed to class."""
    run = synthetic_run(orderings=CLASS_DESIGN, phase_lengths=(3,), learning_rates=(0.1,), skipped=(), seed=5,
                        seeds=(0, 1), class_effect=1.5, class_trend=True, noise=0.5)
    claims = run_analysis(run)["claims"].set_index(["claim_id", "ordering"])
    plain = claims.loc[("first_phase_upper_quartile_closest", "intensity")]
    stratified = claims.loc[("first_phase_upper_quartile_closest", "intensity_stratified")]
    assert plain["verdict"] == "contradicted"  # the upper quartile (more of the class) is farther
    assert stratified["verdict"] == "undecided"
    assert plain["adjusted_verdict"] not in ("supported", "contradicted")
    assert stratified["adjusted_verdict"] == analysis.CLASS_FIXED
    assert plain["attribution"] == stratified["attribution"] == analysis.ATTRIBUTIONS["class"]
    assert plain["composition_r2"] > 0.3  # the group is partly predicted by the class mix


def test_a_metric_effect_with_class_fixed_is_detected_and_not_removed_by_the_adjustment():
    """Planted: intensity's upper quartile is closer in both orderings, and the class mix varies at random in
    the plain one. The stratified ordering detects it, Freedman-Lane keeps it, it is attributed to the metric."""
    effect = _upper_quartile(-2.0)
    run = synthetic_run(orderings=CLASS_DESIGN, phase_lengths=(3,), learning_rates=(0.1,), skipped=(), seed=6,
                        seeds=(0, 1), class_effect=1.0, noise=0.5,
                        effects={("intensity", 1): effect, ("intensity_stratified", 1): effect})
    claims = run_analysis(run)["claims"].set_index(["claim_id", "ordering"])
    plain = claims.loc[("first_phase_upper_quartile_closest", "intensity")]
    stratified = claims.loc[("first_phase_upper_quartile_closest", "intensity_stratified")]
    assert stratified["verdict"] == "supported"
    assert plain["adjusted_verdict"] == "supported"
    assert plain["adjusted_test"] == "freedman-lane" and plain["composition_r2"] < 0.5
    assert plain["attribution"] == analysis.ATTRIBUTIONS["metric"]


def test_a_control_with_a_verdict_invalidates_the_claims_it_gates():
    """The same planted metric effect, once with the control clean and once with the control showing the same
    effect (as a place-in-the-epoch bias would): the second reads 'invalid: control fails'."""
    effect = _upper_quartile(-3.0)
    clean = synthetic_run(phase_lengths=(3,), learning_rates=(0.1,), skipped=(), seed=3,
                          effects={("intensity", 1): effect})
    row = run_analysis(clean)["claims"].set_index(["claim_id", "ordering"]).loc[
        ("first_phase_upper_quartile_closest", "intensity")]
    assert (row["verdict"], row["control"], row["control_verdict"]) == ("supported", "random", "undecided")
    biased = synthetic_run(phase_lengths=(3,), learning_rates=(0.1,), skipped=(), seed=3,
                           effects={("intensity", 1): effect, ("random", 1): effect})
    row = run_analysis(biased)["claims"].set_index(["claim_id", "ordering"]).loc[
        ("first_phase_upper_quartile_closest", "intensity")]
    assert row["test_verdict"] == "supported" and row["control_verdict"] == "supported"
    assert row["verdict"] == analysis.CONTROL_FAILS


def test_every_verdict_of_a_fixed_order_run_is_labelled_as_confounded():
    run = synthetic_run(effects=planted_effects(), seed=3, batch_order="fixed")
    claims = run_analysis(run)["claims"]
    tested = claims[~claims["verdict"].str.startswith("not tested")]
    assert (tested["batch_order"] == "fixed").all()
    assert set(tested["verdict"]) == {analysis.FIXED_ORDER}
    assert "supported" in set(tested["test_verdict"])  # the test result is kept beside the label


def test_one_holm_family_covers_the_primary_and_the_adjusted_p_values():
    claims = run_analysis(synthetic_run(effects=planted_effects(), seed=3, skipped=()))["claims"]
    raw = np.concatenate([claims["p_value"].to_numpy(float), claims["adjusted_p_value"].to_numpy(float)])
    family = analysis.holm_adjust(raw)
    np.testing.assert_allclose(claims["p_holm"], family[: len(claims)])
    np.testing.assert_allclose(claims["adjusted_p_holm"], family[len(claims):])
    assert np.isfinite(claims["adjusted_p_value"]).sum() > 0


def test_permutation_test_is_exact_when_all_relabellings_fit():
    values = np.array([0.0, 0.1, 0.2, 0.3, 5.0, 6.0])
    in_group = np.array([False, False, False, False, True, True])
    difference, p_value, method = analysis.permutation_test(values, in_group, 1000, np.random.default_rng(0))
    assert method == "exact"
    assert difference == pytest.approx(5.5 - 0.15)
    # the observed split and none other is as extreme: 1 of C(6, 2) = 15 relabellings
    assert p_value == pytest.approx(1 / 15)


def test_monte_carlo_permutation_test_matches_the_exact_one():
    rng = np.random.default_rng(4)
    values = rng.normal(size=20)
    values[:4] += 0.8
    in_group = np.arange(20) < 4  # C(20, 4) = 4845 relabellings
    _, exact, method = analysis.permutation_test(values, in_group, 10**6, rng)
    _, sampled, sampled_method = analysis.permutation_test(values, in_group, 4000, np.random.default_rng(1))
    assert (method, sampled_method) == ("exact", "monte carlo")
    assert 0.01 < exact < 0.5
    assert sampled == pytest.approx(exact, abs=0.03)


def test_effect_sizes_have_the_sign_of_group_minus_rest():
    group, rest = np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 2.0, 1.0])
    assert analysis.cohens_d(group, rest) > 2
    assert analysis.rank_biserial(group, rest) == 1.0
    assert analysis.rank_biserial(rest, group) == -1.0


def test_holm_adjustment():
    adjusted = analysis.holm_adjust([0.01, np.nan, 0.04, 0.03])
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, 2*0.03, max(0.06, 1*0.04)
    np.testing.assert_allclose(adjusted, [0.03, np.nan, 0.06, 0.06])


# --------------------------------------------------------------------------- seeds


def test_noise_units_are_taken_within_each_seed():
    """Each seed's batches against that seed's null: the same-network null of the ordering's run with the same
    seed, the cross-network null of the null ordering's run with the same seed."""
    def table(ordering, seed, distances):
        return pd.DataFrame({"ordering": ordering, "seed": seed, "epoch": 1, "phase": 1, "learning_rate": 0.1,
                             "batch": range(len(distances)), "distance": distances, "cosine_similarity": 0.5,
                             "relative_distance": 1.0})
    distances = {"random": pd.concat([table("random", 0, [1.0, 2.0, 3.0]), table("random", 1, [10.0, 20.0, 30.0])]),
                 "edges": pd.concat([table("edges", 0, [4.0, 2.0]), table("edges", 1, [40.0, 20.0])])}
    nulls = {"edges": pd.DataFrame({"seed": [0, 0, 0, 1, 1, 1], "epoch": 1, "draw": [0, 1, 2] * 2,
                                    "distance": [2.0, 3.0, 4.0, 20.0, 30.0, 40.0]})}
    out = analysis.noise_unit_distances(distances, "random", nulls).set_index(["ordering", "seed", "batch"])
    for seed, scale in ((0, 1.0), (1, 10.0)):
        assert out.loc[("edges", seed, 0), "null_mean"] == pytest.approx(3.0 * scale)
        assert out.loc[("edges", seed, 0), "noise_z"] == pytest.approx(1.0)  # (4 - 3) / 1 in either seed's scale
        assert out.loc[("edges", seed, 0), "noise_z_cross"] == pytest.approx(2.0)  # against random's same seed


def test_the_per_batch_statistic_pools_the_seeds():
    run = synthetic_run(phase_lengths=(3, 2), learning_rates=(0.1, 0.01), n_batches=8, seeds=(0, 5), skipped=())
    result = run_analysis(run)
    units = result["noise_units"]
    rows = units[(units["ordering"] == "edges") & (units["phase"] == 2) & (units["batch"] == 5)]
    assert sorted(set(zip(rows["seed"], rows["epoch"]))) == [(0, 4), (0, 5), (5, 4), (5, 5)]
    pooled = result["batch_stats"].set_index(["ordering", "phase", "batch"]).loc[("edges", 2, 5)]
    assert pooled["n_epochs"] == 2 and pooled["n_seeds"] == 2
    assert pooled["noise_z_mean"] == pytest.approx(rows["noise_z"].mean())  # over the phase's epochs and the seeds
    assert pooled["distance_std"] == pytest.approx(rows["distance"].std())
    per_seed = rows.groupby("seed")["noise_z"].mean()
    assert pooled["noise_z_seed_sd"] == pytest.approx(per_seed.std())
    by_seed = result["batch_stats_by_seed"].set_index(["ordering", "seed", "phase", "batch"])
    for seed in (0, 5):
        assert by_seed.loc[("edges", seed, 2, 5), "noise_z_mean"] == pytest.approx(per_seed[seed])
    # The test's unit stays the batch: one value per batch, 8 per ordering and phase.
    comparisons = result["comparisons"]
    assert (comparisons["n_group"] + comparisons["n_rest"] == 8).all() and (comparisons["n_seeds"] == 2).all()
    assert result["status"].set_index("ordering").at["edges", "n_seeds"] == 2


def _upper_quartile(size, n_batches=40):
    return np.where(_positions(n_batches) > 0.75, size, 0.0)


def test_a_claim_is_supported_only_when_every_seed_agrees_in_sign():
    """Planted: intensity's upper quartile is closer in phase 1. Three seeds that agree: supported. The same
    but one seed with the opposite (weaker) effect: the pooled test still passes, the verdict does not."""
    agree = synthetic_run(phase_lengths=(3,), learning_rates=(0.1,), skipped=(), seeds=(0, 1, 2), seed=3,
                          effects={("intensity", 1): _upper_quartile(-3.0)})
    row = run_analysis(agree)["claims"].set_index(["claim_id", "ordering"]).loc[
        ("first_phase_upper_quartile_closest", "intensity")]
    assert (row["verdict"], row["pooled_verdict"]) == ("supported", "supported")
    assert (row["n_seeds"], row["seeds_agreeing"]) == (3, 3)
    disagree = synthetic_run(phase_lengths=(3,), learning_rates=(0.1,), skipped=(), seeds=(0, 1, 2), seed=3,
                             effects={("intensity", 1): _upper_quartile(-3.0)},
                             seed_effects={("intensity", 1, 2): _upper_quartile(+1.0)})
    result = run_analysis(disagree)
    row = result["claims"].set_index(["claim_id", "ordering"]).loc[("first_phase_upper_quartile_closest",
                                                                     "intensity")]
    assert row["difference"] < 0 and row["p_holm"] < 0.05  # the pooled test passes in the claimed direction
    assert row["pooled_verdict"] == "supported"
    assert (row["n_seeds"], row["seeds_agreeing"]) == (3, 2)
    assert row["verdict"] == "undecided"
    effects = result["seed_comparisons"].set_index(["ordering", "phase", "comparison", "seed"])["rank_biserial"]
    key = ("intensity", 1, analysis.UPPER_QUARTILE)
    assert effects[(*key, 0)] < 0 and effects[(*key, 1)] < 0 and effects[(*key, 2)] > 0
    assert row["seed_differences"] == "; ".join(f"seed {s}: {effects[(*key, s)]:+.3f}" for s in (0, 1, 2))


def test_with_one_seed_the_rule_is_the_pooled_test():
    """A one-seed run with a seed column gives the verdicts and numbers of the same run without one."""
    plain = run_analysis(synthetic_run(effects=planted_effects(), seed=3))["claims"]
    seeded = run_analysis(synthetic_run(effects=planted_effects(), seed=3, seeds=(0,)))["claims"]
    pd.testing.assert_frame_equal(plain, seeded)
    tested = seeded[seeded["verdict"].isin(["supported", "contradicted", "undecided"])]
    assert (tested["n_seeds"] == 1).all() and (tested["seeds_agreeing"] == 1).all()
    assert (tested["verdict"] == tested["pooled_verdict"]).all()
    assert set(tested["verdict"]) == {"supported", "contradicted", "undecided"}


def test_trace_check_per_seed():
    run = synthetic_run(phase_lengths=(2, 1), learning_rates=(0.1, 0.01), n_batches=6, with_trace=True,
                        seeds=(0, 1))
    noise_units = run_analysis(run)["noise_units"]
    check = analysis.gradient_noise_trace_check(noise_units[noise_units["ordering"] == "random"],
                                                run["orderings"]["random"]["training_history"])
    assert list(zip(check["seed"], check["epoch"])) == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    np.testing.assert_allclose(check["ratio"], 0.8)


# --------------------------------------------------------------------------- confounds, best and worst


def test_confound_correlations_find_the_planted_rank_relations():
    run = synthetic_run(phase_lengths=(3,), learning_rates=(0.1,), skipped=(), noise=0.2, seed=2)
    rng = np.random.default_rng(7)
    summary = run["orderings"]["edges"]["batch_summary"]
    summary["class_entropy"] = rng.uniform(0.5, 1.3, size=40)
    effect = -(summary["class_entropy"].to_numpy() - 0.9) * 20  # balanced batches are closer
    run["orderings"]["edges"]["gradient_distances"]["distance"] *= np.tile(1 + 0.05 * effect, 3)
    result = run_analysis(run)
    table = analysis.confound_correlations(result["batch_stats"], n_bootstrap=500, seed=0)
    edges = table[table["ordering"] == "edges"].set_index("variable")
    entropy_row = edges[edges["given"] == ""].loc["class_entropy"]
    assert entropy_row["spearman"] < -0.8
    assert entropy_row["ci_low"] <= entropy_row["spearman"] <= entropy_row["ci_high"] < 0
    assert entropy_row["ci_excludes_zero"]
    metric_row = edges[edges["given"] == ""].loc["metric_mean"]
    assert metric_row["ci_low"] < 0 < metric_row["ci_high"]
    assert len(table) == 5 * 3


def test_partial_spearman_removes_a_shared_cause():
    rng = np.random.default_rng(0)
    cause = rng.normal(size=400)
    x, y = cause + 0.3 * rng.normal(size=400), cause + 0.3 * rng.normal(size=400)
    plain, _, _ = analysis.spearman_with_ci(x, y, 200, rng)
    partial, low, high = analysis.spearman_with_ci(x, y, 200, rng, given=cause)
    assert plain > 0.8
    assert abs(partial) < 0.15 and low < 0 < high


def test_best_and_worst_batches_rank_by_mean_noise_units():
    run = synthetic_run(phase_lengths=(2,), learning_rates=(0.1,), skipped=(), n_batches=10, noise=0.01,
                        effects={("edges", 1): np.arange(10.0)[::-1]})
    result = run_analysis(run)
    table = analysis.best_and_worst_batches(result["batch_stats"], n_per_side=2)
    edges = table[table["ordering"] == "edges"]
    assert edges.loc[edges["kind"] == "best", "batch"].tolist() == [9, 8]
    assert edges.loc[edges["kind"] == "worst", "batch"].tolist() == [0, 1]
    with pytest.raises(analysis.AnalysisInputError, match="n_best_worst"):
        analysis.best_and_worst_batches(result["batch_stats"], n_per_side=0)


def test_ordering_status_lists_every_ordering_with_skip_reasons():
    run = synthetic_run(phase_lengths=(2, 1), learning_rates=(0.1, 0.01), n_batches=6)
    status = run_analysis(run)["status"].set_index("ordering")
    assert list(status.index) == list(ORDERINGS)
    assert status.at["perceptual", "status"] == "skipped"
    assert status.at["perceptual", "reason"] == SKIP_REASON
    assert status.at["edges", "n_phases"] == 2 and status.at["edges", "n_batches"] == 6


# --------------------------------------------------------------------------- tiny model: per-example gradients


def _tiny_problem(n_examples: int, seed: int = 0):
    """A linear softmax classifier (no BatchNorm, so a batch gradient is the mean of per-example ones)."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Linear(5, 3).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    inputs = torch.randn(n_examples, 5, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 3, (n_examples,), generator=generator)
    per_example = torch.stack([batch_gradient(model, inputs[i : i + 1], targets[i : i + 1]) for i in range(n_examples)])
    return model, inputs, targets, per_example.numpy()


def test_batch_gradient_of_the_tiny_model_is_the_mean_of_per_example_gradients():
    model, inputs, targets, per_example = _tiny_problem(6)
    np.testing.assert_allclose(batch_gradient(model, inputs[:4], targets[:4]).numpy(), per_example[:4].mean(axis=0))


def test_trace_identity_is_exact_over_every_batch_of_a_tiny_model():
    n, m = 9, 3
    _, _, _, per_example = _tiny_problem(n)
    full = per_example.mean(axis=0)
    squared = [np.sum((per_example[list(s)].mean(axis=0) - full) ** 2) for s in combinations(range(n), m)]
    assert len(squared) == math.comb(n, m)
    trace = analysis.per_example_gradient_trace(per_example)
    assert trace == pytest.approx(np.trace(np.cov(per_example, rowvar=False, bias=True)))
    assert np.mean(squared) == pytest.approx(analysis.expected_batch_distance_sq(trace, n, m), rel=1e-12)
    # the 1/(N-1) sample covariance in the same formula is off by N/(N-1)
    sample_trace = np.trace(np.cov(per_example, rowvar=False))
    assert np.mean(squared) != pytest.approx(analysis.expected_batch_distance_sq(sample_trace, n, m), rel=0.05)


def test_trace_check_on_random_partitions_of_a_tiny_model():
    """Each 'epoch' is one random partition into batches; over many the observed/expected ratio is 1.

    Batch gradients are means of per-example gradients, which the test above shows equal
    ``batch_gradient`` on this model; ``distance_measures`` turns them into the distance table.
    """
    n, m, n_epochs = 12, 3, 3000
    _, _, _, per_example = _tiny_problem(n, seed=1)
    rng = np.random.default_rng(0)
    rows = []
    for epoch in range(1, n_epochs + 1):
        batches = per_example[rng.permutation(n)].reshape(n // m, m, -1).mean(axis=1)
        measures = distance_measures(batches)
        rows.append({"epoch": np.full(n // m, epoch), "batch": np.arange(n // m),
                     **{k: measures[k] for k in analysis.DISTANCE_MEASURES}})
    distances = pd.DataFrame({k: np.concatenate([r[k] for r in rows]) for k in rows[0]})
    distances = distances.assign(ordering="random", phase=1, learning_rate=0.1)
    noise_units = analysis.noise_unit_distances({"random": distances}, "random")
    history = pd.DataFrame({"epoch": np.arange(1, n_epochs + 1), "n_train": n, "batch_size": m,
                            "gradient_variance_trace": analysis.per_example_gradient_trace(per_example)})
    check = analysis.gradient_noise_trace_check(noise_units, history)
    assert (check["status"] == "measured").all()
    overall = check["observed_mean_sq_distance"].mean() / check["expected_mean_sq_distance"].mean()
    assert overall == pytest.approx(1.0, abs=0.03)
    summary = analysis.summarise_trace_check(check)
    assert summary.set_index("phase").at["all", "n_epochs"] == n_epochs


def test_trace_check_without_the_trace_column_says_not_measured():
    run = synthetic_run(phase_lengths=(2,), learning_rates=(0.1,), n_batches=6)
    noise_units = run_analysis(run)["noise_units"]
    null = noise_units[noise_units["ordering"] == "random"]
    check = analysis.gradient_noise_trace_check(null, run["orderings"]["random"]["training_history"])
    assert len(check) == 2 and set(check["status"]) == {"not measured"} and check["ratio"].isna().all()
    assert analysis.summarise_trace_check(check).empty


def test_trace_check_reports_the_ratio_seen():
    run = synthetic_run(phase_lengths=(2, 2), learning_rates=(0.1, 0.01), n_batches=6, with_trace=True)
    noise_units = run_analysis(run)["noise_units"]
    null = noise_units[noise_units["ordering"] == "random"]
    check = analysis.gradient_noise_trace_check(null, run["orderings"]["random"]["training_history"])
    # synthetic_run sets the trace 25% above what the observed distances imply
    np.testing.assert_allclose(check["ratio"], 0.8)
    assert check["phase"].tolist() == [1, 1, 2, 2]


def test_noise_units_on_a_tiny_model_sorted_by_gradient_direction():
    """Batches of examples sorted along the gradient's main direction: the extremes are far from the
    full gradient and the middle is closer than random batches; the analysis must find that."""
    n, m = 200, 5
    model, inputs, targets, per_example = _tiny_problem(n, seed=2)
    centred = per_example - per_example.mean(axis=0)
    direction = np.linalg.svd(centred, full_matrices=False)[2][0]
    sorted_ids = np.argsort(centred @ direction)
    rng = np.random.default_rng(0)
    rows = []
    for epoch, rate in ((1, 0.1), (2, 0.1), (3, 0.01), (4, 0.01)):
        for ordering, order in (("edges", sorted_ids), ("random", rng.permutation(n))):
            batches = torch.from_numpy(order.copy()).reshape(n // m, m)
            gradients = torch.stack([batch_gradient(model, inputs[b], targets[b]) for b in batches])
            measures = distance_measures(gradients)
            rows.append(pd.DataFrame({"ordering": ordering, "epoch": epoch, "phase": 1 if rate == 0.1 else 2,
                                      "learning_rate": rate,
                                      "batch": np.arange(n // m),
                                      **{k: measures[k] for k in analysis.DISTANCE_MEASURES}}))
    table = pd.concat(rows, ignore_index=True)
    distances = {o: t for o, t in table.groupby("ordering")}
    noise_units = analysis.noise_unit_distances(distances, "random")
    # by hand for one row: z against the random batches of the same epoch
    random_epoch_3 = table[(table["ordering"] == "random") & (table["epoch"] == 3)]["distance"]
    edge_row = noise_units[(noise_units["ordering"] == "edges") & (noise_units["epoch"] == 3)].iloc[0]
    assert edge_row["noise_z"] == pytest.approx((edge_row["distance"] - random_epoch_3.mean()) / random_epoch_3.std())
    assert edge_row["phase"] == 2
    summaries = {o: pd.DataFrame({"batch": np.arange(n // m), "metric_mean": np.arange(n // m, dtype=float),
                                  "class_entropy": 1.0}) for o in distances}
    batch_stats = analysis.batch_phase_statistics(noise_units, summaries)
    comparisons = analysis.compare_batch_groups(batch_stats, n_permutations=5000, seed=0)
    edges = comparisons[(comparisons["ordering"] == "edges") & (comparisons["comparison"] == analysis.EXTREMES)]
    assert (edges["difference"] > 3).all() and (edges["p_holm"] < 0.01).all()
    middle = batch_stats[(batch_stats["ordering"] == "edges") & batch_stats["batch_position"].between(0.3, 0.7)]
    assert middle["noise_z_mean"].mean() < -0.3


# --------------------------------------------------------------------------- parameters


def test_parameters_default_and_are_checked():
    config = analysis.AnalysisConfig.from_params({"alpha": 0.01})
    assert (config.alpha, config.n_permutations) == (0.01, 20000)
    with pytest.raises(analysis.AnalysisInputError, match=r"distance_analysis.alpha: must be a number in \(0, 0.5\)"):
        analysis.AnalysisConfig.from_params({"alpha": 1.5})
    with pytest.raises(analysis.AnalysisInputError,
                       match="distance_analysis.n_permutations: must be an integer of at least 100"):
        analysis.AnalysisConfig.from_params({"n_permutations": 10})
    with pytest.raises(analysis.AnalysisInputError, match="distance_analysis.alfa: unknown parameter.*Did you mean "
                                                          "'alpha'"):
        analysis.AnalysisConfig.from_params({"alfa": 0.05})


# --------------------------------------------------------------------------- place in the epoch


def _recency_run(order: str, epochs: int = 4, k: int = 30, seeds: int = 2) -> pd.DataFrame:
    """Noise units of one ordering whose distance falls with the place in the previous epoch (recency) only."""
    rows = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        positions = {e: (np.arange(k) if order == "fixed" else rng.permutation(k)) for e in range(1, epochs + 1)}
        for epoch in range(1, epochs + 1):
            recency = positions[epoch - 1] if epoch > 1 else np.zeros(k)
            distance = 10.0 - recency + rng.normal(0, 0.5, k)
            rows.append(pd.DataFrame({"ordering": "random", "seed": seed, "epoch": epoch, "phase": 1 + (epoch > 2),
                                      "batch": np.arange(k), "position": positions[epoch], "distance": distance}))
    return pd.concat(rows, ignore_index=True)


def test_position_effects_separate_rank_from_place_only_in_a_shuffled_order():
    shuffled = analysis.position_effects(_recency_run("shuffled"))
    assert shuffled["batch_order"].tolist() == ["shuffled", "shuffled"]
    # Epoch 1 has no previous epoch: phase 1 holds epoch 2 of each seed, phase 2 epochs 3 and 4.
    assert shuffled["n_units"].tolist() == [2, 4] and (shuffled["n_batches"] == 30).all()
    assert (shuffled["previous_position_spearman"] < -0.9).all()
    assert (shuffled["previous_position_negative"] == shuffled["n_units"]).all()
    assert (shuffled["rank_given_position_spearman"].abs() < 0.3).all()
    assert (shuffled["rank_spearman"].abs() < 0.4).all()
    fixed = analysis.position_effects(_recency_run("fixed"))
    assert fixed["batch_order"].tolist() == ["fixed", "fixed"]
    # Rank and place are one number: the recency shows as a metric-rank effect, and the partial is undefined.
    assert (fixed["rank_spearman"] < -0.9).all()
    np.testing.assert_array_equal(fixed["rank_spearman"], fixed["previous_position_spearman"])
    assert fixed["rank_given_position_spearman"].isna().all() and (fixed["rank_given_position_negative"] == 0).all()


def test_position_effects_read_tables_without_position_as_the_fixed_order():
    run = _recency_run("fixed")
    pd.testing.assert_frame_equal(analysis.position_effects(run.drop(columns=["position"])),
                                  analysis.position_effects(run))
    assert analysis.position_effects(run[run["epoch"] == 1]).empty
