"""Sorting and batching invariants, on hand-made tables and on the real CIFAR-10 data."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from scipy.stats import entropy

from best_minibatch.batches.batching import (
    ASSIGNMENT_COLUMNS,
    BatchingError,
    SortBatchesConfig,
    class_entropy,
    sort_into_batches,
    tie_keys,
    tied_images,
)
from best_minibatch.metrics.scoring import METRICS, score_images


@pytest.fixture
def no_cached_alexnet(tmp_path, monkeypatch):
    """Make sure the perceptual metric finds no AlexNet weights, whatever this machine's cache holds."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def score_all(dataset) -> dict[str, pd.DataFrame]:
    images = dataset.images["train"].numpy()
    train = dataset.index[dataset.index["split"] == "train"].sort_values("row")
    return {name: score_images(name, images, train["image_id"].to_numpy(), {})[0] for name in METRICS}


@pytest.fixture(scope="module")
def sample_scores(sample_dataset):
    # Module scope: the TORCH_HOME override is not available here, so leave out the perceptual metric.
    images = sample_dataset.images["train"].numpy()
    ids = sample_dataset.index.query("split == 'train'").sort_values("row")["image_id"].to_numpy()
    return {name: score_images(name, images, ids, {})[0] for name in METRICS if name != "perceptual"}


def tiny_index(labels: list[int]) -> pd.DataFrame:
    names = ["cat", "dog", "ship"]
    n = len(labels)
    return pd.DataFrame(
        {
            "image_id": np.arange(n, dtype=np.int64),
            "split": ["train"] * n,
            "row": np.arange(n, dtype=np.int64),
            "label": labels,
            "class_name": [names[label] for label in labels],
            "source": [f"test:{i}" for i in range(n)],
        }
    )


def check_batch_invariants(assignments, summary, scores, metric, batch_size):
    n = len(scores)
    k = n // batch_size
    assert list(assignments.columns) == list(ASSIGNMENT_COLUMNS)
    assert len(assignments) == k * batch_size
    assert assignments["image_id"].is_unique  # each image at most once
    assert assignments["image_id"].isin(scores["image_id"]).all()
    assert (assignments.groupby("batch").size() == batch_size).all()  # every batch has exactly m images
    assert assignments["batch"].tolist() == np.repeat(np.arange(k), batch_size).tolist()
    assert assignments["position"].tolist() == np.tile(np.arange(batch_size), k).tolist()
    assert (assignments["metric"] == metric).all()
    assert len(summary) == k and summary["batch"].tolist() == list(range(k))
    assert (np.diff(summary["metric_mean"].to_numpy()) >= 0).all()  # batch means non-decreasing
    assert (summary["metric_min"] <= summary["metric_mean"]).all()
    assert (summary["metric_mean"] <= summary["metric_max"]).all()
    counts = summary.filter(like="class_count_")
    assert (counts.sum(axis=1) == batch_size).all()


# --------------------------------------------------------------------------- hand-made tables


def test_ties_are_broken_by_a_seeded_random_key_whatever_the_row_order():
    scores = pd.DataFrame({"image_id": [5, 3, 0, 4, 1, 2], "score": [1.0, 0.0, 1.0, 0.0, 1.0, 2.0]})
    index = tiny_index([0] * 6)
    first, summary = sort_into_batches(scores, index, "intensity", 2)
    shuffled, _ = sort_into_batches(scores.sample(frac=1, random_state=3), index, "intensity", 2)
    assert shuffled["image_id"].tolist() == first["image_id"].tolist()
    assert first["metric_value"].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 2.0]
    keys = dict(zip(range(6), tie_keys(np.arange(6), 0)))
    assert first["image_id"].tolist() == sorted([3, 4], key=keys.get) + sorted([0, 1, 5], key=keys.get) + [2]
    assert (summary["tied_images"] == 5).all()  # images 3, 4 share 0.0; 0, 1, 5 share 1.0
    orders = {tuple(sort_into_batches(scores, index, "intensity", 2, tie_seed=s)[0]["image_id"]) for s in range(8)}
    assert len(orders) > 1  # the seed, not the id, decides among tied images


def test_random_tie_breaks_keep_tied_images_from_grouping_by_class(sample_dataset):
    """Image ids follow class order in an image-folder source: an id tie-break groups tied images by class."""
    index = sample_dataset.index
    train = index[index["split"] == "train"].sort_values("row")
    scores, _ = score_images("edges", sample_dataset.images["train"].numpy(), train["image_id"].to_numpy(), {})
    order = np.lexsort([scores["image_id"].to_numpy(), scores["score"].to_numpy()])  # the old tie-break
    old = scores.iloc[order[: len(order) // 100 * 100]]
    labels = old["image_id"].map(train.set_index("image_id")["label"]).to_numpy().reshape(-1, 100)
    counts = np.stack([np.bincount(row, minlength=10) for row in labels])
    id_entropy = class_entropy(counts).mean()
    random_entropy = [sort_into_batches(scores, index, "edges", 100, tie_seed=s)[1]["class_entropy"].mean()
                      for s in range(3)]
    assert tied_images(scores, ("score",)) > 4000  # edges takes few distinct values on 32x32 images
    assert min(random_entropy) > id_entropy


def test_color_sorts_by_hue_then_saturation_then_value():
    scores = pd.DataFrame(
        {
            "image_id": [0, 1, 2, 3, 4],
            "hue": [10.0, 5.0, 10.0, 10.0, 5.0],
            "saturation": [0.5, 0.9, 0.2, 0.5, 0.9],
            "value": [0.3, 0.1, 0.9, 0.1, 0.1],
        }
    )
    scores.insert(1, "score", scores["hue"])
    assignments, summary = sort_into_batches(scores, tiny_index([0] * 5), "color", 1)
    # hue 5 (ids 1, 4: identical keys -> by the random tie key), then hue 10 by saturation (2),
    # then value (3 before 0).
    keys = dict(zip([1, 4], tie_keys(np.array([1, 4]), 0)))
    assert assignments["image_id"].tolist() == sorted([1, 4], key=keys.get) + [2, 3, 0]
    assert summary["metric_mean"].tolist() == [5.0, 5.0, 10.0, 10.0, 10.0]


def test_remainder_with_the_largest_sort_keys_is_dropped():
    scores = pd.DataFrame({"image_id": np.arange(7), "score": [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]})
    assignments, summary = sort_into_batches(scores, tiny_index([0] * 7), "edges", 3)
    assert assignments["image_id"].tolist() == [6, 5, 4, 3, 2, 1]  # image 0 (score 6) is dropped
    assert summary["metric_min"].tolist() == [0.0, 3.0]
    assert summary["metric_max"].tolist() == [2.0, 5.0]


def test_summary_counts_classes_and_their_entropy_in_nats():
    labels = [0, 0, 1, 2, 2, 2, 1, 1]
    scores = pd.DataFrame({"image_id": np.arange(8), "score": np.arange(8, dtype=float)})
    _, summary = sort_into_batches(scores, tiny_index(labels), "intensity", 4)
    assert summary.filter(like="class_count_").columns.tolist() == [
        "class_count_cat", "class_count_dog", "class_count_ship",
    ]
    assert summary[["class_count_cat", "class_count_dog", "class_count_ship"]].to_numpy().tolist() == [
        [2, 1, 1],
        [0, 2, 2],
    ]
    np.testing.assert_allclose(summary["class_entropy"], [entropy([2, 1, 1]), entropy([2, 2])], rtol=1e-12)


def test_skipped_metric_gives_empty_tables_with_all_columns(caplog):
    empty = METRICS["perceptual"].empty_scores()
    with caplog.at_level(logging.INFO, logger="best_minibatch.batches.batching"):
        assignments, summary = sort_into_batches(empty, tiny_index([0, 1, 2]), "perceptual", 2)
    assert len(assignments) == 0 and list(assignments.columns) == list(ASSIGNMENT_COLUMNS)
    assert assignments.dtypes[["batch", "position", "image_id"]].tolist() == [np.dtype("int64")] * 3
    assert len(summary) == 0
    assert summary.columns.tolist() == [
        "metric", "ordering", "batching", "batch", "metric_min", "metric_mean", "metric_max", "class_entropy",
        "class_count_cat", "class_count_dog", "class_count_ship", "tied_images",
    ]
    assert "perceptual" in caplog.text and "skipped" in caplog.text


@pytest.mark.parametrize("size", [0, -3, 2.5, True, "100"])
def test_bad_batch_size_names_the_parameter(size):
    with pytest.raises(BatchingError, match=r"Parameter sort_batches\.batch_size: must be a positive integer"):
        SortBatchesConfig.from_params({"batch_size": size})


def test_batch_size_larger_than_the_training_set_is_an_error():
    scores = pd.DataFrame({"image_id": np.arange(3), "score": [0.0, 1.0, 2.0]})
    with pytest.raises(BatchingError, match=r"sort_batches\.batch_size=4 exceeds the 3 images"):
        sort_into_batches(scores, tiny_index([0, 0, 0]), "intensity", 4)


@pytest.mark.parametrize(
    "image_ids, values, message",
    [
        ([0, 0, 1], [0.0, 1.0, 2.0], "more than once"),
        ([0, 1, 9], [0.0, 1.0, 2.0], "not a training image"),
        ([0, 1, 2], [0.0, np.nan, 2.0], "NaN"),
    ],
)
def test_inconsistent_scores_are_rejected(image_ids, values, message):
    scores = pd.DataFrame({"image_id": image_ids, "score": values})
    with pytest.raises(BatchingError, match=message):
        sort_into_batches(scores, tiny_index([0, 0, 0]), "intensity", 1)


# --------------------------------------------------------------------------- real data


@pytest.mark.parametrize("batch_size", [100, 256])
def test_batches_of_the_real_sample_keep_every_invariant(sample_dataset, sample_scores, batch_size):
    for metric, scores in sample_scores.items():
        assert len(scores) == 5000
        assignments, summary = sort_into_batches(scores, sample_dataset.index, metric, batch_size)
        check_batch_invariants(assignments, summary, scores, metric, batch_size)
        assert len(summary) == 5000 // batch_size  # 50 batches of 100; 19 of 256, 136 dropped
        assert summary.filter(like="class_count_").shape[1] == 10


def test_random_ordering_is_not_the_index_order(sample_dataset, sample_scores):
    assignments, _ = sort_into_batches(sample_scores["random"], sample_dataset.index, "random", 100)
    assert assignments["image_id"].tolist() != sorted(assignments["image_id"])


@pytest.mark.slow
def test_whole_training_set_is_scored_and_batched_with_the_paper_counts(full_dataset, no_cached_alexnet):
    tables = score_all(full_dataset)
    for metric, scores in tables.items():
        if metric == "perceptual":  # no AlexNet weights on this machine: skipped, empty
            assert len(scores) == 0
            assignments, summary = sort_into_batches(scores, full_dataset.index, metric, 256)
            assert len(assignments) == 0 and len(summary) == 0
            continue
        assert len(scores) == 50_000 and scores["image_id"].is_unique
        assignments, summary = sort_into_batches(scores, full_dataset.index, metric, 256)
        check_batch_invariants(assignments, summary, scores, metric, 256)
        assert len(summary) == 195 and len(assignments) == 49_920  # 80 images dropped
