"""Batch-selection policies, the oracle's probe, the training loop and the statistics (selection*.py)."""

from __future__ import annotations

import copy
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from best_minibatch import selection as S
from best_minibatch.analysis.statistics import holm_adjust
from best_minibatch.metrics.scoring import METRICS
from best_minibatch.selection import statistics as T
from best_minibatch.training.runtime import cpu_threads

# --------------------------------------------------------------------------- a synthetic experiment

N_PER_CLASS, N_CLASSES, N_TEST = 30, 10, 40
BATCH = 10


def base_params(**overrides) -> dict:
    params = {
        "seeds": [0, 1],
        "policies": list(S.POLICIES),
        "validation": {"fraction": 0.2, "seed": 7},
        "target_validation_accuracy": 0.3,
        "training": {"model": {"name": "small_cnn", "small_cnn": {"width": 4}}, "progress_bar": False,
                     "batch_size": BATCH, "phases": [{"epochs": 2, "lr": 0.05}, {"epochs": 1, "lr": 0.005},
                                                     {"epochs": 1, "lr": 0.0005}],
                     "evaluations_per_epoch": 2, "eval_batch_size": 100, "device": "cpu"},
        "learned": {"ordering": "intensity", "measure": "noise_z_mean", "keep_fraction": 0.25},
        "oracle": {"keep_fraction": 0.25},
    }
    for key, value in overrides.items():
        params[key] = value
    return params


def synthetic_index() -> pd.DataFrame:
    n_train = N_PER_CLASS * N_CLASSES
    labels = np.tile(np.arange(N_CLASSES), N_PER_CLASS)
    train = pd.DataFrame({"image_id": np.arange(n_train), "split": "train", "row": np.arange(n_train),
                          "label": labels})
    test = pd.DataFrame({"image_id": n_train + np.arange(N_TEST), "split": "test", "row": np.arange(N_TEST),
                         "label": np.arange(N_TEST) % N_CLASSES})
    index = pd.concat([train, test], ignore_index=True)
    index["class_name"] = "c" + index["label"].astype(str)
    return index


def synthetic_scores(index: pd.DataFrame, seed: int = 0) -> dict[str, pd.DataFrame]:
    """A score table per registered metric, with each metric's sort columns."""
    ids = index.loc[index["split"] == "train", "image_id"].to_numpy()
    rng = np.random.default_rng(seed)
    tables = {}
    for name, metric in METRICS.items():
        table = pd.DataFrame({"image_id": ids})
        for column in metric.score_columns[1:]:
            table[column] = rng.random(len(ids))
        tables[name] = table
    return tables


def batch_stats_table(orderings: list[str], n_batches: int, n_phases: int, planted) -> pd.DataFrame:
    """distance_analysis' batch_phase_stats columns the learned policy reads, with planted noise_z_mean."""
    rows = []
    for ordering in orderings:
        for phase in range(1, n_phases + 1):
            for batch in range(n_batches):
                position = (batch + 0.5) / n_batches
                rows.append({"ordering": ordering, "phase": phase, "batch": batch, "batch_position": position,
                             "noise_z_mean": planted(phase, position)})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def experiment():
    """Config, split, per-ordering batches and pools of the synthetic experiment."""
    config = S.SelectionConfig.from_params(base_params())
    index = synthetic_index()
    split = S.stratified_validation_split(index, config.validation_fraction, config.validation_seed)
    train_ids = S.subset_ids(split, "train")
    orderings = {m: S.ordering_batches(s, m, train_ids, BATCH) for m, s in synthetic_scores(index).items()}
    # Planted: in phase 1 the middle of every ordering is closest; later, the top.
    stats = batch_stats_table(list(orderings), 30, 3, lambda phase, q: abs(q - 0.5) if phase == 1 else 1 - q)
    advice, _ = S.paper_advice_pool(orderings, config.paper_first_phase, config.paper_later_phases, 3)
    learned, _ = S.learned_pool(orderings["intensity"], stats, "intensity", "noise_z_mean", 0.25, 3)
    pools = pd.concat([S.fixed_order_pool(orderings, "random", 3), advice, learned], ignore_index=True)
    labels = split.set_index("image_id").loc[train_ids, "label"].to_numpy()
    return {"config": config, "index": index, "split": split, "train_ids": train_ids, "orderings": orderings,
            "pools": pools, "labels": labels}


def fake_probe(candidates: np.ndarray) -> np.ndarray:
    """Stand-in for the gradient probe: a distance that depends on the batch's images only."""
    return np.array([float(np.sin(ids).sum()) ** 2 for ids in candidates])


# --------------------------------------------------------------------------- parameters


def test_parameters_parse_and_bad_values_name_the_parameter():
    config = S.SelectionConfig.from_params(base_params())
    assert config.recipe.num_epochs == 4 and config.recipe.num_phases == 3
    assert config.paper_first_phase == {"intensity": "upper_quartile", "perceptual": "upper_quartile"}
    cases = [
        (base_params(seeds=[0, 0]), "batch_selection.seeds"),
        (base_params(policies=["fixed_random", "oracle"]), "batch_selection.policies"),
        (base_params(policies=["shuffle", "bogus"]), "batch_selection.policies"),
        (base_params(policies=["shuffle", "random_subset"]), "batch_selection.policies"),  # needs fixed_random
        (base_params(target_validation_accuracy=1.5), "batch_selection.target_validation_accuracy"),
        (base_params(validation={"fraction": 0.0}), "batch_selection.validation.fraction"),
        (base_params(learned={"measure": "cosine_similarity_mean"}), "batch_selection.learned.measure"),
        (base_params(paper_advice={"first_phase": {"intensity": "top"}}), "batch_selection.paper_advice.first_phase"),
        (base_params(training={**base_params()["training"], "phases": [{"epochs": 0, "lr": 0.1}]}),
         "batch_selection.training.phases[0].epochs"),
        (base_params(oracle={"candidates": 0}), "batch_selection.oracle.candidates"),
        (base_params(training={**base_params()["training"], "model": {"name": "alexnet"}}),
         "batch_selection.training.model.name"),
        (base_params(training={**base_params()["training"], "model": {"name": "small_cnn", "small_cnn": {"depth": 3}}}),
         "batch_selection.training.model.small_cnn.depth"),
        (base_params(training={**base_params()["training"], "model": {"name": "small_cnn", "options": {"width": 3}}}),
         "batch_selection.training.model.options"),
        (base_params(surprise=1), "batch_selection.surprise"),
    ]
    for params, named in cases:
        with pytest.raises(S.SelectionConfigError) as error:
            S.SelectionConfig.from_params(params)
        assert named in str(error.value), str(error.value)
        assert "parameters_batch_selection.yml" in str(error.value)


# --------------------------------------------------------------------------- validation split


def test_validation_split_is_stratified_seeded_and_disjoint():
    index = synthetic_index()
    split = S.stratified_validation_split(index, 0.2, seed=3)
    assert len(split) == N_PER_CLASS * N_CLASSES
    per_class = split.loc[split["subset"] == "validation"].groupby("label").size()
    assert (per_class == 6).all() and len(per_class) == N_CLASSES
    pd.testing.assert_frame_equal(split, S.stratified_validation_split(index, 0.2, seed=3))
    other = S.stratified_validation_split(index, 0.2, seed=4)
    assert not np.array_equal(S.subset_ids(split, "validation"), S.subset_ids(other, "validation"))
    assert not np.isin(S.subset_ids(split, "validation"), S.subset_ids(split, "train")).any()
    test_ids = index.loc[index["split"] == "test", "image_id"]
    assert not split["image_id"].isin(test_ids).any()


def test_validation_split_rejects_a_class_too_small():
    index = synthetic_index()
    index = index.loc[~((index["label"] == 3) & (index["split"] == "train") & (index["image_id"] > 3))]
    with pytest.raises(S.SelectionDataError, match="Class 3 has 1 training image"):
        S.stratified_validation_split(index, 0.2, seed=0)


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("policy_name", S.POLICIES)
def test_every_policy_takes_the_baselines_steps_on_training_images_only(experiment, policy_name):
    config, train_ids = experiment["config"], experiment["train_ids"]
    validation_ids = S.subset_ids(experiment["split"], "validation")
    test_ids = experiment["index"].loc[experiment["index"]["split"] == "test", "image_id"].to_numpy()
    baseline = S.build_policy("shuffle", config, 0, train_ids, experiment["pools"])
    policy = S.build_policy(policy_name, config, 0, train_ids, experiment["pools"], labels=experiment["labels"])
    baseline_total = policy_total = 0
    used = []
    for epoch, phase, _ in config.recipe.schedule:
        base_batches = baseline.epoch_batches(epoch, phase)
        batches = policy.epoch_batches(epoch, phase, fake_probe if policy.probes else None)
        assert batches.shape == base_batches.shape == (len(train_ids) // BATCH, BATCH)
        baseline_total += len(base_batches)
        policy_total += len(batches)
        used.append(batches.ravel())
    used = np.concatenate(used)
    assert policy_total == baseline_total == config.recipe.num_epochs * (len(train_ids) // BATCH)
    assert np.isin(used, train_ids).all()
    assert not np.isin(used, validation_ids).any() and not np.isin(used, test_ids).any()


def test_shuffle_reshuffles_and_fixed_random_repeats(experiment):
    config, train_ids = experiment["config"], experiment["train_ids"]
    shuffle = S.build_policy("shuffle", config, 0, train_ids, experiment["pools"])
    first, second = shuffle.epoch_batches(1, 1), shuffle.epoch_batches(2, 1)
    assert not np.array_equal(first, second)
    assert len(np.unique(first)) == first.size  # a partition: no image twice in an epoch
    fixed = S.build_policy("fixed_random", config, 0, train_ids, experiment["pools"])
    np.testing.assert_array_equal(fixed.epoch_batches(1, 1), fixed.epoch_batches(4, 3))
    np.testing.assert_array_equal(fixed.epoch_batches(1, 1), experiment["orderings"]["random"])


def test_ordering_batches_sort_ascending_and_drop_the_largest(experiment):
    index = experiment["index"]
    scores = synthetic_scores(index)["intensity"]
    train_ids = experiment["train_ids"]
    batches = S.ordering_batches(scores, "intensity", train_ids[:-3], BATCH)
    values = scores.set_index("image_id").loc[batches.ravel(), "score"].to_numpy()
    assert np.all(np.diff(values) >= 0)
    dropped = np.setdiff1d(train_ids[:-3], batches.ravel())
    assert len(dropped) == (len(train_ids) - 3) % BATCH
    assert scores.set_index("image_id").loc[dropped, "score"].min() >= values.max()


def test_paper_advice_keeps_the_recommended_groups(experiment):
    orderings = experiment["orderings"]
    k = len(orderings["intensity"])
    positions = S.rank_positions(k)
    pool, notes = S.paper_advice_pool(orderings, {"intensity": "upper_quartile", "perceptual": "upper_quartile"},
                                      {m: "middle_80" for m in ("intensity", "color", "edges", "perceptual")}, 3)
    assert notes == []
    first = pool.loc[pool["phase"] == 1]
    assert set(first["source_ordering"]) == {"intensity", "perceptual"}
    for ordering in ("intensity", "perceptual"):
        kept = np.sort(first.loc[first["source_ordering"] == ordering, "source_batch"].to_numpy())
        np.testing.assert_array_equal(kept, np.flatnonzero(positions > 0.75))
        for _, row in first.loc[first["source_ordering"] == ordering].iterrows():
            np.testing.assert_array_equal(row["image_ids"], orderings[ordering][row["source_batch"]])
    later = pool.loc[pool["phase"] > 1]
    assert set(later["source_ordering"]) == {"intensity", "color", "edges", "perceptual"}
    assert later["position"].between(0.10, 0.90).all()
    assert len(later) == 2 * 4 * int(np.sum((positions >= 0.10) & (positions <= 0.90)))


def test_paper_advice_without_perceptual_is_built_from_the_rest_and_says_so(experiment):
    orderings = {m: b for m, b in experiment["orderings"].items() if m != "perceptual"}
    pool, notes = S.paper_advice_pool(orderings, {"intensity": "upper_quartile", "perceptual": "upper_quartile"},
                                      {"intensity": "middle_80", "perceptual": "middle_80"}, 2,
                                      skipped={"perceptual": "AlexNet weights missing"})
    assert set(pool["source_ordering"]) == {"intensity"}
    assert any("perceptual" in note and "AlexNet weights missing" in note for note in notes)
    with pytest.raises(S.SelectionDataError, match="no batches in phase 1"):
        S.paper_advice_pool({"color": orderings["color"]}, {"perceptual": "upper_quartile"}, {"color": "all"}, 2)


def test_learned_pool_keeps_the_batches_the_analysis_found_closest(experiment):
    batches = experiment["orderings"]["edges"]  # 24 re-cut batches
    k = len(batches)
    # The analysis saw 50 batches (all training images): closest in the middle in phase 1, at the top later.
    stats = batch_stats_table(["edges"], 50, 2, lambda phase, q: abs(q - 0.5) if phase == 1 else -q)
    pool, notes = S.learned_pool(batches, stats, "edges", "noise_z_mean", 0.25, 3)
    n_keep = round(0.25 * k)
    positions = S.rank_positions(k)
    first = pool.loc[pool["phase"] == 1, "source_batch"].to_numpy()
    np.testing.assert_array_equal(np.sort(first), np.sort(np.argsort(np.abs(positions - 0.5), kind="stable")[:n_keep]))
    second = pool.loc[pool["phase"] == 2, "source_batch"].to_numpy()
    np.testing.assert_array_equal(np.sort(second), np.arange(k - n_keep, k))
    # Phase 3 has no analysis phase: it reuses the last one and says so.
    np.testing.assert_array_equal(np.sort(pool.loc[pool["phase"] == 3, "source_batch"]), np.sort(second))
    assert any("phase 3" in note for note in notes)
    with pytest.raises(S.SelectionDataError, match="learned.ordering"):
        S.learned_pool(batches, stats, "perceptual", "noise_z_mean", 0.25, 3)


def test_random_subset_trains_on_as_many_random_batches_as_learned_keeps(experiment):
    config, train_ids, pools = experiment["config"], experiment["train_ids"], experiment["pools"]
    random_batches = experiment["orderings"]["random"]
    k = len(random_batches)
    learned_counts = pools.loc[pools["policy"] == "learned"].groupby("phase").size()
    n_keep = S.kept_count(config.learned_keep_fraction, k)
    assert n_keep == round(0.25 * k) == 6 and (learned_counts == n_keep).all()
    oracle = S.build_policy("oracle", config, 0, train_ids, pools)
    assert oracle.keep == n_keep  # equal keep fractions: the oracle keeps the same count of its K candidates
    subsets = {}
    for seed in (0, 1):
        policy = S.build_policy("random_subset", config, seed, train_ids, pools)
        used_by_phase: dict[int, list] = {}
        for epoch, phase, _ in config.recipe.schedule:
            used_by_phase.setdefault(phase, []).extend(map(tuple, policy.epoch_batches(epoch, phase)))
        for phase, used in used_by_phase.items():
            counts = pd.Series(used).value_counts()
            assert len(counts) == n_keep  # exactly learned's count of distinct batches in the phase
            assert counts.max() - counts.min() <= 1  # cycled: every kept batch used equally often
            assert set(counts.index) <= {tuple(b) for b in random_batches}  # whole batches of the random ordering
            subsets[seed, phase] = frozenset(counts.index)
    assert subsets[0, 1] != subsets[1, 1]  # drawn per seed
    assert subsets[0, 1] != subsets[0, 2]  # and per phase
    again = S.build_policy("random_subset", config, 0, train_ids, pools).epoch_batches(1, 1)
    assert {tuple(b) for b in again} <= subsets[0, 1]  # reproducible for a seed
    np.testing.assert_array_equal(S.random_subset_pools(random_batches, 0.25, 3, 0)[2],
                                  S.random_subset_pools(random_batches, 0.25, 3, 0)[2])


def test_pool_cycler_uses_every_batch_equally_often():
    pool = np.arange(70).reshape(7, 10)
    cycler = S.PoolCycler(pool, np.random.default_rng(0))
    taken = np.concatenate([cycler.take(5) for _ in range(7)])  # 35 steps over 7 batches
    counts = np.bincount(taken[:, 0] // 10, minlength=7)
    assert (counts == 5).all()


# --------------------------------------------------------------------------- class-balanced batches


def class_counts(batches: np.ndarray, label_of: dict[int, int], n_classes: int) -> np.ndarray:
    """``K x C`` counts of each class in each batch."""
    return np.array([np.bincount([label_of[int(i)] for i in batch], minlength=n_classes) for batch in batches])


def test_class_balanced_partition_holds_m_over_c_of_every_class_and_every_image_once():
    ids = np.arange(1000, 1400)  # 40 images of each of 10 classes, in class order
    labels = np.repeat(np.arange(10), 40)
    label_of = dict(zip(ids.tolist(), labels.tolist()))
    batches = S.class_balanced_partition(ids, labels, 20, np.random.default_rng(0))
    assert batches.shape == (20, 20)  # K = 400 / 20
    assert (class_counts(batches, label_of, 10) == 2).all()  # m / C = 2 of every class in every batch
    np.testing.assert_array_equal(np.sort(batches.ravel()), ids)  # every image exactly once


def test_class_balanced_partition_deals_the_remainder_over_different_classes():
    # m = 25 is no multiple of C = 10: 2 of every class, and the 5 remaining places from 5 different classes.
    ids = np.arange(400)
    labels = ids % 10
    label_of = dict(zip(ids.tolist(), labels.tolist()))
    batches = S.class_balanced_partition(ids, labels, 25, np.random.default_rng(1))
    counts = class_counts(batches, label_of, 10)
    assert batches.shape == (16, 25)
    assert set(np.unique(counts)) == {2, 3} and ((counts == 3).sum(axis=1) == 5).all()
    np.testing.assert_array_equal(np.sort(batches.ravel()), ids)  # 16 x 25 = 400: still every image once
    # Over the epoch the extra places go round the classes: each class gets 8 of the 80.
    np.testing.assert_array_equal((counts == 3).sum(axis=0), np.full(10, 8))


def test_class_balanced_partition_with_unequal_classes_and_a_remainder_of_images():
    sizes = [60, 50, 40, 40, 40, 40, 40, 40, 30, 10]  # 390 images; m = 20 gives K = 19 batches, 10 left out
    labels = np.repeat(np.arange(10), sizes)
    ids = np.arange(len(labels)) * 3 + 7
    label_of = dict(zip(ids.tolist(), labels.tolist()))
    batches = S.class_balanced_partition(ids, labels, 20, np.random.default_rng(2))
    assert batches.shape == (19, 20)
    used = batches.ravel()
    assert len(np.unique(used)) == used.size == 380 and np.isin(used, ids).all()  # no image twice; 390 - 380 out
    counts = class_counts(batches, label_of, 10)
    # Every batch gets min(m // C, n_c // K) of class c: 2 of the classes with at least 38 images, 1 of the
    # class of 30, none guaranteed of the class of 10 (its images fill remaining places instead).
    quota = np.minimum(2, np.array(sizes) // 19)
    assert (counts >= quota).all()
    assert counts[:, 9].sum() == 10  # the small class's images are all used, spread over the batches
    assert counts[:, 9].max() == 1


@pytest.mark.parametrize("name", S.CLASS_BALANCED)
def test_class_balanced_policies_differ_between_epochs_and_seeds_and_repeat_for_a_seed(experiment, name):
    config, train_ids, labels = experiment["config"], experiment["train_ids"], experiment["labels"]
    label_of = dict(zip(train_ids.tolist(), labels.tolist()))
    schedule = config.recipe.schedule

    def epochs(seed: int) -> list[np.ndarray]:
        policy = S.build_policy(name, config, seed, train_ids, experiment["pools"], labels=labels)
        return [policy.epoch_batches(epoch, phase) for epoch, phase, _ in schedule]

    first, again, other = epochs(0), epochs(0), epochs(1)
    for batches in first + other:
        # 24 training images per class and batches of 10: K = 24, one of every class per batch, all once.
        assert (class_counts(batches, label_of, N_CLASSES) == BATCH // N_CLASSES).all()
        np.testing.assert_array_equal(np.sort(batches.ravel()), train_ids)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)  # reproducible for a seed
    assert not np.array_equal(first[0], first[1])  # a fresh order (and, unless fixed, partition) each epoch
    as_sets = [{frozenset(b.tolist()) for b in batches} for batches in first]
    other_sets = {frozenset(b.tolist()) for b in other[0]}
    assert other_sets != as_sets[0]  # another seed, another partition
    if name == "class_balanced_fixed":
        assert all(s == as_sets[0] for s in as_sets)  # one partition, reordered
    else:
        assert as_sets[0] != as_sets[1]  # a fresh partition every epoch
    with pytest.raises(S.SelectionDataError, match="labels"):
        S.build_policy(name, config, 0, train_ids, experiment["pools"])


def test_first_batching_keeps_the_single_batching_of_a_multi_batching_table(experiment):
    scores = synthetic_scores(experiment["index"])["random"]
    several = pd.concat([scores.assign(batching=0),
                         scores.assign(batching=1, score=scores["score"].to_numpy()[::-1])], ignore_index=True)
    train_ids = experiment["train_ids"]
    np.testing.assert_array_equal(S.ordering_batches(several, "random", train_ids, BATCH),
                                  S.ordering_batches(scores, "random", train_ids, BATCH))


# --------------------------------------------------------------------------- the oracle


class ZeroLinear(nn.Module):
    """A linear classifier at zero weights: every example's cross-entropy gradient is fixed and known."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_oracle_probe_picks_the_batch_whose_gradient_is_the_mean():
    """Batch C holds one copy of each (duplicated) example of A and of B, so g_C = (g_A + g_B) / 2 = mean."""
    generator = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(4, 5, generator=generator, dtype=torch.float64), torch.randn(4, 5, generator=generator,
                                                                                        dtype=torch.float64)
    ya, yb = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 2, 0])
    batch_a = (torch.cat([xa, xa]), torch.cat([ya, ya]))
    batch_b = (torch.cat([xb, xb]), torch.cat([yb, yb]))
    batch_c = (torch.cat([xa, xb]), torch.cat([ya, yb]))
    model = ZeroLinear(5, 3).double()
    before = copy.deepcopy(model.state_dict())
    distances = S.probe_distances(model, [batch_a, batch_c, batch_b], 3)
    assert distances[1] < 1e-12 * distances.max()
    assert S.closest_batches(distances, 1).tolist() == [1]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])  # the probe ran on a copy


def test_oracle_probe_on_a_known_one_dimensional_problem():
    """Loss = mean(w * x): the gradient of a batch is its mean x; the mean of batch means is 1."""
    model = nn.Linear(1, 1, bias=False)
    batches = [(torch.full((4, 1), value), torch.zeros(4)) for value in (-3.0, 1.0, 2.0, 4.0)]
    distances = S.probe_distances(model, batches, 4, loss_fn=lambda out, _: out.mean())
    np.testing.assert_allclose(distances, [4.0, 0.0, 1.0, 3.0], atol=1e-6)
    assert S.closest_batches(distances, 2).tolist() == [1, 2]


def test_oracle_policy_trains_only_on_the_closest_candidates():
    train_ids = np.arange(100)
    oracle = S.OraclePolicy(train_ids, 10, seed=0, keep_fraction=0.2)
    assert oracle.num_candidates == 10 and oracle.keep == 2
    planted = {}

    def probe(candidates):
        distances = np.arange(len(candidates), 0, -1, dtype=float)  # the last two candidates are closest
        planted["closest"] = {tuple(candidates[-1]), tuple(candidates[-2])}
        return distances

    batches = oracle.epoch_batches(1, 1, probe)
    assert batches.shape == (10, 10)
    assert {tuple(b) for b in batches} == planted["closest"]
    counts = pd.Series([tuple(b) for b in batches]).value_counts()
    assert (counts == 5).all()


def test_oracle_probes_batchnorm_models_in_training_mode_without_touching_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    model.eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(12, 3, 8, 8)
    y = torch.randint(0, 3, (12,))
    distances = S.probe_distances(model, [(x[:6], y[:6]), (x[6:], y[6:])], 2)
    # Two batches: both are equally far from their mean.
    assert distances[0] == pytest.approx(distances[1], rel=1e-5) and distances[0] > 0
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


# --------------------------------------------------------------------------- the training loop


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Tiny models run fastest on one thread (two threads on the shared 2-core machine are ~10x slower)."""
    with cpu_threads(1):
        yield


@pytest.fixture(scope="module")
def tiny_data(experiment):
    index = experiment["index"]
    generator = torch.Generator().manual_seed(0)
    labels = torch.from_numpy(index.loc[index["split"] == "train", "label"].to_numpy().copy())
    # Class-dependent mean colour so that a tiny model can learn something.
    train = (torch.rand(len(labels), 8, 8, 3, generator=generator) * 120 + labels.view(-1, 1, 1, 1) * 12).to(torch.uint8)
    test_labels = torch.from_numpy(index.loc[index["split"] == "test", "label"].to_numpy().copy())
    test = (torch.rand(len(test_labels), 8, 8, 3, generator=generator) * 120
            + test_labels.view(-1, 1, 1, 1) * 12).to(torch.uint8)
    return S.ImageData.from_tables(index, experiment["split"], train, test)


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, N_CLASSES))


def test_training_counts_steps_passes_and_evaluations(experiment, tiny_data):
    config = experiment["config"]
    k = len(tiny_data.train_ids) // BATCH
    curves = {}
    for name in ("shuffle", "oracle"):
        torch.manual_seed(0)
        policy = S.build_policy(name, config, 0, tiny_data.train_ids, experiment["pools"])
        curve, result = S.train_with_policy(policy, tiny_model(), tiny_data, config.recipe, seed=0)
        curves[name] = curve
        assert len(curve) == 1 + config.recipe.num_epochs * config.recipe.evaluations_per_epoch
        assert result["steps"] == config.recipe.num_epochs * k == curve["step"].iloc[-1]
        assert curve["step"].iloc[0] == 0 and curve["seconds"].is_monotonic_increasing
        expected_probes = config.recipe.num_epochs * k if name == "oracle" else 0
        assert result["probe_passes"] == expected_probes
        assert result["passes"] == result["steps"] + expected_probes
        assert (result["probe_seconds"] > 0) == (name == "oracle")
        assert 0 <= result["test_accuracy"] <= 1
    # Same seed, same initial weights: the first evaluation is identical across policies.
    assert curves["shuffle"]["val_accuracy"].iloc[0] == curves["oracle"]["val_accuracy"].iloc[0]


def test_training_is_reproducible_on_the_cpu(experiment, tiny_data):
    config = experiment["config"]
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        policy = S.build_policy("paper_advice", config, 3, tiny_data.train_ids, experiment["pools"])
        curve, result = S.train_with_policy(policy, tiny_model(), tiny_data, config.recipe, seed=3)
        runs.append((curve.drop(columns=["seconds", "probe_seconds", "total_seconds"]), result["test_loss"]))
    pd.testing.assert_frame_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


def test_a_policy_that_picks_validation_images_is_stopped(experiment, tiny_data):
    class Cheat(S.BatchPolicy):
        name = "cheat"

        def epoch_batches(self, epoch, phase, probe=None):
            ids = np.resize(tiny_data.validation_ids, self.steps_per_epoch * self.batch_size)
            return ids.reshape(self.steps_per_epoch, self.batch_size)

    cheat = Cheat(len(tiny_data.train_ids) // BATCH, BATCH)
    with pytest.raises(RuntimeError, match="not a training image"):
        S.train_with_policy(cheat, tiny_model(), tiny_data, experiment["config"].recipe, seed=0)


def test_run_experiment_pairs_policies_by_seed(experiment, tiny_data):
    params = base_params(seeds=[5, 6], policies=["shuffle", "fixed_random"],
                         training={**base_params()["training"], "phases": [{"epochs": 1, "lr": 0.05}]})
    config = S.SelectionConfig.from_params(params)
    results = S.run_experiment(config, tiny_data, experiment["pools"], tiny_model)
    assert len(results.results) == 4
    assert set(zip(results.results["seed"], results.results["policy"])) == {
        (5, "shuffle"), (5, "fixed_random"), (6, "shuffle"), (6, "fixed_random")}
    start = results.curves.loc[results.curves["step"] == 0].set_index(["seed", "policy"])["val_loss"]
    assert start.loc[(5, "shuffle")] == start.loc[(5, "fixed_random")]
    assert start.loc[(5, "shuffle")] != start.loc[(6, "shuffle")]


def test_upfront_selection_cost_is_learned_s_measured_analysis_seconds():
    config = S.SelectionConfig.from_params(base_params())
    history = pd.DataFrame({"seed": [0, 0, 1, 1], "seconds": [1.5, 2.0, 1.0, 0.5]})
    assert S.upfront_selection_seconds(config, {"intensity": history, "color": history * 10}) == {"learned": 5.0}
    free = S.SelectionConfig.from_params(base_params(learned={"charge_distance_seconds": False}))
    assert S.upfront_selection_seconds(free, {}) == {}
    without = S.SelectionConfig.from_params(base_params(policies=["shuffle", "oracle"]))
    assert S.upfront_selection_seconds(without, {}) == {}
    with pytest.raises(S.SelectionDataError, match="intensity.training_history"):
        S.upfront_selection_seconds(config, {"color": history})
    with pytest.raises(S.SelectionConfigError, match="learned.charge_distance_seconds"):
        S.SelectionConfig.from_params(base_params(learned={"charge_distance_seconds": "yes"}))


def test_training_adds_the_upfront_selection_seconds_to_its_clock(experiment, tiny_data):
    config = experiment["config"]
    torch.manual_seed(0)
    policy = S.build_policy("shuffle", config, 0, tiny_data.train_ids, experiment["pools"])
    curve, result = S.train_with_policy(policy, tiny_model(), tiny_data, config.recipe, seed=0, upfront_seconds=100.0)
    np.testing.assert_allclose(curve["total_seconds"], curve["seconds"] + 100.0)
    assert curve["total_seconds"].iloc[0] == 100.0  # before the first step the selection is already paid
    assert result["upfront_seconds"] == 100.0
    assert result["total_seconds"] == pytest.approx(result["seconds"] + 100.0)
    assert result["selection_seconds"] == pytest.approx(result["probe_seconds"] + 100.0)


# --------------------------------------------------------------------------- statistics


def test_t_interval_matches_the_textbook_values():
    interval = T.t_interval([1, 2, 3, 4, 5], 0.95)
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)
    assert interval.mean == 3 and interval.n == 5
    assert interval.low == pytest.approx(3 - half) and interval.high == pytest.approx(3 + half)
    single = T.t_interval([0.4])
    assert single.mean == 0.4 and math.isnan(single.low)


def test_paired_test_detects_a_planted_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    baseline = rng.normal(0.5, 0.05, size=8)  # seed-to-seed spread shared by both policies
    zero_mean_noise = np.array([0.004, -0.003, 0.002, -0.005, 0.001, 0.003, -0.002, 0.0])
    better = baseline + 0.03 + zero_mean_noise
    same = baseline + zero_mean_noise
    planted = T.paired_comparison(better, baseline)
    assert planted["p_value"] < 1e-4 and planted["difference_low"] > 0
    assert planted["difference_low"] < 0.03 < planted["difference_high"]
    assert planted["p_sign_flip"] == pytest.approx(2 / 256)
    null = T.paired_comparison(same, baseline)
    assert null["p_value"] > 0.5 and null["difference_low"] < 0 < null["difference_high"]
    # Welch ignores the pairing, so the shared seed spread hides the same planted effect.
    assert T.welch_comparison(better, baseline)["p_value"] > planted["p_value"]


def test_paired_test_keeps_its_error_rate_under_the_null():
    rng = np.random.default_rng(1)
    rejections = sum(
        T.paired_comparison(rng.normal(size=5), rng.normal(size=5))["p_value"] < 0.05 for _ in range(2000)
    )
    assert 0.035 < rejections / 2000 < 0.065
    covered = 0
    for _ in range(2000):
        a = rng.normal(0.2, 1, size=5)
        c = T.paired_comparison(a, np.zeros(5))
        covered += c["difference_low"] <= 0.2 <= c["difference_high"]
    assert 0.93 < covered / 2000 < 0.97


def test_tests_agree_with_scipy():
    from scipy import stats

    rng = np.random.default_rng(4)
    a, b = rng.normal(0.3, 1, size=7), rng.normal(size=7)
    assert T.paired_comparison(a, b)["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-9)
    assert T.welch_comparison(a, b[:5])["p_value"] == pytest.approx(
        stats.ttest_ind(a, b[:5], equal_var=False).pvalue, rel=1e-9)
    interval = stats.t.interval(0.95, 6, loc=a.mean(), scale=stats.sem(a))
    assert (T.t_interval(a).low, T.t_interval(a).high) == pytest.approx(interval, rel=1e-9)


def test_sign_flip_p_value_is_exact_for_small_samples():
    assert T.sign_flip_p_value([1, 1, 1, 1, 1]) == pytest.approx(2 / 32)
    assert T.sign_flip_p_value([1, -1, 1, -1]) == 1.0
    assert 0.0 < T.sign_flip_p_value(np.ones(20)) < 0.001  # Monte Carlo branch


def test_unpaired_seeds_fall_back_to_welch():
    policy = pd.Series([0.5, 0.52, 0.49], index=[0, 1, 2])
    baseline = pd.Series([0.4, 0.41, 0.42], index=[3, 4, 5])
    result = T.compare_with_baseline(policy, baseline)
    assert result["test"] == T.WELCH_T and result["p_value"] < 0.01
    paired = T.compare_with_baseline(policy, pd.Series([0.4, 0.41, 0.42], index=[2, 1, 0]))
    assert paired["test"] == T.PAIRED_T
    assert paired["difference"] == pytest.approx(np.mean([0.5 - 0.42, 0.52 - 0.41, 0.49 - 0.4]))


def planted_curves(effects: dict[str, float], seeds=range(6), steps=(0, 10, 20, 30, 40)) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Curves rising towards 0.6 per policy, shifted by a planted effect, with noise shared within a seed."""
    rng = np.random.default_rng(2)
    rows, results = [], []
    for seed in seeds:
        seed_shift = rng.normal(0, 0.03)
        for policy, effect in effects.items():
            for i, step in enumerate(steps):
                accuracy = 0.1 if step == 0 else 0.6 * (1 - math.exp(-step / 15)) + seed_shift + effect + rng.normal(0, 0.002)
                rows.append({"seed": seed, "policy": policy, "epoch": i, "phase": 1, "learning_rate": 0.1,
                             "step": step, "passes": step, "probe_passes": 0, "seconds": step * 0.5,
                             "probe_seconds": 0.0, "train_loss": 1.0, "val_loss": 1.0, "val_accuracy": accuracy})
            results.append({"seed": seed, "policy": policy, "steps": steps[-1], "passes": steps[-1], "probe_passes": 0,
                            "seconds": steps[-1] * 0.5, "probe_seconds": 0.0, "final_val_accuracy": rows[-1]["val_accuracy"],
                            "test_loss": 1.0, "test_accuracy": rows[-1]["val_accuracy"] + rng.normal(0, 0.002),
                            "distinct_images_trained": 100})
    return pd.DataFrame(rows), pd.DataFrame(results)


def with_clock(curves: pd.DataFrame, results: pd.DataFrame, upfront: dict[str, float],
               per_step: dict[str, float] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The planted tables with the equal-compute columns: per-step seconds and an up-front cost per policy."""
    curves, results = curves.copy(), results.copy()
    rate = curves["policy"].map(lambda p: (per_step or {}).get(p, 0.5))
    curves["seconds"] = curves["step"] * rate
    curves["total_seconds"] = curves["seconds"] + curves["policy"].map(lambda p: upfront.get(p, 0.0))
    ends = curves.sort_values("step").groupby(["seed", "policy"]).tail(1).set_index(["seed", "policy"])
    key = list(zip(results["seed"], results["policy"]))
    results["seconds"] = ends.loc[key, "seconds"].to_numpy()
    results["upfront_seconds"] = results["policy"].map(lambda p: upfront.get(p, 0.0))
    results["selection_seconds"] = results["probe_seconds"] + results["upfront_seconds"]
    results["total_seconds"] = results["seconds"] + results["upfront_seconds"]
    return curves, results


def test_equal_wall_clock_counts_the_selection_time():
    # Same accuracy per step as shuffle, but "costly" pays 12 s up front (shuffle's runs take 20 s), so at
    # shuffle's wall-clock it has trained only 16 of 40 steps; "hopeless" pays more than shuffle's whole run
    # and counts with its initial model; "slow" is 3x slower per step.
    effects = {"shuffle": 0.0, "costly": 0.0, "hopeless": 0.0, "slow": 0.0}
    curves, results = with_clock(*planted_curves(effects), upfront={"costly": 12.0, "hopeless": 30.0},
                                 per_step={"slow": 1.5})
    summary = T.policy_summary(curves, results, target=0.35, policies=list(effects)).set_index("policy")
    # At equal steps all are the same ...
    assert set(summary.loc[["costly", "hopeless", "slow"], "verdict"]) == {T.NO_DIFFERENCE}
    # ... at equal wall-clock, selection time included, they are behind.
    assert summary.loc[["costly", "hopeless", "slow"], "wallclock_verdict"].tolist() == [T.SLOWER] * 3
    assert summary.loc["shuffle", "wallclock_verdict"] == T.BASELINE_VERDICT
    by_run = T.run_endpoints(curves, results, 0.35).set_index(["policy", "seed"])
    assert (by_run.loc["hopeless", "val_at_budget"] == 0.1).all()  # the accuracy before the first step
    assert (by_run.loc["costly", "steps_at_budget"] == 10).all()  # 12 + 0.5 x 10 <= 20 < 12 + 0.5 x 20
    np.testing.assert_allclose(by_run.loc["shuffle", "val_at_budget"], by_run.loc["shuffle", "final_val_accuracy"])
    # Seconds to the target count the up-front cost too.
    shuffle_s, costly_s = summary.loc["shuffle", "seconds_to_target_mean"], summary.loc["costly", "seconds_to_target_mean"]
    assert costly_s == pytest.approx(shuffle_s + 12.0)
    np.testing.assert_allclose(summary.loc[["costly", "hopeless", "slow"], "val_at_budget_p_holm"],
                               holm_adjust(summary.loc[["costly", "hopeless", "slow"], "val_at_budget_p"]))
    sentence = T.answer_sentence(summary.reset_index())
    assert "at equal wall-clock" in sentence and "costly, hopeless and slow lower" in sentence
    content = T.report_content(summary.reset_index(), T.curve_summary(curves), sentence, {})
    column = content.summary_header.index("wall-clock verdict")
    assert [row[column] for row in content.summary_rows] == [T.BASELINE_VERDICT] + [T.SLOWER] * 3
    seconds = content.summary_header.index("seconds / run (selection)")
    assert content.summary_rows[1][seconds] == "32.0 (12.0)"
    figure = T.convergence_figure(T.curve_summary(curves), 0.35)
    assert figure.axes[1].get_xscale() == "log"  # an up-front cost: the seconds axis is logarithmic
    plt.close(figure)


def test_summary_finds_the_planted_verdicts():
    curves, results = planted_curves({"shuffle": 0.0, "better": 0.05, "worse": -0.3, "same": 0.0})
    summary = T.policy_summary(curves, results, target=0.35, policies=["shuffle", "better", "worse", "same"])
    verdicts = summary.set_index("policy")["verdict"]
    assert verdicts.to_dict() == {"shuffle": T.BASELINE_VERDICT, "better": T.FASTER, "worse": T.SLOWER,
                                  "same": T.NO_DIFFERENCE}
    row = summary.set_index("policy").loc["better"]
    assert row["val_auc_diff_low"] < 0.05 < row["val_auc_diff_high"]
    assert row["test"] == T.PAIRED_T
    # "worse" tops out near 0.56 - 0.3: it never reaches 0.35; the others do.
    assert summary.set_index("policy").loc["worse", "not_reached"] == 6
    assert summary.set_index("policy").loc["shuffle", "not_reached"] == 0
    assert row["steps_to_target_mean"] <= summary.set_index("policy").loc["shuffle", "steps_to_target_mean"]
    sentence = T.answer_sentence(summary)
    assert "better" in sentence and "faster" in sentence and "worse" in sentence
    assert "same showed no detectable difference" in sentence


def test_summary_says_no_detectable_difference_when_there_is_none():
    curves, results = planted_curves({"shuffle": 0.0, "a": 0.0, "b": 0.0})
    summary = T.policy_summary(curves, results, target=0.35)
    assert set(summary.loc[summary["policy"] != "shuffle", "verdict"]) == {T.NO_DIFFERENCE}
    sentence = T.answer_sentence(summary)
    assert sentence.startswith("No:") and "no detectable difference" in sentence
    assert sentence.count(".") >= 1 and "\n" not in sentence


CONTROL_EFFECTS = {"shuffle": 0.0, "random_subset": -0.1, "paper_advice": -0.2, "learned": -0.1, "oracle": 0.0}


def test_subset_policies_are_compared_with_the_random_subset_control():
    curves, results = planted_curves(CONTROL_EFFECTS)
    summary = T.policy_summary(curves, results, target=0.3, policies=list(CONTROL_EFFECTS)).set_index("policy")
    # Against shuffle: the control and the two weaker policies are slower, the oracle is not.
    assert summary["verdict"].to_dict() == {"shuffle": T.BASELINE_VERDICT, "random_subset": T.SLOWER,
                                            "paper_advice": T.SLOWER, "learned": T.SLOWER, "oracle": T.NO_DIFFERENCE}
    # Against the control: learned is no worse than random batches, paper_advice is, the oracle is better.
    assert summary["control_verdict"].to_dict() == {"shuffle": "", "random_subset": "", "paper_advice": T.SLOWER,
                                                    "learned": T.NO_DIFFERENCE, "oracle": T.FASTER}
    assert (summary["control"] == "random_subset").all()
    for policy, planted in (("paper_advice", -0.1), ("oracle", 0.1)):
        row = summary.loc[policy]
        assert row["val_auc_ctrl_diff"] == pytest.approx(planted, abs=0.003)  # within the planted noise
        assert row["val_auc_ctrl_diff_low"] < row["val_auc_ctrl_diff"] < row["val_auc_ctrl_diff_high"]
        assert row["val_auc_ctrl_diff_high"] - row["val_auc_ctrl_diff_low"] < 0.01
    assert summary.loc[["shuffle", "random_subset"], "val_auc_ctrl_p"].isna().all()
    compared = summary.loc[["paper_advice", "learned", "oracle"]]
    np.testing.assert_allclose(compared["val_auc_ctrl_p_holm"], holm_adjust(compared["val_auc_ctrl_p"]))
    # The same paired test as against shuffle, on the per-seed differences from the control.
    by_run = T.run_endpoints(curves, results, 0.3).set_index(["policy", "seed"])["val_auc"]
    direct = T.paired_comparison(by_run.loc["learned"].sort_index(), by_run.loc["random_subset"].sort_index())
    assert summary.loc["learned", "val_auc_ctrl_diff"] == pytest.approx(direct["difference"])
    assert summary.loc["learned", "val_auc_ctrl_p"] == pytest.approx(direct["p_value"])
    sentence = T.answer_sentence(summary.reset_index())
    main, control = sentence.split("; against the random_subset control: ")
    assert "oracle showed no detectable difference" in main
    assert "oracle converged faster than random_subset" in control
    assert "paper_advice converged slower" in control and "learned showed no detectable difference" in control
    assert "\n" not in sentence and sentence.endswith(").")


def test_without_the_control_there_is_no_control_comparison():
    curves, results = planted_curves({"shuffle": 0.0, "learned": -0.1})
    summary = T.policy_summary(curves, results, target=0.3)
    assert "control_verdict" not in summary.columns and (summary["control"] == "").all()
    assert "control" not in T.answer_sentence(summary)
    content = T.report_content(summary, T.curve_summary(curves), "answer", {})
    assert content.control_rows == [] and "random_subset" not in T.markdown_fragment(content)


def test_time_to_target_takes_the_first_evaluation_at_or_above_it():
    curves = pd.DataFrame({"seed": 0, "policy": "p", "step": [0, 10, 20, 30], "passes": [0, 15, 30, 45],
                           "seconds": [0.0, 1.0, 2.0, 3.0], "epoch": [0, 1, 2, 3],
                           "val_accuracy": [0.1, 0.3, 0.5, 0.4]})
    row = T.time_to_target(curves, 0.5).iloc[0]
    assert row["reached"] and row["steps_to_target"] == 20 and row["passes_to_target"] == 30
    assert not T.time_to_target(curves, 0.6).iloc[0]["reached"]


def test_figure_and_fragments_show_every_policy():
    curves, results = planted_curves({"shuffle": 0.0, "oracle": 0.02})
    summary = T.policy_summary(curves, results, target=0.35)
    curves_summary = T.curve_summary(curves)
    figure = T.convergence_figure(curves_summary, 0.35)
    assert len(figure.axes) == 2
    for ax in figure.axes:
        assert len(ax.lines) == 3  # two policies and the target line
        assert ax.get_xlabel() and len(ax.collections) == 2  # one interval band per policy
    plt.close(figure)
    content = T.report_content(summary, curves_summary, T.answer_sentence(summary), {"model": "tiny"}, ["a note"])
    markdown = T.markdown_fragment(content, "batch_selection.convergence_png")
    html = T.html_fragment(content, b"\x89PNG fake")
    for text in (markdown, html):
        assert "shuffle" in text and "oracle" in text and "a note" in text
    assert content.answer in markdown
    assert "data:image/png;base64," in html and html.startswith('<section id="batch-selection">')
    assert len(content.epochs_rows) == curves["epoch"].nunique()
    distinct = content.summary_header.index("distinct images trained / run")
    assert [row[distinct] for row in content.summary_rows] == ["100", "100"]


def test_fragments_hold_the_control_table():
    curves, results = planted_curves(CONTROL_EFFECTS)
    summary = T.policy_summary(curves, results, target=0.3, policies=list(CONTROL_EFFECTS))
    content = T.report_content(summary, T.curve_summary(curves), T.answer_sentence(summary), {})
    assert "six policies" not in content.intro and "five policies" in content.intro
    assert [row[0] for row in content.control_rows] == ["paper_advice", "learned", "oracle"]
    assert [row[-2] for row in content.control_rows] == [T.SLOWER, T.NO_DIFFERENCE, T.FASTER]
    markdown, html = T.markdown_fragment(content), T.html_fragment(content)
    for text in (markdown, html):
        assert "Against the random_subset control" in text and "diff. vs random_subset" in text
