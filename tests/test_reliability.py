"""Faults during a run: kills while writing, a full disk, damaged files found on resume.

Every case ends with the same check: after the fault is cleared, running the same
command again completes, and its distance table equals an uninterrupted run's bit
for bit. Kills and disk-full runs happen in a child process (``tests/fault_harness.py``)
so the faults are real; damaged files are tested in this process.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pytest
import torch
import yaml
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from best_minibatch.data.tensor_io import PARTIAL_SUFFIX, DiskFullError, load_tensors, save_tensors_atomically
from best_minibatch.gradient_training import (
    GradientProbeRun,
    TrainingConfig,
    TrainingConfigError,
    check_buffer_memory,
    run_identity,
)
from best_minibatch.gradient_training.store import CheckpointError, RunStore, config_hash
from best_minibatch.kedro_glue.run_checks import RunCheckError
from best_minibatch.training.models import build_model, count_parameters
from tests import fault_harness
from tests.conftest import copy_project
from tests.test_training import make_config, tiny_data, tiny_model  # noqa: F401 (tiny_data is a fixture)

NUM_BATCHES = 10
RUN_FOLDER = "*/intensity"  # <run_name>/<ordering> under the checkpoint and gradient roots


# --------------------------------------------------------------------------- child processes


@pytest.fixture(scope="module")
def harness_data(tmp_path_factory, sample_dataset) -> Path:
    """200 real training images in 10 batches of 20, 50 real test images."""
    index = sample_dataset.index
    train = index[index["split"] == "train"].sort_values("row")
    test = index[index["split"] == "test"].sort_values("row")
    data = {
        "train_images": sample_dataset.images["train"][1:1000:5].contiguous(),
        "train_labels": torch.tensor(train["label"].to_numpy()[1:1000:5]),
        "batches": torch.arange(200).view(NUM_BATCHES, 20),
        "test_images": sample_dataset.images["test"][::20].contiguous(),
        "test_labels": torch.tensor(test["label"].to_numpy()[::20]),
    }
    path = tmp_path_factory.mktemp("harness") / "data.pt"
    torch.save(data, path)
    return path


# Children fork from a server that imported torch and the training code once (a fresh
# interpreter would spend about 6 s importing them, and the optimizer's first use another
# 5 s importing torch._dynamo, for a run of well under a second).
CHILDREN = multiprocessing.get_context("forkserver")
CHILDREN.set_forkserver_preload(["tests.fault_harness", "torch._dynamo"])


@pytest.fixture
def tmp_path(tmp_path_factory) -> Path:
    """A fresh folder in memory (/dev/shm) where there is one: the runs fsync every file they write,
    which costs 30 ms a file on this machine's disk and nothing there. Falls back to pytest's folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        folder = Path(tempfile.mkdtemp(prefix="test_reliability-", dir=shm))
        yield folder
        shutil.rmtree(folder, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("reliability")


class Child(NamedTuple):
    returncode: int
    stdout: str


def run_child(data: Path, work: Path, out: Path, gradients_dir: Path | None = None, **faults: str) -> Child:
    """One run of the harness in a child process: its exit code (-9 when killed) and its log."""
    log = work.parent / f"{out.name}.log"
    child = CHILDREN.Process(target=fault_harness.run_in_child,
                             args=(str(work), str(out), str(data), str(gradients_dir) if gradients_dir else None,
                                   faults, str(log)))
    child.start()
    child.join(300)
    if child.exitcode is None:  # stop it before failing: no process outlives its test
        child.kill()
        child.join(30)
        pytest.fail("the child did not finish within 300 s")
    return Child(child.exitcode, log.read_text() if log.exists() else "")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, harness_data) -> Path:
    """An uninterrupted run: its outputs and its folders."""
    folder = tmp_path_factory.mktemp("reference")
    done = run_child(harness_data, folder / "work", folder / "out")
    assert done.returncode == 0, done.stdout
    return folder


def assert_same_as_reference(out: Path, gradients: Path, reference: Path) -> None:
    expected = pd.read_parquet(reference / "out" / "distances.parquet")
    got = pd.read_parquet(out / "distances.parquet")
    assert len(got) == fault_harness.EPOCHS * NUM_BATCHES
    pd.testing.assert_frame_equal(got, expected, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "history.parquet"),
                                  pd.read_parquet(reference / "out" / "history.parquet"), check_exact=True)
    expected_model, got_model = load_tensors(reference / "out" / "model.pt"), load_tensors(out / "model.pt")
    assert all(torch.equal(got_model[k], v) for k, v in expected_model.items())
    reference_gradients = reference / "work" / "gradients"
    files = sorted(p.relative_to(gradients) for p in gradients.rglob("*.pt"))
    assert files == sorted(p.relative_to(reference_gradients) for p in reference_gradients.rglob("*.pt"))
    assert len(files) == fault_harness.EPOCHS * NUM_BATCHES
    for relative in files:
        assert torch.equal(load_tensors(gradients / relative), load_tensors(reference_gradients / relative))
    assert not list(gradients.rglob(f"*{PARTIAL_SUFFIX}")), "leftover temporary files must be removed"


def checkpoint_epochs(work: Path) -> list[int]:
    return sorted(int(p.name[6:9]) for p in (work / "checkpoints").glob(f"{RUN_FOLDER}/epoch=*.pt"))


def test_two_fresh_runs_give_the_same_table_bit_for_bit(tmp_path, harness_data, reference):
    again = run_child(harness_data, tmp_path / "work", tmp_path / "out")
    assert again.returncode == 0, again.stdout
    assert "resuming" not in again.stdout and "reusing" not in again.stdout  # a fresh run, not a resumed one
    assert_same_as_reference(tmp_path / "out", tmp_path / "work" / "gradients", reference)


def test_sigkill_while_writing_a_gradient_partition(tmp_path, harness_data, reference):
    work = tmp_path / "work"
    killed = run_child(harness_data, work, tmp_path / "killed", FAULT_KILL_WRITE="epoch=002/batch=0003.pt")
    assert killed.returncode == -signal.SIGKILL, killed.stdout
    epoch_folder = next((work / "gradients").glob(f"{RUN_FOLDER}/epoch=002"))
    half_written = list(epoch_folder.glob(f".batch=0003.pt.*{PARTIAL_SUFFIX}"))
    assert len(half_written) == 1 and not (epoch_folder / "batch=0003.pt").exists()
    assert checkpoint_epochs(work) == [1]

    rerun = run_child(harness_data, work, tmp_path / "out")
    assert rerun.returncode == 0, rerun.stdout
    assert "resuming after epoch 1" in rerun.stdout
    assert_same_as_reference(tmp_path / "out", work / "gradients", reference)


def test_sigkill_while_writing_a_checkpoint(tmp_path, harness_data, reference):
    work = tmp_path / "work"
    killed = run_child(harness_data, work, tmp_path / "killed", FAULT_KILL_WRITE="intensity/epoch=003.pt")
    assert killed.returncode == -signal.SIGKILL, killed.stdout
    half_written = list((work / "checkpoints").glob(f"{RUN_FOLDER}/.epoch=003.pt.*{PARTIAL_SUFFIX}"))
    assert len(half_written) == 1
    assert checkpoint_epochs(work) == [1, 2]  # the half-written one is not taken for a checkpoint

    rerun = run_child(harness_data, work, tmp_path / "out")
    assert rerun.returncode == 0, rerun.stdout
    assert "resuming after epoch 2" in rerun.stdout
    assert not list((work / "checkpoints").rglob(f"*{PARTIAL_SUFFIX}"))
    assert_same_as_reference(tmp_path / "out", work / "gradients", reference)


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_filesystem(tmp_path) -> Path:
    """A real 256 KiB tmpfs (needs root and mount rights; skipped where they are missing)."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); "
                    "test_injected_enospc_while_spilling covers the same path")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_disk_too_full_for_the_next_epoch_stops_before_it_on_a_small_filesystem(
        tmp_path, harness_data, reference, small_filesystem):
    # Each gradient file takes one 4 KiB page, so an epoch's 10 files take 40 KiB: leave room for 1.5 epochs.
    with open(small_filesystem / "hog", "wb") as hog:
        hog.write(b"\0" * (os.statvfs(small_filesystem).f_bavail * 4096 - 60 * 1024))
    work, gradients = tmp_path / "work", small_filesystem / "gradients"
    stopped = run_child(harness_data, work, tmp_path / "stopped", gradients)
    assert stopped.returncode == 1
    assert (f"Epoch 2 of 'intensity' needs 40.0 KiB in '{gradients}/" in stopped.stdout
            and "(kept gradients 40.0 KiB), but only 20.0 KiB are free" in stopped.stdout), stopped.stdout
    assert "the checkpoint of epoch 1 is kept, so the run resumes after it" in stopped.stdout
    assert checkpoint_epochs(work) == [1]

    (small_filesystem / "hog").unlink()  # space freed
    rerun = run_child(harness_data, work, tmp_path / "out", gradients)
    assert rerun.returncode == 0, rerun.stdout
    assert "resuming after epoch 1" in rerun.stdout
    assert_same_as_reference(tmp_path / "out", gradients, reference)


def test_enospc_while_spilling_on_a_small_filesystem(tmp_path, harness_data, reference, small_filesystem):
    work, gradients = tmp_path / "work", small_filesystem / "gradients"
    stopped = run_child(harness_data, work, tmp_path / "stopped", gradients, FAULT_FILL_DISK_AT="2:3")
    assert stopped.returncode == 1
    assert_disk_full_message(stopped.stdout, gradients)
    assert checkpoint_epochs(work) == [1]
    assert not list(gradients.rglob(f"*{PARTIAL_SUFFIX}")), "the failed write's temporary file is removed"

    (gradients / "hog").unlink()  # the harness filled the disk with it
    rerun = run_child(harness_data, work, tmp_path / "out", gradients)
    assert rerun.returncode == 0, rerun.stdout
    assert "resuming after epoch 1" in rerun.stdout
    assert_same_as_reference(tmp_path / "out", gradients, reference)


def test_injected_enospc_while_spilling(tmp_path, harness_data, reference):
    work = tmp_path / "work"
    stopped = run_child(harness_data, work, tmp_path / "stopped", FAULT_ENOSPC_AT="epoch=002/batch=0003.pt")
    assert stopped.returncode == 1
    assert_disk_full_message(stopped.stdout, work / "gradients")
    assert checkpoint_epochs(work) == [1]
    assert not list((work / "gradients").rglob(f"*{PARTIAL_SUFFIX}"))

    rerun = run_child(harness_data, work, tmp_path / "out")  # the "disk" has room again
    assert rerun.returncode == 0, rerun.stdout
    assert "resuming after epoch 1" in rerun.stdout
    assert_same_as_reference(tmp_path / "out", work / "gradients", reference)


def assert_disk_full_message(log: str, gradients: Path) -> None:
    assert "DiskFullError: [Errno 28] No space left in '" in log, log
    line = [line for line in log.splitlines() if "DiskFullError: " in line][-1]
    assert f"'{gradients}/" in line and "/epoch=002' while writing 'batch=0003.pt'" in line
    assert "it needs about 1.1 KiB" in line  # 286 float32 values
    assert "run the same command again; a training run resumes from its last complete epoch" in line


def test_disk_full_error_names_folder_and_size(tmp_path, monkeypatch):
    """The writer itself: torch reports ENOSPC as a bare RuntimeError; the error says what happened."""
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, stream):
            self.stream = stream

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.stream, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.stream.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(real_fdopen(fd, *a, **k)))
    with pytest.raises(DiskFullError, match=r"No space left in '.*out' while writing 'g.pt': it needs about "
                                            r"39.1 KiB") as raised:
        save_tensors_atomically(torch.zeros(10_000), tmp_path / "out" / "g.pt")
    assert raised.value.errno == errno.ENOSPC
    assert list((tmp_path / "out").iterdir()) == []


# --------------------------------------------------------------------------- damaged files found on resume


def spill_run(config, data) -> GradientProbeRun:
    """A finished run: its kept gradients on disk, written by the run itself."""
    run = GradientProbeRun(config, data, tiny_model, "intensity")
    run.run()
    return run


def flip_byte(path: Path, tensor: torch.Tensor) -> None:
    """Change one byte inside ``tensor``'s data in the file: torch.load still reads it, with a wrong value."""
    data = bytearray(path.read_bytes())
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    start = data.find(raw)
    assert start >= 0 and data.find(raw, start + 1) < 0, "the tensor's bytes must be found exactly once"
    data[start + len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_byte_in_a_spilled_gradient_is_detected_and_its_epoch_recomputed(tmp_path, tiny_data, caplog):
    config = make_config(tmp_path)
    first = spill_run(config, tiny_data)
    damaged = first.gradient_path(3, 4)
    original = load_tensors(damaged)
    flip_byte(damaged, original)
    assert not torch.equal(load_tensors(damaged), original), "the damage must change the numbers"

    again = spill_run(config, tiny_data)
    assert f"spilled gradient '{damaged}' (its values differ from the gradient that was spilled" in caplog.text
    assert "Resuming from the intact checkpoint of epoch 2 and recomputing epochs 3..3" in caplog.text
    assert torch.equal(load_tensors(damaged), original)
    pd.testing.assert_frame_equal(again.results.distances, first.results.distances, check_exact=True)


def test_damaged_gradient_with_no_checkpoint_before_it_stops_naming_the_file(tmp_path, tiny_data):
    config = make_config(tmp_path)
    first = spill_run(config, tiny_data)  # keeps the checkpoints of epochs 2 and 3
    damaged = first.gradient_path(1, 7)
    damaged.write_bytes(damaged.read_bytes()[:500])  # truncated
    with pytest.raises(CheckpointError, match=rf"cannot resume: spilled gradient '{damaged}' \(unreadable: "
                                              r".*corrupt or truncated.*No older intact checkpoint is left"):
        spill_run(config, tiny_data)


def test_missing_spilled_gradient_of_the_last_epoch_is_recomputed(tmp_path, tiny_data, caplog):
    config = make_config(tmp_path)
    first = spill_run(config, tiny_data)
    lost = first.gradient_path(3, 0)
    expected = load_tensors(lost)
    lost.unlink()
    again = spill_run(config, tiny_data)
    assert f"spilled gradient '{lost}' (missing)" in caplog.text
    assert torch.equal(load_tensors(lost), expected)
    pd.testing.assert_frame_equal(again.results.distances, first.results.distances, check_exact=True)


def test_damaged_newest_checkpoint_is_set_aside_and_its_epoch_recomputed(tmp_path, tiny_data, caplog):
    config = make_config(tmp_path, keep_gradients="none")
    first = spill_run(config, tiny_data)
    newest = first.store.checkpoint_path(3)
    flip_byte(newest, load_tensors(newest)["model"]["5.weight"])
    again = spill_run(config, tiny_data)
    assert f"Checkpoint '{newest}' is damaged" in caplog.text
    assert "recomputing epochs 3..3" in caplog.text
    assert newest.with_name(newest.name + ".damaged").exists()
    pd.testing.assert_frame_equal(again.results.distances, first.results.distances, check_exact=True)
    assert first.store.checkpoint_epochs() == [2, 3]


def test_every_checkpoint_damaged_stops_naming_them(tmp_path, tiny_data):
    config = make_config(tmp_path, keep_gradients="none")
    first = spill_run(config, tiny_data)
    for epoch in first.store.checkpoint_epochs():
        path = first.store.checkpoint_path(epoch)
        path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"cannot resume: checkpoint '.*epoch=003.pt' \(it cannot be read.*"
                                              r"checkpoint '.*epoch=002.pt'.*start the run over"):
        spill_run(config, tiny_data)


# --------------------------------------------------------------------------- caught before any work


@pytest.fixture(scope="module")
def fresh_project(tmp_path_factory) -> Path:
    """A copy of the project with only its raw data: nothing has run yet."""
    return copy_project(tmp_path_factory.mktemp("fresh") / "project")


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def refused_run(project: Path, monkeypatch, pipeline: str | None = None, namespaces: list[str] | None = None,
                **params) -> str:
    """Run the project like ``kedro run [--pipeline P] [--namespaces N] --params ...``; it must be refused
    before any work. Returns the error message; checks that nothing was written."""
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(project)  # catalog paths are relative to the working directory
    before = files_under(project / "data")
    bootstrap_project(project)
    with pytest.raises(RunCheckError) as refused:
        with KedroSession.create(project_path=project, runtime_params=params or None) as session:
            session.run(pipeline_names=[pipeline] if pipeline else None, namespaces=namespaces)
    assert files_under(project / "data") == before, "a refused run must not write anything"
    return str(refused.value)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        pytest.param({"score_metrics": {"sharpness": {}}},
                     "Parameter score_metrics.sharpness: unknown parameter. Known parameters: color, edges, intensity, "
                     "perceptual, random. (conf/<env>/parameters_score_metrics.yml)", id="unknown-metric"),
        pytest.param({"training": {"model": {"name": "vgg16"}}},
                     "Parameter training.model.name: unknown value 'vgg16'. Use one of dpn92, resnet18, small_cnn.",
                     id="unknown-model"),
        pytest.param({"sort_batches": {"batch_size": 6000}},
                     "Parameter sort_batches.batch_size=6000 exceeds the 5000 training images, so not one full batch "
                     "fits. Lower sort_batches.batch_size", id="batch-larger-than-training-set"),
        pytest.param({"sort_batches": {"batch_size": 0}},
                     "Parameter sort_batches.batch_size: must be a positive integer, got 0. Use e.g. 256",
                     id="batch-size-not-positive"),
        pytest.param({"training": {"phases": []}},
                     "Parameter training.phases: expected a non-empty list of {epochs, lr}, got []. Write e.g. ",
                     id="phases-empty"),
        pytest.param({"training": {"phases": [{"epochs": 0, "lr": 0.1}]}},
                     "Parameter training.phases[0].epochs: must be a positive integer, got 0. Set how many "
                     "epochs the phase lasts", id="epochs-not-positive"),
        pytest.param({"training": {"phases": [{"epochs": 3, "lr": 0.1}, {"epochs": 3, "lr": 0}]}},
                     "Parameter training.phases[1].lr: must be a positive number, got 0. Set the phase's "
                     "learning rate", id="lr-not-positive"),
        pytest.param({"gradient_training": {"keep_gradients": [1, 10]}},
                     "Parameter gradient_training.keep_gradients: epochs [10] are outside the run's epochs 1..6. Use "
                     "all, none, a list of epochs", id="kept-epochs-outside-the-run"),
        pytest.param({"gradient_training": {"disk_cap_gb": 0.001}},
                     "Parameter gradient_training.disk_cap_gb: the kept gradients need 0.0175 GiB (6 epochs x 50 "
                     "batches x 15,698 parameters in float32), more than the cap of 0.001 GiB. Keep fewer epochs",
                     id="disk-cap-below-one-epoch"),
        pytest.param({"gradient_training": {"trace_check": ["rnd"]}},
                     "Parameter gradient_training.trace_check: unknown orderings ['rnd']. Use true, false or a list of "
                     "intensity, color", id="unknown-trace-ordering"),
        pytest.param({"distance_analysis": {"null_ordering": "shuffled"}},
                     "Parameter distance_analysis.null_ordering: unknown ordering 'shuffled'. Use one of intensity",
                     id="unknown-null-ordering"),
    ],
)
def test_bad_parameter_stops_the_default_run_before_any_work(fresh_project, monkeypatch, params, expected):
    message = refused_run(fresh_project, monkeypatch, **params)
    assert "The run was stopped before any work: 1 problem(s) found." in message
    assert expected in message


def test_disk_cap_smaller_than_one_epoch_is_refused_although_it_fits_when_fewer_epochs_are_kept(
        fresh_project, monkeypatch):
    # One epoch of the base run: 50 batches x 15,698 float32 parameters = 3.0 MiB = 0.00292 GiB.
    message = refused_run(fresh_project, monkeypatch, gradient_training={"disk_cap_gb": 0.0029, "keep_gradients": [6]})
    assert "need 0.00292 GiB (1 epochs x 50 batches x 15,698 parameters in float32)" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_but_absent_stops_the_run_before_any_work(fresh_project, monkeypatch):
    message = refused_run(fresh_project, monkeypatch, training={"device": "cuda"})
    assert ("Parameter training.device: cuda was asked for but no CUDA device is available. Use device: "
            "auto (CUDA when present, else CPU) or device: cpu.") in message


def test_ordering_without_batches_stops_before_any_work(fresh_project, monkeypatch):
    message = refused_run(fresh_project, monkeypatch, pipeline="gradient_training", namespaces=["random"])
    assert ("Input 'random.batch_assignments' ('" in message and "data/05_model_input/random/batch_assignments.parquet')"
            " does not exist yet. It is written by node 'random.sort_into_batches' of pipeline 'sort_batches': run "
            "`kedro run --pipeline=sort_batches --namespaces=random` first" in message), message
    assert "Input 'train_images'" in message and "`kedro run --pipeline=ingest_cifar` first" in message


def test_ordering_without_scores_stops_sort_batches_before_any_work(fresh_project, monkeypatch):
    message = refused_run(fresh_project, monkeypatch, pipeline="sort_batches", namespaces=["edges"])
    assert ("Input 'edges.image_scores' (" in message and "`kedro run --pipeline=score_metrics --namespaces=edges` "
            "first" in message), message


def test_several_problems_are_reported_together(fresh_project, monkeypatch):
    message = refused_run(fresh_project, monkeypatch, sort_batches={"batch_size": 6000},
                          training={"model": {"name": "vgg16"}},
                          score_metrics={"edges": {"aperture_size": 4}})
    assert "3 problem(s) found" in message
    assert "Parameter score_metrics.edges.aperture_size: must be 3, 5 or 7, got 4." in message


def test_run_name_of_another_configuration_stops_before_any_work(fresh_project, monkeypatch, tmp_path):
    """An explicit run name whose folders hold a run with other settings would mix two runs' gradients."""
    project = tmp_path / "project"
    shutil.copytree(fresh_project, project)
    other = TrainingConfig.from_params({"seeds": [7], "run_name": "mine", "null_batches": 10}, {
        "cpu_threads": 1, "model": {"name": "small_cnn", "small_cnn": {"width": 8}},
        "phases": [{"epochs": 2, "lr": 0.1}, {"epochs": 2, "lr": 0.01}, {"epochs": 2, "lr": 0.001}]})  # base's
    folder = project / "data/06_models/checkpoints"
    model = build_model("small_cnn", width=8)
    identity = run_identity(other, "intensity", count_parameters(model), torch.float32, "digest-of-other-data")
    RunStore(folder, "mine", "intensity").claim(identity, config_hash(identity))  # what that run wrote
    message = refused_run(project, monkeypatch, gradient_training={"run_name": "mine"})
    assert ("Run 'mine' of ordering 'intensity' in 'data/06_models/checkpoints/mine/intensity' was started with "
            "another configuration (differs in: seed). Choose another gradient_training.run_name") in message


def test_gradients_without_a_manifest_under_the_run_name_stop_before_any_work(fresh_project, monkeypatch, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(fresh_project, project)
    stray = project / "data/07_model_output/gradients/mine/color/epoch=001/batch=0000.pt"
    save_tensors_atomically(torch.zeros(3), stray)
    message = refused_run(project, monkeypatch, gradient_training={"run_name": "mine"})
    assert ("'data/07_model_output/gradients/mine/color' already holds spilled gradients, but no run manifest "
            "exists") in message


def test_unknown_ordering_asked_for_stops_before_any_work(fresh_project, monkeypatch):
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(fresh_project)
    before = files_under(fresh_project / "data")
    bootstrap_project(fresh_project)
    with pytest.raises(ValueError, match=r"Pipeline does not contain nodes with the following namespaces: \['sharp'\]"):
        with KedroSession.create(project_path=fresh_project) as session:
            session.run(pipeline_names=["gradient_training"], namespaces=["sharp"])  # Kedro's own check
    assert files_under(fresh_project / "data") == before


# --------------------------------------------------------------------------- nothing lost

ANALYSIS_FAST = {"n_permutations": 100, "n_bootstrap": 100}


def run_project(project: Path, monkeypatch, pipelines: list[str], params: dict,
                load_versions: dict[str, str] | None = None, node_names: list[str] | None = None) -> None:
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(project)
    bootstrap_project(project)
    with KedroSession.create(project_path=project, runtime_params=params) as session:
        session.run(pipeline_names=pipelines, load_versions=load_versions, node_names=node_names)


def versions(project: Path, dataset_path: str) -> list[str]:
    """Version folders of a versioned dataset, oldest first (timestamps sort as text)."""
    return sorted(p.name for p in (project / dataset_path).iterdir())


def file_digests(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def project_with_training_results(fresh_project, tmp_path, monkeypatch) -> Path:
    """A project copy whose catalog holds the inputs of distance_analysis and visualize (a small
    synthetic training run of every ordering, plain and stratified, perceptual skipped), saved through the catalog."""
    from best_minibatch.batches.orderings import all_orderings
    from best_minibatch.pipelines.orderings import METRIC_KINDS
    from tests.test_analysis import planted_effects, synthetic_run

    project = tmp_path / "project"
    shutil.copytree(fresh_project, project)
    # Rendering dominates these runs: in this copy, PNG files at a low resolution, PDF figures in memory.
    catalog_file = project / "conf" / "base" / "catalog_visualize.yml"
    entries = yaml.safe_load(catalog_file.read_text())
    for name in [n for n in entries if n.startswith("figures_") and n.endswith("_pdf")]:
        entries[name] = {"type": "MemoryDataset", "copy_mode": "assign"}
    for name in [n for n in entries if n.startswith("figures_") and n.endswith("_png")]:
        entries[name]["save_args"]["dpi"] = 20
    catalog_file.write_text(yaml.safe_dump(entries))
    run = synthetic_run(orderings=list(all_orderings()), effects=planted_effects(n_batches=12), phase_lengths=(2, 2),
                        learning_rates=(0.1, 0.01), n_batches=12, seed=5, skipped=("perceptual", "perceptual_stratified"))
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(project)
    bootstrap_project(project)
    with KedroSession.create(project_path=project) as session:
        catalog = session.load_context().catalog
        catalog.save("image_index", run["image_index"])
        catalog.save("train_images", run["train_images"])
        for ordering, tables in run["orderings"].items():
            for kind, data in tables.items():
                if kind not in METRIC_KINDS or not ordering.endswith("_stratified"):  # a metric's own: its plain one
                    catalog.save(f"{ordering}.{kind}", data)
    return project


@pytest.mark.slow  # three Kedro runs that draw figures (about 30 s on the 2-core machine)
def test_two_runs_leave_two_versions_and_load_versions_reproduces_the_first_figures(
        project_with_training_results, monkeypatch):
    project = project_with_training_results
    first = {"distance_analysis": {**ANALYSIS_FAST, "null_ordering": "random"},
             "visualize": {"report_png_dpi": 20, "report_title": "First"}}
    second = {"distance_analysis": {**ANALYSIS_FAST, "null_ordering": "edges"},
              "visualize": {"report_png_dpi": 20, "report_title": "Second"}}
    heatmaps = "data/08_reporting/figures/distance_heatmaps/png"
    outputs = ("data/08_reporting/analysis/distance_noise_units.parquet", heatmaps,
               "data/08_reporting/report.html")

    run_project(project, monkeypatch, ["distance_analysis", "visualize"], first)
    first_files = {path: file_digests(project / path) for path in outputs}
    run_project(project, monkeypatch, ["distance_analysis", "visualize"], second)
    for path in outputs:
        assert len(versions(project, path)) == 2, path
        assert {k: v for k, v in file_digests(project / path).items() if k in first_files[path]} == first_files[path]
    first_version, second_version = versions(project, heatmaps)
    first_pngs = file_digests(project / heatmaps / first_version)
    assert first_pngs != file_digests(project / heatmaps / second_version), "the second run must draw other figures"
    first_report = next((project / "data/08_reporting/report.html" / versions(project, outputs[2])[0]).iterdir())
    assert "<title>First</title>" in first_report.read_text()

    # Redraw the heat maps from the first run's tables (pinned like `--load-versions`) with its parameters:
    # `kedro run --pipeline=visualize --nodes=plot_distance_heatmaps --load-versions=...`.
    pinned = {name: versions(project, f"data/08_reporting/analysis/{name}.parquet")[0]
              for name in ("distance_noise_units", "ordering_status")}
    run_project(project, monkeypatch, ["visualize"], first, load_versions=pinned, node_names=["plot_distance_heatmaps"])
    third_version = versions(project, heatmaps)[2]
    assert file_digests(project / heatmaps / third_version) == first_pngs


def test_in_memory_input_of_a_partial_run_is_named_before_any_work(fresh_project, monkeypatch):
    """`kedro run --pipeline=visualize --nodes=write_report` alone: the figures it embeds live only during a run."""
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(fresh_project)
    bootstrap_project(fresh_project)
    before = files_under(fresh_project / "data")
    with pytest.raises(RunCheckError, match=r"Input 'figures_distance_heatmaps_for_report' is kept in memory only, so "
                                            r"it does not exist yet. It lives only during a run: include node "
                                            r"'plot_distance_heatmaps' in this run."):
        with KedroSession.create(project_path=fresh_project) as session:
            session.run(pipeline_names=["visualize"], node_names=["write_report"])
    assert files_under(fresh_project / "data") == before


# --------------------------------------------------------------------------- round 2: runs that cannot finish


@pytest.mark.parametrize(("batch_size", "batches"), [(5000, 1), (2500, 2), (1000, 5)])
def test_too_few_batches_for_the_analysis_stop_before_any_work(fresh_project, monkeypatch, batch_size, batches):
    """Before: these trained fully, then died in the claims (KeyError: 'p_value', or 0 of 5 batches in a group)."""
    message = refused_run(fresh_project, monkeypatch, sort_batches={"batch_size": batch_size})
    assert (f"Parameter sort_batches.batch_size: sort_batches.batch_size={batch_size} cuts the 5000 training images "
            f"into {batches} batches, but distance_analysis needs at least 6 per ordering") in message, message
    assert "Lower sort_batches.batch_size to at most 833" in message


@pytest.mark.parametrize(("params", "expected"), [
    ({"sort_batches": {"batch_sizee": 64}}, "Parameter sort_batches.batch_sizee: unknown parameter. Known parameters: "
                                            "batch_size, control_batchings, stratify, tie_seed. Did you mean 'batch_size'?"),
    ({"visualize": {"report_titel": "x"}}, "Parameter visualize.report_titel: unknown parameter. Known parameters: "
                                           "report_png_dpi, report_title. Did you mean 'report_title'?"),
    ({"ingest_cifar": {"source": {"pth": "x"}}}, "Parameter ingest_cifar.source.pth: unknown parameter. Known "
                                                 "parameters: download, download_root, layout, path. Did you mean "
                                                 "'path'?"),
    ({"training": {"phasess": []}}, "Parameter training.phasess: unknown parameter. Known parameters: "),
    ({"gradient_training": {"keep_gradient": "all"}}, "Did you mean 'keep_gradients'?"),
], ids=["sort_batches", "visualize", "ingest_cifar-source", "training", "gradient_training"])
def test_every_misspelled_key_is_an_error_with_the_closest_key(fresh_project, monkeypatch, params, expected):
    """Before: sort_batches, visualize and ingest_cifar ignored unknown keys (a run with batch_sizee used 100)."""
    message = refused_run(fresh_project, monkeypatch, **params)
    assert expected in message, message


def test_every_bad_phase_is_reported_not_only_the_first(fresh_project, monkeypatch):
    message = refused_run(fresh_project, monkeypatch, training={
        "phases": [{"epochs": 0, "lr": 0.1}, {"epochs": 3, "lr": 0.01}, {"epochs": 3, "lr": -1}]})
    assert "Parameter training.phases: 2 phases are wrong: training.phases[0].epochs: must be a positive" in message
    assert "training.phases[2].lr: must be a positive number, got -1" in message


def test_a_problem_of_the_shared_recipe_is_listed_once(fresh_project, monkeypatch):
    """training is read by its own check and by gradient_training's: one problem, one line."""
    message = refused_run(fresh_project, monkeypatch, training={"model": {"name": "vgg16"}})
    assert message.count("Parameter training.model.name: unknown value 'vgg16'") == 1
    assert "1 problem(s) found" in message


def test_a_batch_size_other_than_sort_batches_is_refused(fresh_project, monkeypatch):
    message = refused_run(fresh_project, monkeypatch, training={"batch_size": 64})
    assert ("Parameter training.batch_size=64 differs from sort_batches.batch_size=100: every experiment trains on "
            "the batch size sort_batches cuts.") in message


def test_in_memory_gradient_buffer_larger_than_the_devices_memory_is_refused():
    """Before: conf/paper on a CPU died in training with DefaultCPUAllocator: can't allocate 26704574520 bytes."""
    config = TrainingConfig.from_params({"gradient_buffer": {"memory_cap_gb": 30}}, {"model": {"name": "dpn92"}})
    with pytest.raises(TrainingConfigError, match=r"gradient_buffer.memory_cap_gb: an epoch's gradients \(195 batches "
                       r"x 34,236,634 parameters in torch.float32 = 24.9 GiB\) fit under the cap of 30 GiB and would "
                       r"be held in cpu memory, which has only 21.5 GiB available. Lower"):
        check_buffer_memory(config, 34_236_634, torch.float32, 195, available=int(21.5 * 2**30))
    check_buffer_memory(config, 34_236_634, torch.float32, 195, available=int(30 * 2**30))  # fits: no error
    spilled = TrainingConfig.from_params({"gradient_buffer": {"memory_cap_gb": 1}}, {"model": {"name": "dpn92"}})
    check_buffer_memory(spilled, 34_236_634, torch.float32, 195, available=2**30)  # goes to scratch files


def test_a_run_measured_to_take_longer_than_the_environment_expects_is_refused(fresh_project, monkeypatch):
    """Before: conf/paper's DPN92 on a CPU started a job of several weeks without a word."""
    message = refused_run(fresh_project, monkeypatch, gradient_training={"expected_hours": 1e-6})
    assert re.search(r"Parameter gradient_training.expected_hours: the run would take about [\d.,]+ hours \(10 orderings "
                     r"x 2 seeds x 6 epochs x 50 batches of 100 \+ 10 null batches at [\d.e-]+ s per probed step of small_cnn on "
                     r"cpu, measured on "
                     r"\d steps? of \d+ images( and scaled)?\), more than the 1e-06 hours this environment expects. "
                     r"Confirm with --params gradient_training.expected_hours=\d+", message), message
