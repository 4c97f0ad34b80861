"""Resuming after a real SIGKILL: the final distance table equals an uninterrupted run's, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from best_minibatch.data.tensor_io import load_tensors

PROJECT_ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 12

# The run a subprocess performs: the training core, spilling kept gradients the way the
# Kedro catalog does (one atomically written .pt file per partition), then the outputs.
RUN_SCRIPT = f"""
import logging, sys
from pathlib import Path
import torch
from torch import nn
from best_minibatch.data.tensor_io import save_tensors_atomically
from best_minibatch.gradient_training import GradientProbeRun, TrainingConfig, TrainingData

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
work, out = Path(sys.argv[1]), Path(sys.argv[2])
data = TrainingData(**torch.load(Path(sys.argv[3]), weights_only=True))
config = TrainingConfig.from_params({{
    "training": {{
        "model": {{"name": "small_cnn"}},  # the script passes its own tiny model's factory
        "phases": [{{"epochs": {EPOCHS // 3}, "lr": 0.05}}, {{"epochs": {EPOCHS // 3}, "lr": 0.01}},
                   {{"epochs": {EPOCHS // 3}, "lr": 0.002}}],
        "augment": True, "cpu_threads": 1, "progress_bar": False,
    }},
    "keep_gradients": {{"every_n": 4}},
    "checkpoint_dir": str(work / "checkpoints"),
    "gradients_dir": str(work / "gradients"),
}})

def tiny_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10))

run = GradientProbeRun(config, data, tiny_model, "intensity")
run.run()
out.mkdir(parents=True, exist_ok=True)
run.results.distances.to_parquet(out / "distances.parquet")
save_tensors_atomically(run.results.model_state, out / "model.pt")
print("run finished", flush=True)
"""


@pytest.fixture(scope="module")
def script_and_data(tmp_path_factory, sample_dataset) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("resume")
    index = sample_dataset.index
    train = index[index["split"] == "train"].sort_values("row")
    test = index[index["split"] == "test"].sort_values("row")
    data = {
        "train_images": sample_dataset.images["train"][:600:3].contiguous(),  # 200 real images
        "train_labels": torch.tensor(train["label"].to_numpy()[:600:3]),
        "batches": torch.arange(200).view(10, 20),
        "test_images": sample_dataset.images["test"][::20].contiguous(),
        "test_labels": torch.tensor(test["label"].to_numpy()[::20]),
    }
    torch.save(data, folder / "data.pt")
    (folder / "run.py").write_text(RUN_SCRIPT)
    return folder / "run.py", folder / "data.pt"


_STARTED: list[subprocess.Popen] = []


def start(script: Path, data: Path, work: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(script), str(work), str(out), str(data)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _STARTED.append(process)
    return process


@pytest.fixture(autouse=True)
def stop_started_runs():
    """Every run a test started is stopped when the test ends, whatever its outcome."""
    yield
    while _STARTED:
        process = _STARTED.pop()
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=60)


@pytest.mark.slow  # real subprocesses killed and rerun
def test_rerun_after_sigkill_resumes_and_matches_an_uninterrupted_run(tmp_path, script_and_data):
    script, data = script_and_data
    reference = start(script, data, tmp_path / "reference", tmp_path / "reference_out")

    # Kill the second run as soon as its second epoch's checkpoint exists, i.e. in epoch 3.
    interrupted = start(script, data, tmp_path / "work", tmp_path / "killed_out")
    checkpoints = tmp_path / "work" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("*/intensity/epoch=002.pt")):
        assert interrupted.poll() is None, interrupted.stdout.read()
        assert time.monotonic() < deadline, "the run never reached epoch 2"
        time.sleep(0.002)
    interrupted.send_signal(signal.SIGKILL)
    interrupted.wait()
    assert interrupted.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed_out").exists()
    done_epochs = [int(p.stem.split("=")[1]) for p in checkpoints.glob("*/intensity/epoch=*.pt")]
    assert max(done_epochs) < EPOCHS, "the kill must land before the run ends"

    resumed = start(script, data, tmp_path / "work", tmp_path / "resumed_out")
    resumed_log, _ = resumed.communicate(timeout=300)
    reference_log, _ = reference.communicate(timeout=300)
    assert resumed.returncode == 0, resumed_log
    assert reference.returncode == 0, reference_log
    assert f"resuming after epoch {max(done_epochs)}" in resumed_log
    assert "resuming" not in reference_log

    expected = pd.read_parquet(tmp_path / "reference_out" / "distances.parquet")
    got = pd.read_parquet(tmp_path / "resumed_out" / "distances.parquet")
    assert len(got) == EPOCHS * 10
    pd.testing.assert_frame_equal(got, expected, check_exact=True)
    expected_model = load_tensors(tmp_path / "reference_out" / "model.pt")
    got_model = load_tensors(tmp_path / "resumed_out" / "model.pt")
    assert all(torch.equal(got_model[k], v) for k, v in expected_model.items())
    # The kept epochs' spilled gradients are complete and equal too.
    spilled = sorted(p.relative_to(tmp_path / "work" / "gradients")
                     for p in (tmp_path / "work" / "gradients").rglob("*.pt"))
    assert len(spilled) == 3 * 10
    for relative in spilled:
        assert torch.equal(load_tensors(tmp_path / "work" / "gradients" / relative),
                           load_tensors(tmp_path / "reference" / "gradients" / relative))
