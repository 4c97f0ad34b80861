"""A metric that carries no information of its own on the data is skipped, named, and kept out of the claims.

On grayscale images every pixel has R = G = B: the colour metric's hue and saturation are 0 and its
ordering is exactly intensity's, so its batches would repeat intensity's and every claim would be
tested twice. The run below ingests a grayscale image-folder zip made from real CIFAR-10 images.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from best_minibatch.analysis.statistics import holm_adjust
from best_minibatch.batches.batching import sort_into_batches
from best_minibatch.metrics.scoring import score_images
from tests.conftest import QUICK_RUN_PARAMS, SAMPLE_ZIP, copy_project
from tests.lpips_support import stored_lpips_weights  # noqa: F401 - a fixture

TRAIN_PER_CLASS, TEST_PER_CLASS, BATCH_SIZE = 100, 20, 50
GRAYSCALE_REASON = "hue and saturation are undefined on grayscale images"


def grayscale_image_folder_zip(destination: Path) -> Path:
    """The first images of each class of the embedded sample, converted to gray, as single-channel PNGs."""
    kept = {"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS}
    counts: dict[tuple[str, str], int] = {}
    with zipfile.ZipFile(SAMPLE_ZIP) as source, zipfile.ZipFile(destination, "w") as target:
        for name in sorted(source.namelist()):
            split, class_name, file_name = name.split("/")
            key = (split, class_name)
            if counts.get(key, 0) >= kept[split]:
                continue
            counts[key] = counts.get(key, 0) + 1
            colour = cv2.imdecode(np.frombuffer(source.read(name), np.uint8), cv2.IMREAD_COLOR)
            gray = cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)
            target.writestr(f"{split}/{class_name}/{Path(file_name).stem}.png", cv2.imencode(".png", gray)[1].tobytes())
    return destination


def newest(folder: Path) -> Path:
    return sorted(folder.iterdir())[-1] / folder.name


@pytest.fixture(scope="module")
def grayscale_run(tmp_path_factory, stored_lpips_weights) -> Path:  # noqa: F811
    """A project copy after ingest, scores, batches, training (one epoch per phase) and the analysis on the zip."""
    project = copy_project(tmp_path_factory.mktemp("grayscale") / "project")
    grayscale_image_folder_zip(project / "data/01_raw/grayscale.zip")
    params = {**QUICK_RUN_PARAMS, "ingest_cifar": {"source": {"path": "data/01_raw/grayscale.zip"}},
              "sort_batches": {"batch_size": BATCH_SIZE}}
    previous = Path.cwd()
    os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
    os.chdir(project)
    try:
        bootstrap_project(project)
        with KedroSession.create(project_path=project, runtime_params=params) as session:
            session.run(pipeline_names=["ingest_cifar", "score_metrics", "sort_batches", "gradient_training",
                                        "distance_analysis"])
    finally:
        os.chdir(previous)
    return project


def test_the_zip_holds_real_grayscale_images(tmp_path):
    path = grayscale_image_folder_zip(tmp_path / "gray.zip")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        image = cv2.imdecode(np.frombuffer(archive.read(names[0]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert len(names) == 10 * (TRAIN_PER_CLASS + TEST_PER_CLASS)
    assert image.shape == (32, 32) and image.std() > 0  # one channel, and a real picture


@pytest.mark.slow  # a run of five pipelines on 1,000 images (about a minute on the 2-core machine)
def test_colour_on_a_grayscale_dataset_is_skipped_with_the_reason_and_left_out_of_the_claims(grayscale_run):
    data = grayscale_run / "data"
    status = json.loads(newest(data / "04_feature/color/metric_status.json").read_text())
    assert status["status"] == "skipped"
    assert GRAYSCALE_REASON in status["reason"] and "exactly as 'intensity' does" in status["reason"]
    assert pd.read_parquet(newest(data / "05_model_input/color/batch_assignments.parquet")).empty
    assert pd.read_parquet(newest(data / "07_model_output/color/gradient_distances.parquet")).empty
    for other in ("intensity", "edges", "perceptual", "random"):
        assert json.loads(newest(data / f"04_feature/{other}/metric_status.json").read_text())["status"] == "ok"
        batches = pd.read_parquet(newest(data / f"05_model_input/{other}/batch_assignments.parquet"))
        assert batches["batch"].nunique() == 10 * TRAIN_PER_CLASS // BATCH_SIZE

    # What was prevented: unscreened, colour's batches are intensity's, image for image.
    index = pd.read_parquet(newest(data / "02_intermediate/image_index.parquet"))
    train = index[index["split"] == "train"].sort_values("row")
    import torch

    images = torch.load(newest(data / "02_intermediate/train_images.pt"), weights_only=True).numpy()
    assert (images[..., 0] == images[..., 2]).all()
    colour, _ = score_images("color", images, train["image_id"].to_numpy(), {})
    colour_batches, _ = sort_into_batches(colour, index, "color", BATCH_SIZE)
    intensity_batches = pd.read_parquet(newest(data / "05_model_input/intensity/batch_assignments.parquet"))
    pd.testing.assert_frame_equal(colour_batches[["batch", "image_id"]].reset_index(drop=True),
                                  intensity_batches[["batch", "image_id"]].reset_index(drop=True))

    # The analysis: colour is listed as skipped with the reason, and no claim is tested on it.
    ordering_status = pd.read_parquet(newest(data / "08_reporting/analysis/ordering_status.parquet"))
    ordering_status = ordering_status.set_index("ordering")
    assert ordering_status.at["color", "status"] == "skipped"
    assert GRAYSCALE_REASON in ordering_status.at["color", "reason"]
    comparisons = pd.read_parquet(newest(data / "08_reporting/analysis/batch_group_comparisons.parquet"))
    assert "color" not in set(comparisons["ordering"]) and "intensity" in set(comparisons["ordering"])
    claims = pd.read_parquet(newest(data / "08_reporting/analysis/claim_verdicts.parquet"))
    colour_claims = claims[claims["metric"] == "color"]  # its plain and its stratified ordering
    assert set(colour_claims["ordering"]) == {"color", "color_stratified"}
    assert colour_claims["verdict"].str.startswith("not tested (metric skipped: ").all()
    assert colour_claims["p_holm"].isna().all()
    # Holm's one family is every p-value of the tested rows (primary and adjusted), none of them colour's.
    tested = claims[claims["p_holm"].notna()]
    assert set(tested["metric"]) == {"intensity", "edges", "perceptual"}
    assert set(tested["ordering"]) == {"intensity", "edges", "perceptual", "intensity_stratified",
                                       "edges_stratified", "perceptual_stratified"}
    family = holm_adjust(np.concatenate([tested["p_value"].to_numpy(float), tested["adjusted_p_value"].to_numpy(float)]))
    np.testing.assert_allclose(tested["p_holm"], family[: len(tested)])
