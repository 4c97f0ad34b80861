"""Messages a user can act on, and a test suite that behaves on a newcomer's machine.

* A raw dataset of the other layout is named for what it is (issue 16, item 5).
* A refusal before a run prints its message alone, without a traceback (through the real
  ``kedro run`` CLI, in a subprocess on a copy of the project); ``--verbose`` prints it.
* Tests that need the full CIFAR-10 zip skip without it, unless the full data is required.
* No process a test starts survives the session (``tests/process_guard.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from best_minibatch import cli
from best_minibatch.data.cifar import DatasetInputError, count_training_images, read_image_dataset
from best_minibatch.kedro_glue.run_checks import RunCheckError
from best_minibatch.services.run_manifest import RunInputsError
from tests.conftest import FULL_DATA_REQUIRED, PROJECT_ROOT, SAMPLE_ZIP, copy_project, full_data_or_skip
from tests.test_cifar import _write_canonical_release

KEDRO = Path(sys.executable).with_name("kedro")
IMAGE_FOLDER_ZIP = ("is a zip archive of image folders (train/<class>/<image> and test/<class>/<image>), which layout "
                    "'image_folder' reads, not 'cifar_python'. Set ingest_cifar.source.layout: image_folder")


# --------------------------------------------------------------------------- the other layout


@pytest.mark.parametrize("read", [read_image_dataset, count_training_images], ids=["read", "count"])
def test_an_image_folder_zip_read_as_the_python_release_is_named_as_such(read):
    with pytest.raises(DatasetInputError) as refused:
        read(SAMPLE_ZIP, "cifar_python")
    assert IMAGE_FOLDER_ZIP in str(refused.value)
    assert "tar" not in str(refused.value) and "Re-download" not in str(refused.value)


def test_the_python_release_read_as_image_folders_is_named_as_such(tmp_path):
    _write_canonical_release(tmp_path, np.random.default_rng(5), per_batch=3)
    with pytest.raises(DatasetInputError, match=r"is a tar archive holding the CIFAR-10 python release \(data_batch_1"
                                                r"..5, test_batch, batches.meta\), which layout 'cifar_python' reads, "
                                                r"not 'image_folder'"):
        read_image_dataset(tmp_path / "cifar-10-python.tar.gz", "image_folder")


def test_a_folder_of_image_folders_read_as_the_python_release_is_named_as_such(tmp_path):
    import zipfile

    with zipfile.ZipFile(SAMPLE_ZIP) as archive:
        archive.extractall(tmp_path / "folder", members=[n for n in archive.namelist() if "/cat/" in n])
    with pytest.raises(DatasetInputError, match="is a folder of image folders .* which layout 'image_folder' reads"):
        read_image_dataset(tmp_path / "folder", "cifar_python")


def test_a_zipped_python_release_says_to_extract_it(tmp_path):
    import zipfile

    _write_canonical_release(tmp_path, np.random.default_rng(6), per_batch=3)
    zipped = tmp_path / "cifar-10-python.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        for file in sorted((tmp_path / "cifar-10-batches-py").iterdir()):
            archive.write(file, f"cifar-10-batches-py/{file.name}")
    with pytest.raises(DatasetInputError,
                       match="is a zip archive holding the CIFAR-10 python release.*extract the zip"):
        read_image_dataset(zipped, "cifar_python")


def test_the_run_checks_name_the_layout_before_any_work(tmp_path, monkeypatch):
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    project = copy_project(tmp_path / "project")
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(project)
    bootstrap_project(project)
    with pytest.raises(RunCheckError, match=IMAGE_FOLDER_ZIP.replace("(", r"\(").replace(")", r"\)")):
        with KedroSession.create(project_path=project,
                                 runtime_params={"ingest_cifar": {"source": {"layout": "cifar_python"}}}) as session:
            session.run(pipeline_names=["ingest_cifar"])
    assert not (project / "data/02_intermediate").exists()  # nothing was written


# --------------------------------------------------------------------------- refusals print the message alone


def test_user_errors_are_the_projects_own_and_kedros_before_the_run():
    def raised(error: Exception) -> Exception:
        try:
            raise error
        except Exception as caught:
            return caught

    assert cli.is_user_error(raised(RunCheckError(["x"])))
    assert cli.is_user_error(raised(RunInputsError(["x"])))
    assert cli.is_user_error(raised(DatasetInputError("x")))
    assert not cli.is_user_error(raised(KeyError("p_value")))  # a bug keeps its traceback
    from kedro.pipeline import Pipeline, node

    with pytest.raises(ValueError) as kedro_refusal:  # Kedro's own check of the command line
        Pipeline([node(len, "a", "b", name="n", namespace="x")]).filter(node_namespaces=["sharp"])
    assert cli.is_user_error(kedro_refusal.value)


def kedro_run(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "MPLBACKEND": "Agg", "COLUMNS": "200"}
    return subprocess.run([str(KEDRO), "run", *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow  # three `kedro run` processes, about 15 s each
def test_a_refusal_prints_its_message_alone_and_the_traceback_only_when_asked(tmp_path):
    project = copy_project(tmp_path / "project")
    refused = kedro_run(project, "--params=sort_batches.batch_size=0")
    assert refused.returncode == 1
    assert refused.stdout.count("Traceback") == 0 and "╭" not in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr
    message = refused.stderr.strip().splitlines()
    assert message[:2] == ["The run was stopped before any work: 1 problem(s) found.",
                           "  - Parameter sort_batches.batch_size: must be a positive integer, got 0. Use e.g. 256 "
                           "(the paper's) or 100 (the base run's). (conf/<env>/parameters_sort_batches.yml)"]
    assert message[-1] == (f"(RunCheckError. The full traceback is in {project / 'logs/errors.log'}; run again "
                           "with --verbose to print it.)")
    log = (project / "logs/errors.log").read_text()
    assert "Traceback (most recent call last)" in log and "raise run_checks.RunCheckError(problems)" in log
    assert not (project / "data/02_intermediate").exists() or not any((project / "data/02_intermediate").iterdir())

    verbose = kedro_run(project, "--params=sort_batches.batch_size=0", "--verbose")
    assert verbose.returncode == 1 and "Traceback" in verbose.stdout + verbose.stderr
    assert "sort_batches.batch_size: must be a positive integer" in verbose.stdout + verbose.stderr

    kedros = kedro_run(project, "--pipelines=gradient_training", "--namespaces=sharp")  # Kedro's own refusal
    assert kedros.returncode == 1 and "╭" not in kedros.stdout + kedros.stderr
    assert "Pipeline does not contain nodes with the following namespaces: ['sharp']" in kedros.stderr


# --------------------------------------------------------------------------- the full dataset


def test_tests_needing_the_full_dataset_skip_naming_it_unless_it_is_required(tmp_path):
    absent = tmp_path / "cifar10-jpeg.zip"
    with pytest.raises(pytest.skip.Exception, match=f"{absent} is absent.*set {FULL_DATA_REQUIRED}=1"):
        full_data_or_skip(absent, required=False)
    with pytest.raises(pytest.fail.Exception, match=f"{absent} is absent.*{FULL_DATA_REQUIRED}=1 says the full data "
                                                    "is required"):
        full_data_or_skip(absent, required=True)
    assert full_data_or_skip(SAMPLE_ZIP, required=True) == SAMPLE_ZIP
    ci = (PROJECT_ROOT / ".ci/run").read_text()
    assert f"export {FULL_DATA_REQUIRED}=1" in ci and ci.index(FULL_DATA_REQUIRED) < ci.index("make test")


# --------------------------------------------------------------------------- no process outlives the tests

LEAKY_TEST = textwrap.dedent('''
    import subprocess, sys

    def test_leaves_an_orphan_behind():
        # A child that starts a grandchild and exits: the grandchild is orphaned, as kedro viz's server was.
        subprocess.run([sys.executable, "-c",
                        "import subprocess; subprocess.Popen(['sleep', '600'], start_new_session=True)"], check=True)
''')


def test_a_process_left_running_by_a_test_fails_the_session_and_is_stopped(tmp_path):
    (tmp_path / "test_leaky.py").write_text(LEAKY_TEST)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.process_guard", "-q",
                             "-p", "no:cacheprovider", "--rootdir", str(tmp_path), "-c", os.devnull,
                             str(tmp_path / "test_leaky.py")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "1 passed" in result.stdout, result.stdout + result.stderr
    assert result.returncode == 1, result.stdout
    assert "still running at the end of the session (killed now)" in result.stdout and "sleep 600" in result.stdout
    leftovers = subprocess.run(["pgrep", "-f", "^sleep 600$"], capture_output=True, text=True).stdout.split()
    assert leftovers == [] or all(not _descends_from_a_test(int(pid)) for pid in leftovers)


def _descends_from_a_test(pid: int) -> bool:
    """A process named like ours that no test of this run started (another session's) is not ours to judge."""
    import psutil

    try:
        return any(parent.pid == os.getpid() for parent in psutil.Process(pid).parents())
    except psutil.NoSuchProcess:
        return False
