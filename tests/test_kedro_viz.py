"""kedro-viz: the six pipelines as a user sees them, in a real headless Chromium; the static build."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, copy_project

PIPELINES = ["ingest_cifar", "score_metrics", "sort_batches", "gradient_training", "distance_analysis", "visualize"]
KEDRO = Path(sys.executable).with_name("kedro")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--window-size=1600,1000",
    "--virtual-time-budget=20000",
]


def free_port() -> int:
    """A free loopback port below 49152 (kedro viz refuses ports in the ephemeral range)."""
    for port in random.Random().sample(range(20_000, 49_000), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port between 20000 and 49000")


def wait_for(url: str, timeout: float, process: subprocess.Popen) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read()
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def viz_environment() -> dict[str, str]:
    return {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"}


def start_group(command: list[str], **options) -> subprocess.Popen:
    """Start ``command`` as the leader of a new process group, so that it and every process it starts
    (kedro viz runs its server in a child process; Chromium starts several) can be stopped together."""
    return subprocess.Popen(command, start_new_session=True, **options)


def stop_group(process: subprocess.Popen, grace: float = 10) -> None:
    """Stop ``process`` and its whole process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break  # the group is gone
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        if not _group_alive(process.pid):
            break
    process.wait(timeout=30)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


def run_group(command: list[str], timeout: float, **options) -> subprocess.CompletedProcess:
    """``subprocess.run`` for a command that starts processes of its own: they are all stopped when it returns."""
    process = start_group(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    finally:
        stop_group(process)


@pytest.fixture(scope="module")
def viz_server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("viz") / "kedro-viz.log"
    with log.open("w") as output:
        process = start_group(
            [str(KEDRO), "viz", "run", "--host", "127.0.0.1", "--port", str(port), "--no-browser"],
            cwd=PROJECT_ROOT,
            env=viz_environment(),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            api = json.loads(wait_for(f"http://127.0.0.1:{port}/api/main", 240, process))
        except AssertionError as error:
            raise AssertionError(f"{error}; kedro viz said:\n{log.read_text()[-3000:]}") from error
        yield f"http://127.0.0.1:{port}", api
    finally:
        stop_group(process)  # `kedro viz run` serves from a child process: terminating kedro alone orphans it


def run_chromium(url: str, profile: Path, *extra: str) -> str:
    return run_group([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url], timeout=180).stdout


def test_viz_api_lists_pipelines_namespaces_and_layers(viz_server):
    _, api = viz_server
    assert set(PIPELINES) <= {p["id"] for p in api["pipelines"]}
    assert {"intensity", "color", "edges", "perceptual", "random"} <= set(api["modular_pipelines"])
    layers = {n["name"]: n.get("layer") for n in api["nodes"] if n["type"] == "data"}
    assert layers["image_index"] == "intermediate"
    assert layers["intensity.image_scores"] == "feature"
    assert layers["intensity.batch_assignments"] == "model_input"
    assert layers["intensity.gradient_distances"] == "model_output"
    assert layers["intensity.trained_model"] == "models"
    assert layers["report_html"] == "reporting"


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (make test installs Debian's chromium)")
def test_viz_in_headless_chromium_shows_pipelines_and_a_training_node(viz_server, tmp_path):
    base, _ = viz_server
    url = f"{base}/?pid=gradient_training&expandAllPipelines=true"
    dom = run_chromium(url, tmp_path / "profile-dom", "--dump-dom")
    for name in PIPELINES:
        assert f'title="{name}"' in dom, f"pipeline {name} missing from the pipeline menu"
    assert 'node-list-tree-item--row--train_with_gradient_probe"' in dom
    for namespace in ("intensity", "random"):
        assert f'node-list-tree-item--row--{namespace}"' in dom  # namespaces are collapsible groups
    screenshot = tmp_path / "kedro-viz-gradient_training.png"
    run_chromium(url, tmp_path / "profile-shot", f"--screenshot={screenshot}")
    assert screenshot.stat().st_size > 20_000  # a rendered page, not a blank one


@pytest.mark.slow  # kedro viz build
def test_viz_build_makes_a_static_site_that_serves_over_http(tmp_path):
    project = copy_project(tmp_path / "project")
    built = run_group([str(KEDRO), "viz", "build"], timeout=600, cwd=project, env=viz_environment())
    assert built.returncode == 0, built.stderr[-3000:]
    build = project / "build"
    assert (build / "index.html").exists()
    port = free_port()
    server = start_group(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", str(build)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        index = wait_for(f"http://127.0.0.1:{port}/", 30, server)
        assert b"<html" in index.lower()
        api = json.loads(wait_for(f"http://127.0.0.1:{port}/api/main", 30, server))
        assert set(PIPELINES) <= {p["id"] for p in api["pipelines"]}
    finally:
        stop_group(server)
