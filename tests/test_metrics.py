"""Metric values on hand-made images, the registry, and the perceptual metric's weights handling."""

from __future__ import annotations

import colorsys
import dataclasses
import logging

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

from best_minibatch.metrics import lpips_weights
from best_minibatch.metrics import perceptual as metrics
from best_minibatch.metrics import scoring as metrics_scoring
from best_minibatch.metrics.scoring import (
    METRICS,
    MetricConfigError,
    MetricUnavailableError,
    combine_scores,
    register_metric,
    rgb_to_hsv,
    score_images,
)

SIDE = 32
PIXELS = SIDE * SIDE


def solid(rgb: tuple[int, int, int]) -> np.ndarray:
    image = np.empty((SIDE, SIDE, 3), dtype=np.uint8)
    image[:] = rgb
    return image


def two_colour(left: tuple[int, int, int], right: tuple[int, int, int]) -> np.ndarray:
    image = solid(left)
    image[:, SIDE // 2:] = right
    return image


BLACK, WHITE, RED = solid((0, 0, 0)), solid((255, 255, 255)), solid((255, 0, 0))
RED_BLUE = two_colour((255, 0, 0), (0, 0, 255))  # mean (127.5, 0, 127.5): magenta
RED_GREEN = two_colour((255, 0, 0), (0, 255, 0))  # mean (127.5, 127.5, 0): yellow
HAND_MADE = np.stack([BLACK, WHITE, RED, RED_BLUE, RED_GREEN])


@pytest.fixture
def no_cached_alexnet(tmp_path, monkeypatch):
    """No source has the AlexNet weights: an empty torch cache (torch.hub.get_dir() follows TORCH_HOME, and
    both torchvision's file and the converted one live under it), downloads off (the default)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert not lpips_weights.torchvision_cache_path().exists()
    assert not lpips_weights.stored_weights_path().exists()


@pytest.fixture
def perceptual_must_not_score(monkeypatch):
    """Replace the perceptual score function by one that fails: proves no scoring work starts."""

    def fail(images, options):
        raise AssertionError("the perceptual metric started scoring although its weights are missing")

    monkeypatch.setitem(METRICS, "perceptual", dataclasses.replace(METRICS["perceptual"], score=fail))


@pytest.fixture
def one_torch_thread():
    """Tiny LPIPS batches run faster on one thread, and far faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def random_alexnet_file(tmp_path):
    """A file in torchvision's AlexNet state-dict format holding a RANDOMLY INITIALISED network (not ImageNet)."""
    torch.manual_seed(0)
    path = tmp_path / "random_alexnet_not_imagenet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path


# --------------------------------------------------------------------------- registry


def test_registry_holds_the_five_orderings_in_contract_order():
    assert list(METRICS) == ["intensity", "color", "edges", "perceptual", "random"]
    assert METRICS["color"].sort_columns == ("hue", "saturation", "value")
    assert METRICS["color"].score_columns == ("image_id", "score", "hue", "saturation", "value")
    for name in ("intensity", "edges", "perceptual", "random"):
        assert METRICS[name].sort_columns == ("score",)
        assert METRICS[name].score_columns == ("image_id", "score")
    assert all(metric.description for metric in METRICS.values())


def test_adding_a_metric_takes_one_registered_function():
    try:

        @register_metric("darkest_channel", description="test-only: sum of the darkest channel")
        def darkest_channel(images, options):
            return pd.DataFrame({"score": images.reshape(len(images), -1, 3).sum(axis=1).min(axis=1).astype(float)})

        assert list(METRICS)[-1] == "darkest_channel"
        table, status = score_images("darkest_channel", HAND_MADE, np.arange(5), {})
        assert status == {"metric": "darkest_channel", "status": "ok", "reason": None}
        assert table["score"].tolist() == [0.0, 255.0 * PIXELS, 0.0, 0.0, 0.0]
    finally:
        METRICS.pop("darkest_channel", None)


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="registered twice"):
        register_metric("edges", description="duplicate")(lambda images, options: None)


def test_unknown_metric_option_names_the_parameter():
    with pytest.raises(MetricConfigError, match=r"score_metrics\.edges\.low_treshold"):
        score_images("edges", HAND_MADE, np.arange(5), {"edges": {"low_treshold": 50}})
    with pytest.raises(MetricConfigError, match=r"score_metrics\.sharpness: unknown parameter. Known parameters: color, edges"):
        score_images("edges", HAND_MADE, np.arange(5), {"sharpness": {}})


def test_score_images_rejects_mismatched_ids_and_non_uint8_images():
    with pytest.raises(ValueError, match="5 image ids for 4 images"):
        score_images("intensity", HAND_MADE[:4], np.arange(5), {})
    with pytest.raises(ValueError, match="duplicates"):
        score_images("intensity", HAND_MADE, [0, 1, 2, 3, 3], {})
    with pytest.raises(ValueError, match="uint8"):
        score_images("intensity", HAND_MADE.astype(np.float32), np.arange(5), {})


# --------------------------------------------------------------------------- M1 intensity


def test_intensity_is_the_exact_pixel_sum_on_hand_made_images():
    table, status = score_images("intensity", HAND_MADE, np.arange(10, 15), {})
    assert status["status"] == "ok"
    assert table["image_id"].tolist() == [10, 11, 12, 13, 14]
    assert table["score"].tolist() == [
        0.0,
        3 * 255.0 * PIXELS,  # white: every channel of every pixel is 255
        255.0 * PIXELS,  # pure red: one channel
        255.0 * PIXELS,  # half red + half blue: one channel per pixel
        255.0 * PIXELS,
    ]


# --------------------------------------------------------------------------- M2 colour


def test_hsv_of_mean_colour_is_exact_on_hand_made_images():
    table, _ = score_images("color", HAND_MADE, np.arange(5), {})
    hsv = table[["hue", "saturation", "value"]].to_numpy()
    expected = np.array(
        [
            [0.0, 0.0, 0.0],  # black: hue and saturation 0 by convention
            [0.0, 0.0, 1.0],  # white: a grey, hue 0
            [0.0, 1.0, 1.0],  # red
            [300.0, 1.0, 0.5],  # mean (127.5, 0, 127.5): magenta at half value
            [60.0, 1.0, 0.5],  # mean (127.5, 127.5, 0): yellow at half value
        ]
    )
    np.testing.assert_allclose(hsv, expected, rtol=0, atol=1e-12)
    assert table["score"].tolist() == table["hue"].tolist()  # the primary value is the hue


def test_rgb_to_hsv_agrees_with_colorsys_and_keeps_hue_below_360():
    rng = np.random.default_rng(0)
    rgb = np.vstack([rng.uniform(0, 255, size=(2000, 3)), [[255, 0, 1e-13], [10, 10, 10], [0, 0, 0]]])
    hsv = rgb_to_hsv(rgb)
    reference = np.array([colorsys.rgb_to_hsv(*(row / 255.0)) for row in rgb])
    reference[:, 0] *= 360.0
    np.testing.assert_allclose(hsv[:, 1:], reference[:, 1:], rtol=0, atol=1e-12)
    hue_gap = np.abs(hsv[:, 0] - reference[:, 0])
    assert np.minimum(hue_gap, 360.0 - hue_gap).max() < 1e-9  # hue is an angle: 0 and 359.99...9 agree
    assert ((hsv[:, 0] >= 0) & (hsv[:, 0] < 360)).all()


# --------------------------------------------------------------------------- M3 edges


@pytest.mark.parametrize("top_left, side", [((8, 8), 16), ((4, 6), 20)])
def test_edges_of_a_drawn_white_square_trace_its_outline(top_left, side):
    image = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
    x, y = top_left
    cv2.rectangle(image, (x, y), (x + side - 1, y + side - 1), (255, 255, 255), thickness=-1)
    table, _ = score_images("edges", image[None], [0], {})
    # Canny thins a step edge to a one-pixel closed contour; drawn inside or just outside the
    # square's border, such a contour has between 4 (side - 2) and 4 (side + 1) pixels.
    assert 4 * (side - 2) <= table["score"].iloc[0] <= 4 * (side + 1)


def test_edges_of_flat_images_are_zero():
    flats = np.stack([solid((v, v, v)) for v in (0, 77, 255)] + [solid((200, 30, 90))])
    table, _ = score_images("edges", flats, np.arange(4), {})
    assert table["score"].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_edges_thresholds_and_blur_are_parameters():
    rng = np.random.default_rng(1)
    noisy = rng.integers(0, 256, size=(20, SIDE, SIDE, 3), dtype=np.uint8)
    default, _ = score_images("edges", noisy, np.arange(20), {})
    blurred, _ = score_images("edges", noisy, np.arange(20), {"edges": {"blur_kernel_size": 5}})
    strict_thresholds, _ = score_images("edges", noisy, np.arange(20),
                                        {"edges": {"low_threshold": 400, "high_threshold": 800}})
    assert (blurred["score"] < default["score"]).all()
    assert (strict_thresholds["score"] < default["score"]).all()
    with pytest.raises(MetricConfigError, match="low_threshold"):
        score_images("edges", noisy, np.arange(20), {"edges": {"low_threshold": 300, "high_threshold": 200}})
    with pytest.raises(MetricConfigError, match="blur_kernel_size"):
        score_images("edges", noisy, np.arange(20), {"edges": {"blur_kernel_size": 4}})


# --------------------------------------------------------------------------- random control


def test_random_scores_are_reproducible_per_seed():
    first, _ = score_images("random", HAND_MADE, np.arange(5), {"random": {"seed": 7}})
    again, _ = score_images("random", HAND_MADE, np.arange(5), {"random": {"seed": 7}})
    other, _ = score_images("random", HAND_MADE, np.arange(5), {"random": {"seed": 8}})
    assert first["score"].tolist() == again["score"].tolist()
    assert first["score"].tolist() != other["score"].tolist()
    assert first["score"].between(0, 1, inclusive="left").all()
    with pytest.raises(MetricConfigError, match=r"score_metrics\.random\.seed"):
        score_images("random", HAND_MADE, np.arange(5), {"random": {"seed": -1}})


# --------------------------------------------------------------------------- M4 perceptual


def test_perceptual_missing_weights_default_skips_with_one_loud_warning(
    no_cached_alexnet, perceptual_must_not_score, caplog
):
    with caplog.at_level(logging.WARNING, logger="best_minibatch.metrics.scoring"):
        table, status = score_images("perceptual", HAND_MADE, np.arange(5), {})
    assert status["metric"] == "perceptual" and status["status"] == "skipped"
    assert "alexnet-owt-7be5be79.pth" in status["reason"]
    assert "make weights" in status["reason"]  # names the one command that fixes it
    assert "score_metrics.perceptual.backbone_weights" in status["reason"]
    assert len(table) == 0 and list(table.columns) == ["image_id", "score"]
    assert table.dtypes.tolist() == [np.dtype("int64"), np.dtype("float64")]
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "SKIPPED" in warnings[0].getMessage() and "make weights" in warnings[0].getMessage()


def test_perceptual_missing_weights_strict_raises_before_any_work(no_cached_alexnet, perceptual_must_not_score):
    with pytest.raises(MetricUnavailableError, match=r"score_metrics\.perceptual\.strict is true") as raised:
        score_images("perceptual", HAND_MADE, np.arange(5), {"perceptual": {"strict": True}})
    assert "make weights" in str(raised.value)


def test_perceptual_named_weights_file_that_is_missing_is_a_config_error(tmp_path, perceptual_must_not_score):
    with pytest.raises(MetricConfigError, match=r"score_metrics\.perceptual\.backbone_weights names"):
        score_images("perceptual", HAND_MADE, np.arange(5),
                     {"perceptual": {"backbone_weights": str(tmp_path / "nope.pth")}})


@pytest.mark.parametrize(
    "option, value",
    [("batch_size", 0), ("upsample_to", 16), ("device", "tpu"), ("strict", "yes"), ("download", "no"),
     ("cpu_threads", 0)],
)
def test_perceptual_bad_options_are_errors_even_without_weights(no_cached_alexnet, option, value):
    with pytest.raises(MetricConfigError, match=rf"score_metrics\.perceptual\.{option}"):
        score_images("perceptual", HAND_MADE, np.arange(5), {"perceptual": {option: value}})


def test_perceptual_weights_file_of_the_wrong_kind_is_a_config_error(tmp_path):
    path = tmp_path / "not_alexnet.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(MetricConfigError, match="lacks features.0.weight"):
        score_images("perceptual", HAND_MADE, np.arange(5), {"perceptual": {"backbone_weights": str(path)}})


def test_perceptual_code_path_with_random_backbone_not_lpips(random_alexnet_file, sample_dataset, one_torch_thread):
    """Exercises file loading, averaging, scaling, upsampling and batching with a RANDOM AlexNet: not LPIPS values."""
    images = sample_dataset.images["train"][:120].numpy()
    params = {"perceptual": {"backbone_weights": str(random_alexnet_file), "batch_size": 50, "upsample_to": 64}}
    table, status = score_images("perceptual", images, np.arange(120), params)
    assert {k: status[k] for k in ("metric", "status", "reason")} == {
        "metric": "perceptual", "status": "ok", "reason": None}
    # The status says which file the scores rest on: the named one, unproven (the user chose it).
    assert status["provenance"]["source"] == "score_metrics.perceptual.backbone_weights"
    assert status["provenance"]["path"] == str(random_alexnet_file)
    assert status["provenance"]["sha256"] == lpips_weights.sha256_of(random_alexnet_file)
    assert status["provenance"]["proof"] is None
    assert len(table) == 120 and np.isfinite(table["score"]).all() and (table["score"] > 0).all()

    # The backbone really holds the file's weights (not lpips' own random initialisation).
    state = torch.load(random_alexnet_file, weights_only=True)
    model = metrics.load_lpips_alexnet(random_alexnet_file)
    assert torch.equal(model.net.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(getattr(model.net.slice5, "10").weight, state["features.10.weight"])

    # The reference is the mean image: an image equal to it is at distance 0 (up to float rounding).
    average = images.mean(axis=0)
    self_distance = metrics.lpips_distances_to_reference(model, average.round().astype(np.uint8)[None], average.round())
    assert abs(self_distance[0]) < 1e-9

    # The score is the distance to the average image, whatever the batch size (the benchmark relies on it).
    one_at_a_time = metrics.lpips_distances_to_reference(model, images[:8], average, batch_size=1, upsample_to=64)
    np.testing.assert_allclose(table["score"].to_numpy()[:8], one_at_a_time, rtol=1e-4, atol=1e-6)


def test_lpips_input_is_scaled_to_minus_one_one_and_upsampled():
    images = np.stack([BLACK, WHITE])
    native = metrics.to_lpips_input(images, None, torch.device("cpu"))
    assert native.shape == (2, 3, 32, 32)
    assert native[0].eq(-1).all() and native[1].eq(1).all()
    upsampled = metrics.to_lpips_input(images, 64, torch.device("cpu"))
    assert upsampled.shape == (2, 3, 64, 64) and upsampled[1].eq(1).all()


# --------------------------------------------------------------------------- combined table


def test_combine_scores_has_one_row_per_image_and_columns_per_metric():
    ids = np.arange(5)
    tables = {name: score_images(name, HAND_MADE, ids, {})[0] for name in ("intensity", "color", "edges", "random")}
    tables["perceptual"] = METRICS["perceptual"].empty_scores()
    combined = combine_scores(ids, {name: tables[name] for name in METRICS})
    assert list(combined.columns) == [
        "image_id", "intensity", "color_hue", "color_saturation", "color_value", "edges", "perceptual", "random",
    ]
    assert combined["image_id"].tolist() == ids.tolist()
    assert combined["perceptual"].isna().all()
    assert combined["color_hue"].tolist() == tables["color"]["hue"].tolist()


# --------------------------------------------------------------------------- metrics without information of their own


@pytest.fixture
def test_only_metrics():
    """Registers test-only metrics for one test and removes them afterwards."""
    added = []

    def register(name, function, **options):
        register_metric(name, description=f"test-only: {name}", **options)(function)
        added.append(name)

    yield register
    for name in added:
        METRICS.pop(name, None)


def test_a_metric_ordering_the_images_like_an_earlier_one_is_skipped_with_the_reason(sample_dataset, test_only_metrics,
                                                                                     caplog):
    # Mean brightness: intensity divided by the pixel count, so exactly intensity's order.
    test_only_metrics("mean_brightness", lambda images, options: pd.DataFrame(
        {"score": images.reshape(len(images), -1).mean(axis=1)}))
    images = sample_dataset.images["train"][:400].numpy()
    ids = np.arange(400)
    intensity, _ = score_images("intensity", images, ids, {})
    with caplog.at_level(logging.WARNING, logger="best_minibatch.metrics.scoring"):
        table, status = score_images("mean_brightness", images, ids, {}, compare_with={"intensity": intensity})
    assert len(table) == 0 and list(table.columns) == ["image_id", "score"]
    assert status["status"] == "skipped"
    assert status["reason"] == ("carries no information of its own on this data: it orders the 400 images exactly "
                                "as 'intensity' does, so its batches would be intensity's (kept: intensity)")
    assert "METRIC 'mean_brightness' SKIPPED" in caplog.text
    # Without intensity to compare with, or against a metric that orders differently, it is kept.
    assert score_images("mean_brightness", images, ids, {}, compare_with={})[1]["status"] == "ok"
    edges, _ = score_images("edges", images, ids, {})
    assert score_images("mean_brightness", images, ids, {}, compare_with={"edges": edges})[1]["status"] == "ok"
    # A skipped (empty) table or one of other images is not compared.
    empty = METRICS["intensity"].empty_scores()
    assert score_images("mean_brightness", images, ids, {}, compare_with={"intensity": empty})[1]["status"] == "ok"
    shifted = intensity.assign(image_id=intensity["image_id"] + 1000)
    assert score_images("mean_brightness", images, ids, {}, compare_with={"intensity": shifted})[1]["status"] == "ok"


def test_a_metric_with_one_score_for_every_image_is_skipped(test_only_metrics):
    test_only_metrics("always_seven", lambda images, options: pd.DataFrame({"score": np.full(len(images), 7.0)}))
    table, status = score_images("always_seven", HAND_MADE, np.arange(5), {}, compare_with={})
    assert len(table) == 0 and status["status"] == "skipped"
    assert len(score_images("always_seven", HAND_MADE, np.arange(5), {})[0]) == 5  # not screened unless asked
    assert status["reason"] == ("carries no information of its own on this data: all 5 images have the same score, "
                                "so its batches would follow the tie-break alone")


def test_colour_on_grayscale_images_is_skipped_as_undefined_hue_and_saturation(sample_dataset):
    rgb = sample_dataset.images["train"][:500].numpy()
    gray = np.repeat(cv2.cvtColor(rgb.reshape(-1, SIDE, 3), cv2.COLOR_RGB2GRAY).reshape(500, SIDE, SIDE, 1), 3, axis=3)
    ids = np.arange(500)
    intensity, _ = score_images("intensity", gray, ids, {})
    # What the check catches: on gray images, colour's ordering (hue 0, saturation 0, then value) is intensity's.
    unchecked, _ = score_images("color", gray, ids, {})
    assert (unchecked["hue"] == 0).all() and (unchecked["saturation"] == 0).all()
    colour_ranks = metrics_scoring.sort_ranks(unchecked, ("hue", "saturation", "value"))
    pd.testing.assert_series_equal(colour_ranks, metrics_scoring.sort_ranks(intensity, ("score",)))
    assert colour_ranks.nunique() < len(colour_ranks)  # tied images too: equal ranks, whatever breaks the ties
    table, status = score_images("color", gray, ids, {}, compare_with={"intensity": intensity})
    assert len(table) == 0 and status["status"] == "skipped"
    assert "hue and saturation are undefined on grayscale images" in status["reason"]
    assert "exactly as 'intensity' does" in status["reason"]
    # The same images in colour keep their colour ordering.
    colour_intensity, _ = score_images("intensity", rgb, ids, {})
    assert score_images("color", rgb, ids, {}, compare_with={"intensity": colour_intensity})[1]["status"] == "ok"


def test_ties_count_a_metric_that_only_breaks_another_metrics_ties_is_kept(test_only_metrics):
    # Intensity ties on HAND_MADE's images 2, 3 and 4 (255 per pixel each); sort_batches breaks ties by a
    # seeded random key, so a metric that orders them by image_id instead makes other batches: kept.
    def pixel_sum(images):
        return images.reshape(len(images), -1).sum(axis=1, dtype=np.int64).astype(float)

    test_only_metrics("intensity_then_id", lambda images, options: pd.DataFrame(
        {"score": pixel_sum(images) * 10 + np.arange(len(images))}))
    test_only_metrics("twice_intensity", lambda images, options: pd.DataFrame({"score": pixel_sum(images) * 2}))
    ids = np.arange(5)
    intensity, _ = score_images("intensity", HAND_MADE, ids, {})
    earlier = {"intensity": intensity}
    assert score_images("intensity_then_id", HAND_MADE, ids, {}, compare_with=earlier)[1]["status"] == "ok"
    status = score_images("twice_intensity", HAND_MADE, ids, {}, compare_with=earlier)[1]
    assert status["status"] == "skipped" and "exactly as 'intensity' does" in status["reason"]
