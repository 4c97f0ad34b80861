"""The architecture holds: three areas, folder import rules, one training loop, one parameter style (docs/architecture.md)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "best_minibatch"
#: Kedro's own files at the package root; every other root module is listed in ROOT_MODULES.
KEDRO_ROOT_FILES = {"settings.py", "pipeline_registry.py", "__main__.py", "cli.py"}
#: The package root: Kedro's files, the package itself and the one parameter style shared by every area.
ROOT_MODULES = KEDRO_ROOT_FILES | {"__init__.py", "config.py"}
#: Folders that may import Kedro: the glue and the wiring.
KEDRO_FOLDERS = {"kedro_glue", "pipelines"}
SCIENCE = {"data", "metrics", "batches", "training", "gradient_training", "selection", "analysis"}
EXPERIMENTS = {"gradient_training", "selection"}


def area_of(path: Path) -> str:
    """The top-level folder of a module under the package (``""`` for a root module)."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else ""


def imported_areas(path: Path) -> set[str]:
    """The package's areas a module imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                 [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
        for name in names:
            parts = name.split(".")
            if parts[0] != "best_minibatch":
                continue
            if len(parts) > 1:
                found.add(parts[1])
            elif isinstance(node, ast.ImportFrom):  # from best_minibatch import x
                found |= {alias.name for alias in node.names}
    return found


def core_modules() -> list[str]:
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if area_of(path) in KEDRO_FOLDERS or (area_of(path) == "" and relative.name in KEDRO_ROOT_FILES):
            continue
        dotted = ".".join(("best_minibatch", *relative.with_suffix("").parts))
        modules.append(dotted.removesuffix(".__init__"))
    return modules


def test_the_package_root_shows_three_areas():
    """The science's stages, the run services and the Kedro glue are folders; the root holds only Kedro's files,
    the package and the one parameter style."""
    root_modules = {p.name for p in PACKAGE.glob("*.py")}
    assert root_modules == ROOT_MODULES, f"loose modules at the root: {sorted(root_modules - ROOT_MODULES)}"
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == SCIENCE | {"services"} | KEDRO_FOLDERS, sorted(folders)


def test_every_module_outside_the_glue_imports_without_kedro():
    modules = core_modules()
    assert len(modules) >= 35 and "best_minibatch.training.algorithm1" in modules
    assert "best_minibatch.services.parallel" in modules and "best_minibatch.gradient_training.run" in modules
    script = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
              + "leaked = sorted(m for m in sys.modules if m == 'kedro' or m.startswith('kedro.'))\n"
              + "print(leaked)\nsys.exit(1 if leaked else 0)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"modules outside the glue imported Kedro: {done.stdout} {done.stderr[-2000:]}"


@pytest.mark.parametrize(("areas", "forbidden", "rule"), [
    ({"training"}, EXPERIMENTS | {"analysis", "services", "kedro_glue", "pipelines"},
     "the shared engine imports neither experiment"),
    ({"gradient_training"}, {"selection", "kedro_glue", "pipelines"}, "the experiments never import each other"),
    ({"selection"}, {"gradient_training", "kedro_glue", "pipelines"}, "the experiments never import each other"),
    ({"services"}, SCIENCE | {"kedro_glue", "pipelines"}, "run services import no experiment or stage"),
    (SCIENCE, {"kedro_glue", "pipelines"}, "the science never imports the glue"),
])
def test_folder_import_rules(areas, forbidden, rule):
    broken = {str(path.relative_to(PACKAGE)): sorted(imported_areas(path) & forbidden)
              for path in PACKAGE.rglob("*.py") if area_of(path) in areas}
    broken = {name: found for name, found in broken.items() if found}
    assert not broken, f"{rule}: {broken}"


def test_the_import_rules_see_function_level_imports(tmp_path):
    """The rule checker is not blind: an import inside a function counts."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from best_minibatch.selection import experiment\n"
                      "from best_minibatch import parallel\n")
    assert imported_areas(module) == {"selection", "parallel"}


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
    (r"def resolved_device\(", {"training/recipe.py", "gradient_training/config.py"}),
])
def test_training_concepts_live_in_one_place(pattern, allowed):
    found = {name for name, text in source_files().items() if re.search(pattern, text)}
    assert found <= allowed, f"{pattern!r} appears in {sorted(found - allowed)} as well as {sorted(allowed)}"


def test_both_experiments_train_through_the_one_loop_and_probe():
    files = source_files()
    for experiment in ("gradient_training/run.py", "selection/experiment.py"):
        assert "train_epochs(" in files[experiment], experiment
        assert "GradientProbe" in files[experiment], experiment


def test_parameters_are_checked_in_one_style():
    """Every typed config reads its section through config.Section (unknown keys refused, closest suggested)."""
    files = source_files()
    for module in ("training/recipe.py", "gradient_training/config.py", "selection/config.py",
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
