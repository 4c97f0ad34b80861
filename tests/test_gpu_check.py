"""`make gpu-check` (scripts/gpu_check.py) in its CPU mode: what CI can run of the GPU readiness check."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kedro.config import OmegaConfigLoader

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = PROJECT_ROOT / "scripts" / "gpu_check.py"
GIB = 2**30
SMALL_CNN_WIDTH_8_PARAMS = 15_698  # conf/base's model (docs/gradient_training.md)


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return load_script()


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory) -> tuple[dict, str]:
    """`make gpu-check` on the CPU, through the Makefile target, with this interpreter."""
    if shutil.which("make") is None:
        pytest.fail("make is not installed; `make test` needs it anyway.")
    out = tmp_path_factory.mktemp("gpu-check") / "report.json"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")}
    # -o setup: the venv running this test is already set up; never reinstall from inside a test.
    completed = subprocess.run(
        ["make", "-o", "setup", "gpu-check", f"BIN={Path(sys.executable).parent}", f"GPU_CHECK_OUT={out}",
         "GPU_CHECK_ARGS=--device cpu --cluster local"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(out.read_text()), completed.stdout


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_cpu_mode_says_so_and_every_step_ran(cpu_report):
    report, stdout = cpu_report
    assert report["mode"] == "cpu"
    assert "CPU" in report["note"] and "tiny model" in report["note"]
    assert "mode cpu" in stdout and "every step ran" in stdout
    assert report["errors"] == {}
    assert report["device"]["type"] == "cpu"
    assert report["data"]["train_images"] == [5000, 32, 32, 3]
    assert report["data"]["test_images"] == [1000, 32, 32, 3]
    for step in ("device", "data", "throughput", "probe_pass", "probe_ratio", "paper_run", "time_estimate"):
        assert step in report["step_seconds"]


def test_throughput_measures_both_dtypes_and_layouts(cpu_report):
    throughput = cpu_report[0]["throughput"]
    assert throughput["model"] == "small_cnn" and throughput["num_params"] == SMALL_CNN_WIDTH_8_PARAMS
    combos = {(r["dtype"], r["memory_format"]) for r in throughput["results"]}
    assert combos == {(d, m) for d in ("float32", "bf16_autocast") for m in ("contiguous", "channels_last")}
    for row in throughput["results"]:
        assert len(row["images_per_s_runs"]) == throughput["runs"]
        assert all(finite_positive(r) for r in row["images_per_s_runs"])
        assert row["images_per_s_best"] == max(row["images_per_s_runs"])
    for dtype in ("float32", "bf16_autocast"):
        summary = throughput[dtype]
        rates = {"contiguous": summary["images_per_s_contiguous"], "channels_last": summary["images_per_s_channels_last"]}
        assert summary["faster_layout"] == max(rates, key=rates.get)
        assert summary["images_per_s_best_layout"] == max(rates.values())
        assert summary["channels_last_speedup"] == pytest.approx(rates["channels_last"] / rates["contiguous"])


def test_probe_ratio_and_memory(cpu_report):
    report = cpu_report[0]
    ratio, memory = report["probe_ratio"], report["probe_memory"]
    assert ratio["batches"] == 20 and len(ratio["plain_epoch_seconds"]) == len(ratio["probe_epoch_seconds"]) == 3
    assert ratio["ratio"] == pytest.approx(ratio["probe_seconds"] / ratio["plain_seconds"])
    assert ratio["probe_seconds"] == pytest.approx(sum(ratio["probe_epoch_seconds"][1:]) / 2)
    # The probe adds a forward and backward pass per batch: slower than plain training, and
    # (timings on a shared machine are noisy) within a wide bound of the expected ~2x.
    assert 0.9 < ratio["ratio"] < 10
    assert ratio["distance_rows"] == 3 * 20 and ratio["distances_finite"]
    assert ratio["settings"]["augment"] is True and ratio["settings"]["test_evaluation"] is False
    assert memory["num_params"] == SMALL_CNN_WIDTH_8_PARAMS
    assert memory["buffer_gib"] == 20 * SMALL_CNN_WIDTH_8_PARAMS * 4 / GIB
    assert memory["peak_allocated_gib"] is None  # no GPU
    assert memory["peak_host_rss_gib"] > memory["buffer_gib"]


def test_probe_pass_and_ratio_compare_the_batched_probe_with_the_sequential_one(cpu_report):
    report = cpu_report[0]
    assert "probe_pass" in report["step_seconds"]
    probe = report["probe_pass"]
    assert probe["model"] == "small_cnn" and probe["batches"] == 20 and probe["batch_size"] == 32
    for kind in ("sequential", "batched"):
        assert len(probe[f"{kind}_images_per_s_runs"]) == 3
        assert probe[f"{kind}_images_per_s"] == max(probe[f"{kind}_images_per_s_runs"])
    assert probe["speedup"] == pytest.approx(probe["batched_images_per_s"] / probe["sequential_images_per_s"])
    assert 1 <= probe["batched_chunk"] <= 64
    assert probe["distance_max_relative_difference"] < 1e-4  # the same distances, to float32 rounding
    ratio = report["probe_ratio"]
    assert len(ratio["batched_probe_epoch_seconds"]) == 3
    assert ratio["batched_probe_seconds"] == pytest.approx(sum(ratio["batched_probe_epoch_seconds"][1:]) / 2)
    assert ratio["batched_ratio"] == pytest.approx(ratio["batched_probe_seconds"] / ratio["plain_seconds"])
    assert ratio["batched_probe_images_per_s"] == pytest.approx(20 * 32 / ratio["batched_probe_seconds"])
    assert ratio["batched_distance_max_relative_difference"] < 1e-4


def test_the_report_is_written_through_the_projects_atomic_writer_and_merge(gpu_check, monkeypatch, tmp_path):
    from best_minibatch import config
    from best_minibatch.data import tensor_io

    assert gpu_check.deep_merge is config.deep_merge
    assert gpu_check.write_text_atomically is tensor_io.write_text_atomically
    written = []
    monkeypatch.setattr(gpu_check, "write_text_atomically", lambda text, path: written.append((text, path)))
    gpu_check.write_json_atomically({"a": float("nan"), "b": (1, 2)}, tmp_path / "r.json")
    assert written == [('{\n  "a": NaN,\n  "b": [\n    1,\n    2\n  ]\n}\n', tmp_path / "r.json")]


def test_paper_run_is_two_epochs_of_the_paper_parameters(cpu_report):
    run = cpu_report[0]["paper_run"]
    assert run["model"] == "small_cnn" and run["num_params"] == SMALL_CNN_WIDTH_8_PARAMS
    # From conf/paper: augmentation, bfloat16 spills, the first two epochs of the lr 0.1 phase,
    # and of the kept epochs [1, 50, ...] only epoch 1.
    assert run["phases"] == [{"epochs": 2, "lr": 0.1}]
    assert run["augment"] is True and run["spill_dtype"] == "bfloat16" and run["deterministic"] is False
    assert run["kept_epochs"] == [1] and run["eval_batch_size"] == 1000
    assert run["batches"] == 1000 // 64 and run["train_images"] == run["batches"] * 64
    assert run["test_images"] == 1000
    assert run["spilled_gradients"] == run["batches"]
    assert run["spilled_gib"] == pytest.approx(run["batches"] * SMALL_CNN_WIDTH_8_PARAMS * 2 / GIB)
    assert run["distance_rows"] == 2 * run["batches"]
    assert [row["epoch"] for row in run["history"]] == [1, 2]
    for row in run["history"]:
        assert finite_positive(row["train_loss"]) and finite_positive(row["test_loss"])
        assert 0 <= row["train_accuracy"] <= 1 and 0 <= row["test_accuracy"] <= 1
        assert finite_positive(row["mean_distance"]) and finite_positive(row["seconds"])
    assert [row["gradients_kept"] for row in run["history"]] == [True, False]


def test_paper_run_on_a_dask_cluster_trains_once_per_worker(cpu_report):
    """--cluster local: the paper run twice at once on two CPU worker processes (on CUDA: once per GPU)."""
    report = cpu_report[0]
    dask_run = report["paper_run_dask"]
    assert dask_run["cluster"] == "local" and dask_run["workers"] == 2 and dask_run["trainings"] == 2
    assert [r["device"] for r in dask_run["per_training"]] == ["cpu", "cpu"]
    single = report["paper_run"]["history"][-1]["test_accuracy"]
    assert [r["final_test_accuracy"] for r in dask_run["per_training"]] == [single, single]  # the same training
    assert finite_positive(dask_run["wall_seconds"])


def test_time_estimate_follows_from_the_measured_figures(cpu_report):
    report = cpu_report[0]
    estimate = report["time_estimate"]
    passes = 150 * 50_000 * 2
    assert estimate["forward_backward_passes_per_ordering"] == passes
    assert estimate["hours_per_ordering_at_assumed_rate"] == pytest.approx(passes / 1000 / 3600)
    rate = report["throughput"]["float32"]["images_per_s_contiguous"]
    assert estimate["float32_images_per_s"] == rate
    assert estimate["float32_hours_per_ordering"] == pytest.approx(passes / rate / 3600)
    assert estimate["float32_hours_all_orderings"] == pytest.approx(5 * passes / rate / 3600)
    probed = report["probe_ratio"]["probe_seconds"]
    assert estimate["engine_hours_per_ordering"] == pytest.approx(150 * probed * 195 / 20 / 3600)


def test_paper_parameters_equal_kedros_soft_merge(gpu_check, tmp_path):
    """The script reads conf/paper over conf/base without Kedro; Kedro's own loader must agree."""
    paper = gpu_check.paper_parameters(PROJECT_ROOT / "conf", tmp_path)
    loader = OmegaConfigLoader(conf_source=str(PROJECT_ROOT / "conf"), base_env="base", default_run_env="paper",
                               merge_strategy={"parameters": "soft"})
    kedro_params = loader["parameters"]
    expected = dict(kedro_params["gradient_training"])
    # The runtime interpolation, replaced by a folder under the scratch folder.
    assert paper.gradient_training["gradients_dir"] == str(tmp_path / "gradients_dir")
    expected["gradients_dir"] = paper.gradient_training["gradients_dir"]
    assert paper.gradient_training == expected
    assert paper.training == kedro_params.get("training")  # None in the layout without a shared recipe
    assert paper.batch_size == kedro_params["sort_batches"]["batch_size"] == 256
    assert paper.base_model == {"name": "small_cnn", "small_cnn": {"width": 8}}
    assert paper.recipe["model"]["name"] == "dpn92"
    config = paper.config({}, {})
    recipe = gpu_check.recipe_of(config)
    assert recipe.model == "dpn92" and recipe.augment is True and config.spill_dtype == "bfloat16"
    assert config.num_epochs == 150


def test_first_epochs_and_kept_epochs_of_a_shortened_run(gpu_check):
    phases = [{"epochs": 1, "lr": 0.1}, {"epochs": 50, "lr": 0.01}, {"epochs": 50, "lr": 0.001}]
    assert gpu_check.first_epochs(phases, 2) == [{"epochs": 1, "lr": 0.1}, {"epochs": 1, "lr": 0.01}]
    assert gpu_check.first_epochs(phases, 1) == [{"epochs": 1, "lr": 0.1}]
    assert gpu_check.shortened_keep([1, 50, 51, 100], 2) == [1]
    assert gpu_check.shortened_keep("all", 2) == "all"
    assert gpu_check.shortened_keep({"every_n": 3}, 2) == {"every_n": 3}


def test_bad_output_path_is_refused_before_any_work(gpu_check, tmp_path, capsys):
    folder = tmp_path / "existing-folder"
    folder.mkdir()
    assert gpu_check.main(["--device", "cpu", "--out", str(folder)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert list(folder.iterdir()) == []
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path / "report.txt")]) == 2
    assert "must end in .json" in capsys.readouterr().err
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path / "r.json"),
                           "--sample", str(tmp_path / "missing.zip")]) == 2
    assert "is missing. It is tracked in git" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_a_failed_step_is_recorded_and_the_others_still_run(gpu_check, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(gpu_check, "throughput", broken)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(gpu_check.tempfile, "tempdir", str(scratch))
    out = tmp_path / "report.json"
    # In this process torch's OpenMP threads may spin (OMP_WAIT_POLICY is set only when best_minibatch
    # is imported before torch, as in the script's own process): one thread keeps it fast.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert gpu_check.main(["--device", "cpu", "--out", str(out)]) == 1  # non-zero: a step failed
    finally:
        torch.set_num_threads(threads)
    assert list(scratch.iterdir()) == []  # the run's checkpoints and scratch files are gone
    report = json.loads(out.read_text())
    assert report["errors"] == {"throughput": "RuntimeError: simulated failure"}
    assert report["throughput"]["error"] == "RuntimeError: simulated failure"
    assert "simulated failure" in report["throughput"]["traceback"]
    assert report["probe_ratio"]["ratio"] > 0 and len(report["paper_run"]["history"]) == 2
    # The time estimate still uses what was measured (the engine's probed epoch).
    assert "float32_images_per_s" not in report["time_estimate"]
    assert finite_positive(report["time_estimate"]["engine_hours_per_ordering"])
