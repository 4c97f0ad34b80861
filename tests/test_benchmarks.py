"""Every benchmark runs in its tiny mode, so none can rot unnoticed (issue 23, case 13).

Nothing else runs the benchmarks: `make benchmark` once crashed in
benchmark_gradient_training.py's wide-model section on a key an earlier change had
removed, and no test noticed. Each script under benchmarks/ must offer ``--tiny``
(every section with tiny sizes, seconds long); this test runs it and fails on a
non-zero exit or a traceback. Its figures mean nothing and are not checked.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted((PROJECT_ROOT / "benchmarks").glob("benchmark_*.py"))

pytestmark = pytest.mark.slow  # every benchmark script, run in its tiny mode (~1.5 min together)


def test_there_are_benchmarks():
    assert len(BENCHMARKS) >= 5


@pytest.mark.parametrize("script", BENCHMARKS, ids=[p.stem for p in BENCHMARKS])
def test_every_benchmark_runs_in_its_tiny_mode(script, tmp_path):
    assert "--tiny" in script.read_text(), f"{script.name} has no --tiny mode: add one (see this test's docstring)"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"), "KEDRO_DISABLE_TELEMETRY": "true",
           "MPLBACKEND": "Agg", "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(script), "--tiny"], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "Traceback" not in output, f"{script.name} --tiny failed:\n{output[-4000:]}"
