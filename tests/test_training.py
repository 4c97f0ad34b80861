"""The gradient-probe training loop (``best_minibatch.gradient_training``) on a tiny model and real images."""

from __future__ import annotations

import math
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from best_minibatch.analysis.statistics import per_example_gradient_trace
from best_minibatch.data.images import to_model_input
from best_minibatch.data.tensor_io import load_tensors
from best_minibatch.gradient_training import (
    DISTANCE_COLUMNS,
    HISTORY_COLUMNS,
    DiskSpaceError,
    GradientProbeRun,
    TrainingConfig,
    TrainingConfigError,
    TrainingData,
    TrainingDataError,
    epoch_order,
    run_identity,
)
from best_minibatch.gradient_training.store import CheckpointError, RunConflictError
from best_minibatch.training.loop import DivergenceError
from best_minibatch.training.probing import GradientVarianceTrace, batch_gradient

NUM_TRAIN, BATCH, NUM_TEST = 240, 20, 60


def tiny_model() -> nn.Module:
    """Float64, with BatchNorm (so the probe's batch statistics and buffers matter): 286 parameters."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10),
    ).double()


@pytest.fixture(scope="module")
def tiny_data(sample_dataset) -> TrainingData:
    """240 real training images in 12 fixed batches of 20, 60 real test images."""
    index = sample_dataset.index
    train = index[index["split"] == "train"].sort_values("row")
    test = index[index["split"] == "test"].sort_values("row")
    # Spread over the classes: every 20th image of the class-sorted sample.
    rows = torch.arange(0, 20 * NUM_TRAIN, 20)
    return TrainingData(
        train_images=sample_dataset.images["train"],
        train_labels=torch.from_numpy(train["label"].to_numpy().copy()),
        batches=rows.view(NUM_TRAIN // BATCH, BATCH),
        test_images=sample_dataset.images["test"][::10][:NUM_TEST].contiguous(),
        test_labels=torch.from_numpy(test["label"].to_numpy()[::10][:NUM_TEST].copy()),
    )


RECIPE = ("model", "phases", "augment", "device", "cpu_threads", "progress_bar", "deterministic", "bf16_autocast")


def make_config(tmp_path: Path, **params) -> TrainingConfig:
    base = {
        "model": {"name": "small_cnn"},  # the runs pass their own tiny model's factory
        "phases": [{"epochs": 2, "lr": 0.05}, {"epochs": 1, "lr": 0.01}],
        "checkpoint_dir": str(tmp_path / "checkpoints"),
        "gradients_dir": str(tmp_path / "gradients"),
        "spill_dtype": "float64",
        "cpu_threads": 1,
        "progress_bar": False,
    }
    params = {**base, **params}
    training = {k: params.pop(k) for k in RECIPE if k in params}
    return TrainingConfig.from_params({**params, "training": training})


Finished = namedtuple("Finished", "run spilled")


def spilled_gradients(run: GradientProbeRun) -> dict[tuple[int, int], torch.Tensor]:
    """Every gradient the run wrote, by (epoch, batch), read back from its files."""
    return {(epoch, batch): load_tensors(run.gradient_path(epoch, batch))
            for epoch in sorted(run.kept_epochs) for batch in range(run.data.num_batches)}


def run_to_end(config: TrainingConfig, data: TrainingData, probe: bool = True) -> Finished:
    run = GradientProbeRun(config, data, tiny_model, "intensity", probe=probe)
    run.run()
    return Finished(run, spilled_gradients(run))


# --------------------------------------------------------------------------- correctness


def test_distances_match_brute_force_on_the_spilled_gradients(tmp_path, tiny_data):
    done = run_to_end(make_config(tmp_path), tiny_data)
    table = done.run.results.distances
    k_count = tiny_data.num_batches
    assert list(table.columns) == DISTANCE_COLUMNS
    assert len(table) == 3 * k_count and len(done.spilled) == 3 * k_count
    for epoch in (1, 2, 3):
        rows = np.stack([done.spilled[(epoch, k)].numpy() for k in range(k_count)])
        assert rows.dtype == np.float64
        # Independent reference: a plain Python loop with exactly rounded sums.
        full = np.array([math.fsum(rows[:, j]) / k_count for j in range(rows.shape[1])])
        full_norm = math.sqrt(math.fsum(full * full))
        got = table[table["epoch"] == epoch].sort_values("batch")
        for k in range(k_count):
            distance = math.sqrt(math.fsum((rows[k] - full) ** 2))
            norm = math.sqrt(math.fsum(rows[k] * rows[k]))
            cosine = math.fsum(rows[k] * full) / (norm * full_norm)
            row = got.iloc[k]
            assert row["distance"] == pytest.approx(distance, rel=1e-9)
            assert row["grad_norm"] == pytest.approx(norm, rel=1e-9)
            assert row["cosine_similarity"] == pytest.approx(cosine, rel=1e-9)
            assert row["relative_distance"] == pytest.approx(distance / full_norm, rel=1e-9)
            assert row["full_grad_norm"] == pytest.approx(full_norm, rel=1e-9)
    np.testing.assert_array_equal(done.run.results.distance_matrix.numpy(),
                                  table["distance"].to_numpy().reshape(3, k_count))
    assert table["phase"].tolist() == [1] * 2 * k_count + [2] * k_count
    assert table["learning_rate"].tolist() == [0.05] * 2 * k_count + [0.01] * k_count


def test_gradients_are_taken_at_the_epoch_start_parameters(tmp_path, tiny_data):
    config = make_config(tmp_path, keep_checkpoints=10)
    done = run_to_end(config, tiny_data)
    store = done.run.store
    # Epoch 2 starts from the checkpoint of epoch 1; epoch 3's checkpoint holds parameters after epoch 2.
    start = load_tensors(store.checkpoint_path(1))["model"]
    after = load_tensors(store.checkpoint_path(2))["model"]
    for k in (0, 5, tiny_data.num_batches - 1):
        rows = tiny_data.batches[k]
        inputs = to_model_input(tiny_data.train_images[rows], dtype=torch.float64)
        targets = tiny_data.train_labels[rows]
        at_start, at_end = tiny_model(), tiny_model()
        at_start.load_state_dict(start)
        at_end.load_state_dict(after)
        expected = batch_gradient(at_start.train(), inputs, targets)
        torch.testing.assert_close(done.spilled[(2, k)], expected, rtol=1e-12, atol=1e-14)
        moved = batch_gradient(at_end.train(), inputs, targets)
        assert not torch.allclose(done.spilled[(2, k)], moved, rtol=1e-6), "the check must be able to fail"


@pytest.mark.parametrize("augment", [False, True])
def test_compare_pass_does_not_disturb_net_normal(tmp_path, tiny_data, augment):
    probed = run_to_end(make_config(tmp_path / "on", augment=augment), tiny_data, probe=True)
    plain = run_to_end(make_config(tmp_path / "off", augment=augment), tiny_data, probe=False)
    for name, tensor in plain.run.results.model_state.items():
        assert torch.equal(probed.run.results.model_state[name], tensor), name
    for column in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert probed.run.results.history[column].tolist() == plain.run.results.history[column].tolist()
    for epoch in (2, 3):  # the optimizer state (momentum) after each epoch, too
        on = load_tensors(probed.run.store.checkpoint_path(epoch))["optimizer"]["state"]
        off = load_tensors(plain.run.store.checkpoint_path(epoch))["optimizer"]["state"]
        assert all(torch.equal(on[i]["momentum_buffer"], off[i]["momentum_buffer"]) for i in off)
    assert plain.spilled == {} and plain.run.results.distances.empty


def test_scratch_file_buffer_gives_the_same_table_bit_for_bit(tmp_path, tiny_data):
    in_memory = run_to_end(make_config(tmp_path / "memory", keep_gradients="none"), tiny_data)
    scratch = run_to_end(make_config(tmp_path / "scratch", keep_gradients="none",
                                     gradient_buffer={"memory_cap_gb": 0}), tiny_data)
    pd.testing.assert_frame_equal(in_memory.run.results.distances, scratch.run.results.distances, check_exact=True)
    assert scratch.spilled == {}
    assert not any(scratch.run.store.scratch_dir.iterdir()), "scratch files must be deleted after each epoch"


def test_history_has_the_contract_columns_and_learns(tmp_path, tiny_data):
    done = run_to_end(make_config(tmp_path, keep_gradients="none"), tiny_data)
    history = done.run.results.history
    assert list(history.columns) == HISTORY_COLUMNS
    assert history["epoch"].tolist() == [1, 2, 3] and history["phase"].tolist() == [1, 1, 2]
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert history["test_accuracy"].between(0, 1).all() and np.isfinite(history["mean_distance"]).all()
    assert (history["run_name"] == done.run.run_name).all() and not history["gradients_kept"].any()


# --------------------------------------------------------------------------- runs, reruns, names


def test_keep_gradients_and_spill_dtype_choose_what_is_spilled(tmp_path, tiny_data):
    done = run_to_end(make_config(tmp_path, keep_gradients=[1, 3], spill_dtype="bfloat16"), tiny_data)
    assert {epoch for epoch, _ in done.spilled} == {1, 3}
    assert all(g.dtype == torch.bfloat16 and g.device.type == "cpu" for g in done.spilled.values())
    every = make_config(tmp_path, keep_gradients={"every_n": 2})
    assert every.kept_epochs == (2,)
    # Distances are computed for every epoch, kept or not.
    assert sorted(done.run.results.distances["epoch"].unique()) == [1, 2, 3]


def test_identical_rerun_reuses_the_finished_run(tmp_path, tiny_data):
    config = make_config(tmp_path, keep_gradients="none")
    first = run_to_end(config, tiny_data)
    second = run_to_end(config, tiny_data)
    assert second.run.run_name == first.run.run_name
    pd.testing.assert_frame_equal(first.run.results.distances, second.run.results.distances, check_exact=True)
    # Reused, not retrained: the history (with its wall-clock seconds) comes back unchanged.
    pd.testing.assert_frame_equal(first.run.results.history, second.run.results.history, check_exact=True)


def test_auto_run_names_separate_configurations(tmp_path, tiny_data):
    names = {
        GradientProbeRun(make_config(tmp_path, seeds=[seed], **extra), tiny_data, tiny_model, "intensity").run_name
        for seed, extra in ((0, {}), (1, {}), (0, {"augment": True}), (0, {"spill_dtype": "float32"}))
    }
    assert len(names) == 4
    same = GradientProbeRun(make_config(tmp_path), tiny_data, tiny_model, "intensity").run_name
    assert same in names and same.startswith("small_cnn-")  # the configured model names the run


def test_explicit_run_name_with_another_configuration_is_refused_before_work(tmp_path, tiny_data):
    run_to_end(make_config(tmp_path, run_name="mine", keep_gradients="none"), tiny_data)
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(RunConflictError, match=r"(?s)mine.*another configuration.*augment"):
        GradientProbeRun(make_config(tmp_path, run_name="mine", keep_gradients="none", augment=True),
                         tiny_data, tiny_model, "intensity")
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_gradients_folder_without_a_manifest_is_refused(tmp_path, tiny_data):
    stray = tmp_path / "gradients" / "mine" / "intensity" / "epoch=001" / "batch=0000.pt"
    stray.parent.mkdir(parents=True)
    torch.save(torch.zeros(3), stray)
    with pytest.raises(RunConflictError, match="already holds spilled gradients"):
        GradientProbeRun(make_config(tmp_path, run_name="mine"), tiny_data, tiny_model, "intensity")
    assert not (tmp_path / "checkpoints").exists()


# --------------------------------------------------------------------------- seeds


def test_each_seed_starts_from_its_own_weights_on_the_same_batches(tmp_path, tiny_data):
    """Epoch 1's probed gradients are taken at the initial weights: for each seed they equal the gradient of
    the model built after ``torch.manual_seed(seed)`` on the data's fixed batch k, and they differ between seeds."""
    config = make_config(tmp_path, seeds=[0, 4], keep_gradients=[1], null_batches=2)
    runs = {seed: GradientProbeRun(config, tiny_data, tiny_model, "intensity", seed=seed) for seed in (0, 4)}
    for run in runs.values():
        run.run()
    spilled = {seed: spilled_gradients(run) for seed, run in runs.items()}
    for seed in (0, 4):
        torch.manual_seed(seed)
        initial = tiny_model().train()
        for k in (0, 7, tiny_data.num_batches - 1):
            rows = tiny_data.batches[k]  # the batch is the data's, whatever the seed
            expected = batch_gradient(initial, to_model_input(tiny_data.train_images[rows], dtype=torch.float64),
                                      tiny_data.train_labels[rows])
            torch.testing.assert_close(spilled[seed][(1, k)], expected, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(spilled[0][(1, 0)], spilled[4][(1, 0)])
    results = {seed: run.results for seed, run in runs.items()}
    assert runs[0].run_name != runs[4].run_name
    for seed, result in results.items():
        assert set(result.distances["seed"]) == set(result.history["seed"]) == set(result.null_distances["seed"]) \
            == {seed}
    assert not np.allclose(results[0].distances["distance"], results[4].distances["distance"])
    # The null batches are drawn per seed too (another sample of random batches, not a copy).
    assert not np.allclose(results[0].null_distances["distance"], results[4].null_distances["distance"])


def test_seed_zero_keeps_its_run_name_whatever_other_seeds_are_configured(tmp_path, tiny_data):
    alone = GradientProbeRun(make_config(tmp_path), tiny_data, tiny_model, "intensity")
    assert alone.seed == 0 and alone.identity["seed"] == 0 and "seeds" not in alone.identity
    several = make_config(tmp_path, seeds=[2, 0, 5])
    with_others = GradientProbeRun(several, tiny_data, tiny_model, "intensity", seed=0)
    assert with_others.run_name == alone.run_name
    assert GradientProbeRun(several, tiny_data, tiny_model, "intensity").seed == 2  # default: the first seed
    # Explicit names: the name itself for seed 0, a suffix for the others.
    named = make_config(tmp_path, run_name="mine", seeds=[0, 5])
    assert [GradientProbeRun(named, tiny_data, tiny_model, "intensity", seed=s).run_name for s in (0, 5)] == [
        "mine", "mine-seed5"]


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"seed": 3}, r"gradient_training.seed: was replaced by seeds.*Write seeds: \[3\]"),
        ({"seeds": 3}, r"gradient_training.seeds: expected a non-empty list"),
        ({"seeds": []}, r"gradient_training.seeds: expected a non-empty list"),
        ({"seeds": [0, 0]}, r"gradient_training.seeds: .*distinct"),
        ({"seeds": [-1]}, r"gradient_training.seeds: .*non-negative"),
    ],
)
def test_seeds_must_be_a_list_of_distinct_seeds(tmp_path, params, named):
    with pytest.raises(TrainingConfigError, match=named):
        make_config(tmp_path, **params)


# --------------------------------------------------------------------------- bad parameters and faults


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"phases": []}, "gradient_training.training.phases"),
        ({"phases": [{"epochs": 0, "lr": 0.1}]}, r"phases\[0\].epochs"),
        ({"phases": [{"epochs": 1, "lr": -0.1}]}, r"phases\[0\].lr"),
        ({"phases": [{"epochs": 1}]}, r"phases\[0\]"),
        ({"keep_gradients": [1, 4]}, "keep_gradients.*outside the run's epochs 1..3"),
        ({"keep_gradients": {"every_n": 0}}, "keep_gradients"),
        ({"spill_dtype": "int8"}, "spill_dtype"),
        ({"device": "tpu"}, "device"),
        ({"run_name": "a/b"}, "run_name"),
        ({"learning_rate": 0.1}, "learning_rate.*unknown parameter"),
        ({"gradient_buffer": {"size": 1}}, "gradient_buffer"),
        ({"disk_cap_gb": -1}, "disk_cap_gb"),
        ({"batch_order": "random"}, "gradient_training.batch_order.*fixed.*shuffled"),
    ],
)
def test_bad_parameters_name_the_parameter(tmp_path, params, named):
    with pytest.raises(TrainingConfigError, match=named):
        make_config(tmp_path, **params)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_cuda_is_refused(tmp_path):
    with pytest.raises(TrainingConfigError, match="device.*no CUDA"):
        make_config(tmp_path, device="cuda")


def test_disk_cap_is_checked_before_any_work(tmp_path, tiny_data):
    # 3 kept epochs x 12 batches x 286 float64 values = 82,368 bytes.
    config = make_config(tmp_path, disk_cap_gb=82_367 / 2**30)
    with pytest.raises(TrainingConfigError, match=r"disk_cap_gb.*need 7.67e-05 GiB \(3 epochs x 12 batches x 286"):
        GradientProbeRun(config, tiny_data, tiny_model, "intensity")
    assert not tmp_path.joinpath("checkpoints").exists()
    GradientProbeRun(make_config(tmp_path, disk_cap_gb=82_368 / 2**30), tiny_data, tiny_model, "intensity")


def test_divergence_stops_with_epoch_and_batch_and_keeps_the_last_checkpoint(tmp_path, tiny_data):
    config = make_config(tmp_path, phases=[{"epochs": 1, "lr": 0.05}, {"epochs": 2, "lr": 1e300}],
                         keep_gradients="none")
    run = GradientProbeRun(config, tiny_data, tiny_model, "intensity")
    with pytest.raises(DivergenceError, match=r"epoch 2, batch \d+.*not finite.*checkpoint \(epoch 1\)"):
        run.run()
    assert run.store.checkpoint_epochs() == [1]
    assert run.results is None, "no table full of NaN is published"
    kept = run.store.read_checkpoint(1, run.digest)  # intact, and its numbers are finite
    assert all(torch.isfinite(t).all() for t in kept["model"].values() if t.is_floating_point())
    assert np.isfinite(kept["distances"]["distance"].numpy()).all()


def test_too_little_free_space_for_a_kept_epoch_stops_cleanly(tmp_path, tiny_data, monkeypatch):
    config = make_config(tmp_path, keep_gradients=[2])
    run = GradientProbeRun(config, tiny_data, tiny_model, "intensity")
    usage = shutil.disk_usage(tmp_path)
    # Enough for epoch 1's checkpoint (76 KiB with block rounding: the model, its momentum and the distance rows
    # of every column), not for epoch 2's 12 gradient files as well.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=100_000))
    with pytest.raises(DiskSpaceError, match=r"Epoch 2 of 'intensity' needs 124.0 KiB in '[^']*gradients[^']*' and "
                                             r"'[^']*checkpoints[^']*' \(kept gradients 48.0 KiB, checkpoint 76.0 KiB\)"
                                             r", but only 97.7 KiB are free.*checkpoint of epoch 1 is kept"):
        run.run()
    assert run.store.checkpoint_epochs() == [1]


def test_training_data_from_tables_checks_equal_batches(sample_dataset):
    index = sample_dataset.index
    assignments = pd.DataFrame({"metric": "intensity", "batch": [0, 0, 1], "position": [0, 1, 0],
                                "image_id": [0, 1, 2], "metric_value": [0.1, 0.2, 0.3]})
    with pytest.raises(TrainingDataError, match="equal size"):
        TrainingData.from_tables(assignments, index, sample_dataset.images["train"], sample_dataset.images["test"])
    good = assignments.iloc[:2]
    data = TrainingData.from_tables(good, index, sample_dataset.images["train"], sample_dataset.images["test"])
    assert data.batches.tolist() == [[0, 1]] and data.test_labels.shape == (1000,)
    with pytest.raises(TrainingDataError, match="not training images"):
        TrainingData.from_tables(good.assign(image_id=[0, 10**7]), index, sample_dataset.images["train"], None)


# --------------------------------------------------------------------------- gradient variance trace


def per_example_trace_by_brute_force(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """One backward pass per example in eval mode, then analysis's own formula."""
    model.eval()
    rows = np.stack([batch_gradient(model, inputs[i:i + 1], targets[i:i + 1]).numpy() for i in range(len(inputs))])
    return per_example_gradient_trace(rows)


def test_gradient_variance_trace_equals_per_example_brute_force():
    torch.manual_seed(0)
    model = tiny_model()
    model(torch.randn(64, 3, 16, 16, dtype=torch.float64))  # running statistics away from their start values
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs, targets = torch.randn(30, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (30,))
    trace = GradientVarianceTrace(model, max_chunk_bytes=286 * 8 * 7)  # chunks of 7 examples
    trace.add(inputs[:20], targets[:20])
    trace.add(inputs[20:], targets[20:])
    assert trace.chunk == 7 and trace.count == 30
    assert model.training, "the model's mode is restored"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "nothing in the model changes"
    expected = per_example_trace_by_brute_force(model, inputs, targets)
    assert trace.trace() == pytest.approx(expected, rel=1e-10)


def test_trace_check_records_the_epoch_start_trace_for_the_orderings_asked(tmp_path, tiny_data):
    config = make_config(tmp_path, keep_gradients="none", keep_checkpoints=10, trace_check=["intensity"])
    traced = run_to_end(config, tiny_data)
    history = traced.run.results.history
    assert list(history.columns) == HISTORY_COLUMNS
    assert history["n_train"].tolist() == [NUM_TRAIN] * 3 and history["batch_size"].tolist() == [BATCH] * 3
    # Epoch 2 starts from epoch 1's checkpoint: per-example gradients of every training image there.
    start = tiny_model()
    start.load_state_dict(load_tensors(traced.run.store.checkpoint_path(1))["model"])
    rows = tiny_data.batches.reshape(-1)
    inputs = to_model_input(tiny_data.train_images[rows], dtype=torch.float64)
    expected = per_example_trace_by_brute_force(start, inputs, tiny_data.train_labels[rows])
    assert history["gradient_variance_trace"].iloc[1] == pytest.approx(expected, rel=1e-9)
    assert history["gradient_variance_trace"].gt(0).all()
    # The trace does not disturb training, and only the orderings asked for pay for it.
    plain = run_to_end(make_config(tmp_path / "plain", keep_gradients="none"), tiny_data)
    pd.testing.assert_frame_equal(traced.run.results.distances, plain.run.results.distances, check_exact=True)
    assert plain.run.results.history["gradient_variance_trace"].isna().all()
    assert traced.run.run_name != plain.run.run_name
    other = GradientProbeRun(config, tiny_data, tiny_model, "color")
    assert not other.trace and other.run_name == GradientProbeRun(
        make_config(tmp_path, keep_gradients="none", keep_checkpoints=10), tiny_data, tiny_model, "color").run_name


def test_trace_check_must_be_a_switch_or_a_list_of_orderings(tmp_path):
    with pytest.raises(TrainingConfigError, match="gradient_training.trace_check: expected true, false or a list"):
        make_config(tmp_path, trace_check="random")


# --------------------------------------------------------------------------- the same-parameter null


def test_null_batches_do_not_touch_training_and_survive_a_resume(tmp_path, tiny_data):
    plain = run_to_end(make_config(tmp_path / "a", keep_gradients="none"), tiny_data).run.results
    config = make_config(tmp_path / "b", keep_gradients="none", null_batches=4)
    first = run_to_end(config, tiny_data).run.results
    pd.testing.assert_frame_equal(first.distances, plain.distances)  # the null is probed, never trained on
    pd.testing.assert_frame_equal(first.history.drop(columns=["seconds", "run_name"]),
                                  plain.history.drop(columns=["seconds", "run_name"]))
    nulls = first.null_distances
    assert len(nulls) == 3 * 4 and nulls["draw"].tolist() == [0, 1, 2, 3] * 3
    assert (nulls["full_grad_norm"].to_numpy() == np.repeat(first.history["full_grad_norm"].to_numpy(), 4)).all()
    again = run_to_end(config, tiny_data).run.results  # the finished run, read back from its checkpoint
    pd.testing.assert_frame_equal(again.null_distances, nulls)
    assert first.history["run_name"].iloc[0] != plain.history["run_name"].iloc[0]  # R is part of the identity


def test_same_parameter_null_matches_the_sampling_theory_of_a_linear_model(tmp_path):
    """No BatchNorm, parameters that do not move (lr ~ 0): the mean of the K fixed batches' gradients is the
    full gradient over all N images, and a random batch of m drawn without replacement lies at squared
    distance tr(Sigma) / m * (N - m) / (N - 1) from it in expectation (Sigma: per-example gradients)."""
    n, m, size = 240, 8, 4
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    data = TrainingData(images, labels, torch.randperm(n, generator=generator).view(n // m, m))

    def linear() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, 10))

    epochs = 25
    config = TrainingConfig.from_params({
        "checkpoint_dir": None, "keep_gradients": "none", "null_batches": 16,
        "training": {"model": {"name": "small_cnn"}, "phases": [{"epochs": epochs, "lr": 1e-12}], "momentum": 0.0,
                     "weight_decay": 0.0, "cpu_threads": 1, "progress_bar": False}})
    run = GradientProbeRun(config, data, linear, "random")
    run.run()
    squared = run.results.null_distances["distance"].to_numpy() ** 2
    model = linear()
    inputs = to_model_input(images)
    per_example = torch.stack([batch_gradient(model, inputs[i:i + 1], labels[i:i + 1]) for i in range(n)]).double()
    trace = float(((per_example - per_example.mean(0)) ** 2).sum(1).mean())  # tr(Sigma), population covariance
    expected = trace / m * (n - m) / (n - 1)
    standard_error = squared.std(ddof=1) / np.sqrt(len(squared))
    assert len(squared) == epochs * 16
    assert abs(squared.mean() - expected) < 3 * standard_error, (squared.mean(), expected, standard_error)


# --------------------------------------------------------------------------- batch order


def test_shuffled_order_is_the_default_and_fixed_keeps_run_names(tmp_path, tiny_data):
    """Shuffled is the default (docs/analysis.md: a batch's rank is then not its place in the epoch); a fixed-order
    run keeps the name it had before the parameter existed (the identity holds batch_order only when shuffled)."""
    def name(**extra):
        return GradientProbeRun(make_config(tmp_path, **extra), tiny_data, tiny_model, "intensity").run_name

    assert TrainingConfig().batch_order == "shuffled"
    assert name() == name(batch_order="shuffled") != name(batch_order="fixed")
    identity = run_identity(make_config(tmp_path, batch_order="fixed"), "intensity", 10, torch.float64, "data")
    assert "batch_order" not in identity
    assert epoch_order("fixed", 0, 3, 5).tolist() == [0, 1, 2, 3, 4]
    first, again = epoch_order("shuffled", 0, 2, 12), epoch_order("shuffled", 0, 2, 12)
    assert sorted(first.tolist()) == list(range(12)) and first.tolist() == again.tolist()
    assert first.tolist() != epoch_order("shuffled", 0, 3, 12).tolist() != epoch_order("shuffled", 1, 2, 12).tolist()


def test_shuffled_order_trains_the_same_batches_in_the_recorded_order(tmp_path, tiny_data):
    config = make_config(tmp_path, batch_order="shuffled", keep_checkpoints=10)
    done = run_to_end(config, tiny_data)
    run, table, k_count = done.run, done.run.results.distances, tiny_data.num_batches
    for epoch in (1, 2, 3):
        rows = table[table["epoch"] == epoch]
        assert rows["batch"].tolist() == list(range(k_count))  # rows stay keyed by batch
        order = run.epoch_order(epoch)
        assert order.tolist() != list(range(k_count))
        assert rows["position"].to_numpy()[order].tolist() == list(range(k_count))  # batch order[k] at step k
    # Training really took that order: epoch 1 replayed by hand from the seed's initial weights.
    torch.manual_seed(config.seeds[0])
    model = tiny_model()
    optimizer = config.recipe.optimizer(model)
    for group in optimizer.param_groups:
        group["lr"] = 0.05
    model.train()
    for batch in run.epoch_order(1):
        rows = tiny_data.batches[int(batch)]
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(to_model_input(tiny_data.train_images[rows], dtype=torch.float64)),
                                    tiny_data.train_labels[rows]).backward()
        optimizer.step()
    saved = load_tensors(run.store.checkpoint_path(1))["model"]
    assert all(torch.equal(saved[name], tensor) for name, tensor in model.state_dict().items())
    # Each spilled file is its batch's gradient at the epoch-start parameters, and the distances are exact.
    start = tiny_model()
    start.load_state_dict(saved)
    for k in (0, 5, k_count - 1):
        rows = tiny_data.batches[k]
        expected = batch_gradient(start.train(), to_model_input(tiny_data.train_images[rows], dtype=torch.float64),
                                  tiny_data.train_labels[rows])
        torch.testing.assert_close(done.spilled[(2, k)], expected, rtol=1e-12, atol=1e-14)
    spilled = np.stack([done.spilled[(2, k)].numpy() for k in range(k_count)])
    full = spilled.mean(axis=0)
    np.testing.assert_allclose(table[table["epoch"] == 2]["distance"].to_numpy(),
                               np.linalg.norm(spilled - full, axis=1), rtol=1e-9)
    fixed = run_to_end(make_config(tmp_path / "fixed", batch_order="fixed"), tiny_data).run.results
    assert (fixed.distances["position"] == fixed.distances["batch"]).all()
    assert fixed.history["train_loss"].tolist() != done.run.results.history["train_loss"].tolist()


def test_shuffled_run_resumes_bit_for_bit(tmp_path, tiny_data):
    config = make_config(tmp_path, batch_order="shuffled", keep_checkpoints=10, keep_gradients=[3])
    first = run_to_end(config, tiny_data)
    for epoch in (2, 3):  # as if the run had stopped after epoch 1
        first.run.store.checkpoint_path(epoch).unlink()
    resumed = run_to_end(config, tiny_data)
    pd.testing.assert_frame_equal(resumed.run.results.distances, first.run.results.distances, check_exact=True)
    assert all(torch.equal(resumed.spilled[key], first.spilled[key]) for key in first.spilled)


def test_a_checkpoint_written_by_an_earlier_version_is_refused_naming_what_it_lacks(tmp_path, tiny_data):
    """No compatibility code for the project's own old checkpoints (docs/architecture.md): one that lacks a
    column of today's progress (here ``position``, added with batch_order) is refused with the fix."""
    run = run_to_end(make_config(tmp_path, keep_gradients="none"), tiny_data).run
    path = run.store.checkpoint_path(3)
    state = load_tensors(path)
    del state["distances"]["position"], state["content_checksum"]
    run.store.save_checkpoint(3, {k: v for k, v in state.items() if k not in ("format", "config_hash", "epoch")},
                              run.digest)
    with pytest.raises(CheckpointError, match=r"written by an earlier version of the project \(it lacks "
                                              r"distances\.position\)\. Delete the run folder"):
        run.store.read_checkpoint(3, run.digest)