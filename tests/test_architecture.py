"""The architecture holds: a Kedro-free core, one training loop, one parameter style (docs/architecture.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "best_minibatch"
#: The Kedro glue: everything else is the core library, which must import without Kedro.
KEDRO_GLUE = {"datasets.py", "hooks.py", "settings.py", "pipeline_registry.py", "__main__.py", "cli.py",
              "run_hooks.py", "tracking.py", "runner.py"}


def core_modules() -> list[str]:
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "pipelines" or relative.name in KEDRO_GLUE:
            continue
        dotted = ".".join(("best_minibatch", *relative.with_suffix("").parts))
        modules.append(dotted.removesuffix(".__init__"))
    return modules


def test_every_core_module_imports_without_kedro():
    modules = core_modules()
    assert len(modules) >= 25 and "best_minibatch.training.algorithm1" in modules
    script = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
              + "leaked = sorted(m for m in sys.modules if m == 'kedro' or m.startswith('kedro.'))\n"
              + "print(leaked)\nsys.exit(1 if leaked else 0)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"core modules imported Kedro: {done.stdout} {done.stderr[-2000:]}"


def source_files() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE)): p.read_text() for p in PACKAGE.rglob("*.py")}


@pytest.mark.parametrize(("pattern", "allowed"), [
    # Optimizer steps and the training forward/backward live in the one loop.
    (r"optimizer\.step\(", {"training/loop.py"}),
    (r"torch\.optim\.SGD\(", {"training/recipe.py"}),
    # Backward passes: the loop (net_normal), Algorithm 1's probe (net_compare), nowhere else.
    (r"\.backward\(", {"training/loop.py", "training/algorithm1.py"}),
    # One device/thread setup and one progress bar.
    (r"set_num_threads\(", {"training/runtime.py"}),
    (r"from rich.progress import", {"training/loop.py"}),
    (r"cuda\.is_available\(", {"training/runtime.py"}),
    (r"def resolved_device\(", {"training/recipe.py", "training/gradient_training.py"}),
])
def test_training_concepts_live_in_one_place(pattern, allowed):
    found = {name for name, text in source_files().items() if re.search(pattern, text)}
    assert found <= allowed, f"{pattern!r} appears in {sorted(found - allowed)} as well as {sorted(allowed)}"


def test_both_experiments_train_through_the_one_loop_and_probe():
    files = source_files()
    for experiment in ("training/gradient_training.py", "selection/experiment.py"):
        assert "train_epochs(" in files[experiment], experiment
        assert "GradientProbe" in files[experiment], experiment


def test_parameters_are_checked_in_one_style():
    """Every typed config reads its section through config.Section (unknown keys refused, closest suggested)."""
    files = source_files()
    for module in ("training/recipe.py", "training/gradient_training.py", "selection/config.py",
                   "batches/batching.py", "data/cifar.py", "analysis/statistics.py", "analysis/report.py",
                   "metrics/options.py"):
        assert "Section(" in files[module], module
    # No section keeps a parser of its own for unknown keys.
    assert not any("unknown parameter" in text for name, text in files.items() if name != "config.py")
    # The other styles are gone: per-key helpers, a dict-returning checker, loose per-key parsers.
    for pattern in (r"def require_(int|number|bool)\(", r"def check_parameters\(", r"def \w+_from_params\(",
                    r"def perceptual_settings\("):
        found = sorted(name for name, text in files.items() if re.search(pattern, text))
        assert not found, f"{pattern!r} in {found}"
