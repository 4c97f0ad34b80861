"""The `full` environment (conf/full): all of CIFAR-10 at the paper's batch geometry, on this machine.

Its configuration must stay what docs/results/full_cifar10.md says it is and pass every run
check on the real data, and one epoch of it must run end to end (ingest to gradient_training)
on a small subset at the same batch size. The full run itself takes about three hours.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from best_minibatch import selection
from best_minibatch.batches.orderings import all_orderings
from best_minibatch.gradient_training import checks as gradient_training
from best_minibatch.kedro_glue import run_checks
from tests.conftest import PROJECT_ROOT, copy_project
from tests.lpips_support import stored_lpips_weights  # noqa: F401 (fixture)

METRIC_NAMES = ("intensity", "color", "edges", "perceptual", "random")
ORDERINGS = (*METRIC_NAMES, *(f"{m}_stratified" for m in METRIC_NAMES))


def full_parameters() -> dict:
    """The merged parameters of `kedro run --env full` in this checkout (nothing runs)."""
    bootstrap_project(PROJECT_ROOT)
    with KedroSession.create(project_path=PROJECT_ROOT, env="full") as session:
        return session.load_context().params


@pytest.mark.slow  # full CIFAR-10 (the real zip) through every run check
def test_the_full_environment_is_the_paper_geometry_and_passes_every_run_check(full_cifar_zip, monkeypatch,
                                                                               stored_lpips_weights):  # noqa: F811
    params = full_parameters()
    # The run-time check times two probed steps on this machine, which a loaded test machine
    # distorts (a starved process measured 150 hours); it is recorded here, not run. The real
    # run's time is in docs/results/full_cifar10.md.
    timed = []
    monkeypatch.setattr(gradient_training, "check_expected_time", lambda *args: timed.append(args[1:]))
    # Only what differs from base is overridden; the rest (e.g. momentum) comes from base.
    assert params["training"]["momentum"] == 0.9
    assert Path(PROJECT_ROOT / params["ingest_cifar"]["source"]["path"]).resolve() == full_cifar_zip.resolve()
    assert params["sort_batches"]["batch_size"] == 256
    phases = params["training"]["phases"]
    assert [phase["lr"] for phase in phases] == [0.1, 0.01, 0.001]
    assert all(phase["epochs"] >= 4 for phase in phases)
    assert params["gradient_training"]["seeds"] == [0, 1, 2]
    assert params["gradient_training"]["null_batches"] > 0
    assert params["gradient_training"]["batch_order"] == "shuffled"  # the designed default (docs/analysis.md)
    assert params["sort_batches"]["stratify"] is True
    assert params["sort_batches"]["control_batchings"] >= len(params["gradient_training"]["seeds"])
    assert params["score_metrics"]["perceptual"]["strict"] is True
    assert set(ORDERINGS) == set(all_orderings())

    previous = Path.cwd()
    os.chdir(PROJECT_ROOT)  # the source path is relative to the project root
    try:
        n_train = run_checks.count_training_images(params["ingest_cifar"]["source"])
        assert n_train == 50_000
        assert n_train // 256 == 195 and n_train % 256 == 80
        # Every section's checks, with the run's own facts (the disk cap of the kept gradients too).
        problems = run_checks.run_problems(params, params.keys(), run_checks.RunFacts(n_train=n_train,
                                                                                       trained_orderings=ORDERINGS))
    finally:
        os.chdir(previous)
    assert problems == []
    assert timed == [(195, 256, 10)]  # batches, batch size, orderings (each trained once per seed)


@pytest.mark.slow  # full CIFAR-10 (the real zip) through every run check
def test_the_full_batch_selection_is_the_issue_setup_and_passes_every_run_check(full_dataset):
    """`kedro run --env full --pipelines=batch_selection` (conf/full/parameters_batch_selection.yml) on the real
    50,000 images: the paper's batch size, the full environment's model and phases (those its distances were
    measured with), at least 5 seeds, every policy of issue 24; the split, the steps and the class-balanced
    batches it makes on the real labels; and every run check passes."""
    params = full_parameters()
    config = selection.SelectionConfig.from_params(params["batch_selection"], params["training"],
                                                   params["sort_batches"]["batch_size"])
    assert config.batch_size == 256 and len(config.seeds) >= 5
    assert set(config.policies) == set(selection.POLICIES)  # shuffle, both class-balanced, ..., oracle
    # learned reads gradient_training's distances: the same model, phases and batch size as that run
    # (gradient_training trains the shared recipe; batch_selection overrides neither model nor phases' values).
    assert "training" not in params["gradient_training"]
    assert config.recipe.model == "small_cnn" and dict(config.recipe.model_options) == {"width": 16}
    assert config.recipe.phases == tuple((p["epochs"], p["lr"]) for p in params["training"]["phases"])
    assert config.validation_fraction == 0.2 and config.recipe.cpu_threads == 1
    assert config.learned_charge_distance_seconds

    index = full_dataset.index
    split = selection.stratified_validation_split(index, config.validation_fraction, config.validation_seed)
    counts = split.groupby(["subset", "label"]).size()
    assert (counts.loc["validation"] == 1000).all() and (counts.loc["train"] == 4000).all()
    train_ids = selection.subset_ids(split, "train")
    labels = split.set_index("image_id").loc[train_ids, "label"].to_numpy()
    policy = selection.build_policy("class_balanced", config, config.seeds[0], train_ids, None, labels=labels)
    batches = policy.epoch_batches(1, 1)
    assert batches.shape == (156, 256)  # 40,000 // 256 steps, as every policy takes
    label_of = np.zeros(int(train_ids.max()) + 1, dtype=np.int64)
    label_of[train_ids] = labels
    per_class = np.stack([np.bincount(label_of[b], minlength=10) for b in batches])
    # 256 = 10 x 25 + 6: 25 of every class, and 6 classes with a 26th, in every batch.
    assert set(np.unique(per_class)) == {25, 26} and ((per_class == 26).sum(axis=1) == 6).all()
    assert len(np.unique(batches)) == 156 * 256  # 64 of the 40,000 left out of the epoch

    previous = Path.cwd()
    os.chdir(PROJECT_ROOT)
    try:
        n_train = run_checks.count_training_images(params["ingest_cifar"]["source"])
        problems = run_checks.run_problems(params, ["batch_selection", "training", "sort_batches"],
                                           run_checks.RunFacts(n_train=n_train))
    finally:
        os.chdir(previous)
    assert n_train == 50_000 and problems == []


@pytest.mark.slow  # an epoch at the full geometry on real images (~45 s)
def test_one_epoch_of_the_full_environment_runs_on_a_subset_at_the_same_batch_size(tmp_path,
                                                                                    stored_lpips_weights):  # noqa: F811
    """The embedded sample (5,000 images: 19 batches of 256) through ingest, scoring, batching and
    gradient_training with the full environment's model, seeds reduced to one and one epoch."""
    os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
    project = copy_project(tmp_path / "project")
    params = {
        "ingest_cifar": {"source": {"path": "data/01_raw/cifar10-sample.zip"}},
        "training": {"phases": [{"epochs": 1, "lr": 0.1}]},
        # 10 null batches, as the full environment has (at most the subset's 19 batches: null_batches' upper bound).
        "gradient_training": {"seeds": [0], "keep_gradients": [1], "null_batches": 10},
    }
    previous = Path.cwd()
    os.chdir(project)
    try:
        bootstrap_project(project)
        with KedroSession.create(project_path=project, env="full", runtime_params=params) as session:
            session.run(pipeline_names=["ingest_cifar", "score_metrics", "sort_batches", "gradient_training"])
    finally:
        os.chdir(previous)

    outputs = project / "data" / "07_model_output"
    for ordering in ORDERINGS:
        matrix = torch.load(newest(outputs / ordering / "distance_matrix.pt"), weights_only=True)
        assert tuple(matrix.shape) == (1, 1, 19), ordering  # seeds x epochs x batches of 256
        assert torch.isfinite(matrix).all() and (matrix > 0).all()
        null = pd.read_parquet(newest(outputs / ordering / "null_distances.parquet"))
        assert len(null) == 10  # R null batches in the one epoch
        history = pd.read_parquet(newest(outputs / ordering / "training_history.parquet"))
        assert history["learning_rate"].tolist() == [0.1]
    model_params = sum(t.numel() for key, t in torch.load(
        newest(project / "data" / "06_models" / "intensity" / "trained_model.pt"), weights_only=True).items()
        if key.startswith("seed=0/") and "running" not in key and "num_batches" not in key)
    assert model_params == 61_338  # small_cnn width 16


def newest(versioned: Path) -> Path:
    """The newest version's file of a versioned dataset."""
    versions = sorted(versioned.iterdir())
    assert versions, versioned
    return versions[-1] / versioned.name
