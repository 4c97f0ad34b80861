"""The `gpu` environment (conf/gpu): all of CIFAR-10 at batch 256 with ResNet-18, for one short GPU slot.

Its configuration must load through Kedro, be what docs/gpu.md says, and pass every run
check (with the memory of the GPU it is meant for). The run itself needs a GPU (docs/gpu.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from best_minibatch.batches.orderings import all_orderings
from best_minibatch.gradient_training import TrainingConfig
from best_minibatch.gradient_training import checks as gradient_training
from best_minibatch.kedro_glue import run_checks
from best_minibatch.training.models import build_model, count_parameters
from tests.conftest import PROJECT_ROOT
from tests.test_models import RESNET18_CIFAR_PARAMETERS

H200_MEMORY = 139 * 2**30


def gpu_parameters() -> dict:
    """The merged parameters of `kedro run --env gpu` in this checkout (nothing runs)."""
    bootstrap_project(PROJECT_ROOT)
    with KedroSession.create(project_path=PROJECT_ROOT, env="gpu") as session:
        return session.load_context().params


@pytest.fixture(scope="module")
def params() -> dict:
    return gpu_parameters()


def test_the_gpu_environment_overrides_only_what_differs_from_base(params):
    base = {}
    for path in (PROJECT_ROOT / "conf" / "base").glob("parameters*.yml"):
        base.update(yaml.safe_load(path.read_text()) or {})
    # The default analysis' orderings, controls and seeds: from base, untouched.
    for section, key in (("gradient_training", "seeds"), ("gradient_training", "null_batches"),
                         ("gradient_training", "batch_order"), ("sort_batches", "stratify"),
                         ("sort_batches", "control_batchings"), ("training", "momentum"),
                         ("training", "weight_decay")):
        assert params[section][key] == base[section][key], (section, key)
    assert params["sort_batches"]["control_batchings"] >= len(params["gradient_training"]["seeds"])
    # What makes it the GPU run.
    assert params["sort_batches"]["batch_size"] == 256
    assert params["training"]["model"]["name"] == "resnet18"
    assert [phase["lr"] for phase in params["training"]["phases"]] == [0.1, 0.01, 0.001]
    assert params["training"]["augment"] is True and params["training"]["probe_chunk"] == "auto"
    assert params["gradient_training"]["keep_gradients"] == "none"
    # Each file under conf/gpu sets only keys whose value differs from base.
    for path in (PROJECT_ROOT / "conf" / "gpu").glob("parameters*.yml"):
        for section, values in yaml.safe_load(path.read_text()).items():
            for key, value in values.items():
                assert base[section].get(key) != value, f"{path.name}: {section}.{key} repeats base"


def test_the_gpu_environment_validates(params):
    config = TrainingConfig.from_params(params["gradient_training"], params["training"])
    assert config.recipe.model == "resnet18" and config.recipe.probe_chunk == "auto"
    assert config.num_epochs == 6 and config.recipe.num_phases == 3
    assert count_parameters(build_model(config.recipe.model)) == RESNET18_CIFAR_PARAMETERS
    # An epoch's 195 float32 gradients stay in memory (on the GPU), under the cap.
    assert 195 * RESNET18_CIFAR_PARAMETERS * 4 <= config.buffer_memory_cap_gb * 2**30


@pytest.mark.slow  # full CIFAR-10 (the real zip) through every run check
def test_the_gpu_environment_passes_every_run_check(params, full_cifar_zip, monkeypatch):
    # On the GPU it is meant for: an H200's memory for the in-memory gradient buffer; the timed
    # probed step (which on this CPU would take minutes of ResNet-18) is recorded, not run.
    monkeypatch.setattr(gradient_training, "available_memory", lambda device: H200_MEMORY)
    timed = []
    monkeypatch.setattr(gradient_training, "check_expected_time", lambda *args: timed.append(args[1:]))
    assert Path(PROJECT_ROOT / params["ingest_cifar"]["source"]["path"]).resolve() == full_cifar_zip.resolve()
    previous = Path.cwd()
    os.chdir(PROJECT_ROOT)  # the source path is relative to the project root
    try:
        n_train = run_checks.count_training_images(params["ingest_cifar"]["source"])
        problems = run_checks.run_problems(params, params.keys(),
                                           run_checks.RunFacts(n_train=n_train, trained_orderings=tuple(all_orderings())))
    finally:
        os.chdir(previous)
    assert n_train == 50_000 and n_train // 256 == 195
    assert problems == []
    assert timed == [(195, 256, len(all_orderings()))]
