"""Faults during a run: kills while writing, a full disk, damaged files found on resume.

Every case ends with the same check: after the fault is cleared, running the same
command again completes, and its distance table equals an uninterrupted run's bit
for bit. Kills and disk-full runs happen in a child process (``tests/fault_harness.py``)
so the faults are real; damaged files are tested in this process.
"""

from __future__ import annotations

import errno
import os
import multiprocessing
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pytest
import torch

from best_minibatch.checkpoints import CheckpointError
from best_minibatch.datasets import PARTIAL_SUFFIX, DiskFullError, load_tensors, save_tensors_atomically
from best_minibatch.training import GradientProbeRun
from tests import fault_harness
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
    assert child.exitcode is not None, "the child did not finish within 300 s"
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
    """A run whose kept gradients are written to disk the way the catalog writes them."""
    run = GradientProbeRun(config, data, tiny_model, "intensity")
    for spilled in run.run():
        save_tensors_atomically(spilled.gradient, run.gradient_path(spilled.epoch, spilled.batch))
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
