"""Runs never read another run's outputs: run manifests, pinned versions, one run at a time.

The Kedro-free rules of ``best_minibatch.services.run_manifest`` first (synthetic manifests), then
whole-project runs on copies of a finished quick run: a failed run, an exploratory run with
another batch size and a concurrent run, each followed by a run of a separate pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from kedro.framework.hooks import hook_impl
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from best_minibatch.services import run_manifest as rm
from tests.conftest import QUICK_RUN_PARAMS

KEDRO = Path(sys.executable).with_name("kedro")
MANIFESTS = Path("data/runs/run_manifest.json")


# --------------------------------------------------------------------------- the rules, without Kedro

GRAPH = rm.RunGraph(
    nodes=[rm.NodeSpec("analyse", ("batches", "distances", "params:analysis"), ("stats",)),
           rm.NodeSpec("report", ("stats", "fragment", "params:report"), ("report",))],
    versioned={name: rm.DatasetSpec(name, f"data/{name}") for name in ("batches", "distances", "stats", "report")}
    | {"fragment": rm.DatasetSpec("fragment", "data/fragment", optional=True)},
)


def manifest(run_id: str, status: str, parameters: dict, datasets: dict[str, rm.Entry] | None = None,
             error: str | None = None) -> rm.Manifest:
    runs = {e.run: {"parameters": parameters} for e in (datasets or {}).values() if e.run}
    return rm.Manifest(run_id, status, command=f"kedro run #{run_id}", parameters=parameters,
                       datasets=datasets or {}, runs=runs, error=error)


def entry(version: str, keys=("sort",), lineage=None, path="") -> rm.Entry:
    return rm.Entry(version, version, path, list(keys), dict(lineage or {}))


BASE_PARAMS = {"sort": {"batch_size": 100, "progress_bar": True}, "analysis": {"seed": 0}, "report": {}}


def complete_run(run_id: str = "T1", parameters: dict | None = None) -> rm.Manifest:
    return manifest(run_id, rm.COMPLETED, parameters or BASE_PARAMS, {
        "batches": entry(run_id), "distances": entry(run_id, lineage={"batches": run_id})})


def on_disk(**versions):
    return lambda name: versions.get(name, [])


def test_inputs_come_from_the_last_completed_run_not_a_newer_failed_one():
    manifests = {"T1": complete_run("T1"), "T2": manifest("T2", rm.FAILED, BASE_PARAMS, error="KeyError: 'p_value'")}
    plan = rm.plan_run("T3", GRAPH, BASE_PARAMS, manifests, on_disk(batches=["T2", "T1"], distances=["T2", "T1"]))
    assert plan.problems == [] and plan.pins() == {"batches": "T1", "distances": "T1"}


def test_the_last_completed_run_is_the_one_that_finished_last_not_the_one_that_started_last():
    """B started after A but finished first (it took the lock first); A then read B's state, so A's is newest."""
    first, second = complete_run("A"), complete_run("B")
    second.finished, first.finished = "2026-01-01T00:00:01.000000+00:00", "2026-01-01T00:00:09.000000+00:00"
    manifests = {"A": first, "B": second}
    assert rm.ManifestStore("unused").last_completed(manifests).run_id == "A"
    plan = rm.plan_run("C", GRAPH, BASE_PARAMS, manifests, on_disk(batches=["B", "A"], distances=["B", "A"]))
    assert plan.base.run_id == "A" and plan.pins() == {"batches": "A", "distances": "A"}


def test_inputs_made_with_other_parameters_are_refused_naming_parameter_values_and_datasets():
    exploratory = {**BASE_PARAMS, "sort": {"batch_size": 50, "progress_bar": False}}
    manifests = {"T1": complete_run("T1"), "T2": complete_run("T2", exploratory)}
    plan = rm.plan_run("T3", GRAPH, BASE_PARAMS, manifests, on_disk(batches=["T2", "T1"], distances=["T2", "T1"]))
    assert plan.problems == ["sort.batch_size is 50 in run T2 (`kedro run #T2`), which made 'batches', "
                             "'distances'; this run's parameters say 100."]  # progress_bar changes no result
    assert plan.parameter_conflicts == {"sort.batch_size": 50}
    assert rm.matching_completed_runs(GRAPH, BASE_PARAMS, manifests, on_disk(batches=["T2", "T1"],
                                                                             distances=["T2", "T1"])) == ["T1"]
    named = rm.plan_run("T3", GRAPH, BASE_PARAMS, manifests, on_disk(batches=["T2", "T1"], distances=["T2", "T1"]),
                        base_run="T1")
    assert named.problems == [] and named.pins() == {"batches": "T1", "distances": "T1"}


def test_inputs_made_from_two_versions_of_one_dataset_are_refused():
    state = {"batches": entry("T2"), "distances": entry("T1", lineage={"batches": "T1"})}
    manifests = {"T1": complete_run("T1"), "T2": manifest("T2", rm.COMPLETED, BASE_PARAMS, state)}
    plan = rm.plan_run("T3", GRAPH, BASE_PARAMS, manifests, on_disk(batches=["T2", "T1"], distances=["T1"]))
    assert plan.problems == ["'batches' is not one version across this run's inputs: version T1 (what "
                             "'distances' was made from); version T2 (read as an input). They come from "
                             "different runs and do not belong together."]


def test_an_input_made_from_a_dataset_this_run_rewrites_is_refused():
    graph = rm.RunGraph([rm.NodeSpec("sort", ("scores",), ("batches",)),
                         rm.NodeSpec("report", ("batches", "distances"), ("report",))],
                        {n: rm.DatasetSpec(n, n) for n in ("scores", "batches", "distances", "report")})
    manifests = {"T1": manifest("T1", rm.COMPLETED, BASE_PARAMS, {
        "scores": entry("T1", ()), "distances": entry("T1", lineage={"batches": "T1", "scores": "T1"})})}
    plan = rm.plan_run("T2", graph, BASE_PARAMS, manifests, on_disk(scores=["T1"], distances=["T1"]))
    assert plan.problems == ["'distances' was made from 'batches' version T1, which this run writes anew: include "
                             "the pipeline that makes 'distances' in this run."]


def test_an_optional_input_that_does_not_fit_is_left_out_not_refused():
    state = {"batches": entry("T2"), "distances": entry("T2", lineage={"batches": "T2"}),
             "fragment": entry("T1", lineage={"batches": "T1"}, path="data/fragment")}
    manifests = {"T2": manifest("T2", rm.COMPLETED, BASE_PARAMS, state)}
    plan = rm.plan_run("T3", GRAPH, BASE_PARAMS, manifests,
                       on_disk(batches=["T2"], distances=["T2"], fragment=["T1"]))
    assert plan.problems == [] and "fragment" not in plan.inputs
    assert "'batches' is not one version" in plan.absent_optional["fragment"]


def test_no_completed_run_and_a_failed_runs_output_is_refused_naming_the_failure():
    manifests = {"T2": manifest("T2", rm.FAILED, BASE_PARAMS, error="KeyError: 'p_value'")}
    plan = rm.plan_run("T3", GRAPH, BASE_PARAMS, manifests, on_disk(batches=["T2"], distances=["T2"]))
    assert plan.problems == [
        f"'{name}': its newest version on disk, T2, was written by run T2 (`kedro run #T2`), which failed "
        f"(KeyError: 'p_value'); no completed run wrote it. No run has completed here yet. Run the pipeline that "
        f"writes '{name}' to completion first." for name in ("batches", "distances")]


def test_a_named_run_must_be_a_completed_one():
    manifests = {"T1": complete_run("T1"), "T2": manifest("T2", rm.RUNNING, BASE_PARAMS)}
    plan = rm.plan_run("T3", GRAPH, BASE_PARAMS, manifests, on_disk(batches=["T1"]), base_run="T2")
    assert plan.problems and "which did not finish" in plan.problems[0]
    assert "names no recorded run" in rm.plan_run("T3", GRAPH, BASE_PARAMS, manifests, on_disk(),
                                                  base_run="T9").problems[0]


def test_versions_no_run_recorded_are_read_with_a_warning():
    plan = rm.plan_run("T3", GRAPH, BASE_PARAMS, {}, on_disk(batches=["T0"], distances=["T0"]))
    assert plan.problems == [] and plan.pins() == {"batches": "T0", "distances": "T0"}
    assert len(plan.warnings) == 2 and "outside any recorded run" in plan.warnings[0]


def test_outputs_record_parameters_and_lineage_through_in_memory_datasets():
    graph = rm.RunGraph([rm.NodeSpec("train", ("batches", "params:train"), ("probe",)),
                         rm.NodeSpec("publish", ("probe",), ("distances",))],
                        {n: rm.DatasetSpec(n, n) for n in ("batches", "distances")})
    manifests = {"T1": manifest("T1", rm.COMPLETED, BASE_PARAMS, {"batches": entry("T1", lineage={"scores": "T1"})})}
    parameters = {**BASE_PARAMS, "train": {"epochs": 3}}
    plan = rm.plan_run("T2", graph, parameters, manifests, on_disk(batches=["T1"]))
    outputs = rm.output_entries("T2", graph, parameters, plan, saved=["distances"])
    assert outputs["distances"].parameter_keys == ["sort", "train"]
    assert outputs["distances"].lineage == {"batches": "T1", "scores": "T1"}
    state, runs = rm.completed_state("T2", "kedro run", parameters, plan, outputs)
    assert set(state) == {"batches", "distances"} and set(runs) == {"T1", "T2"}


def test_parameters_that_change_no_result_are_ignored():
    recorded = {"phases": [1, 2], "progress_bar": True, "gradient_buffer": {"memory_cap_gb": 1.0}, "seed": 0}
    current = {"phases": [1, 3], "progress_bar": False, "gradient_buffer": {"memory_cap_gb": 30.0}, "seed": 0}
    assert rm.parameter_differences(recorded, current, "gradient_training") == [
        ("gradient_training.phases", [1, 2], [1, 3])]


def test_a_parameter_added_later_matches_runs_recorded_before_it_only_at_its_old_behaviour():
    # training.probe_chunk came after some runs were recorded; 0 (the sequential probe) is what they did.
    before = {"epochs": 3}
    assert rm.parameter_differences(before, {"epochs": 3, "probe_chunk": 0}, "training") == []
    assert rm.parameter_differences(before, {"epochs": 3, "probe_chunk": "auto"}, "training") == [
        ("training.probe_chunk", "(absent)", "auto")]
    assert rm.parameter_differences(before, {"epochs": 3, "other_new_key": 0}, "training") == [
        ("training.other_new_key", "(absent)", 0)]
    assert rm.parameter_differences(rm.ABSENT, 0, "training.probe_chunk") == []
    assert rm.parameter_differences(rm.ABSENT, 8, "training.probe_chunk") == [("training.probe_chunk", "(absent)", 8)]


# --------------------------------------------------------------------------- the lock


LOCK_HOLDER = """
import sys, time
from best_minibatch.services.run_manifest import RunLock, holder_record
RunLock(sys.argv[1]).acquire(holder_record("T1", "kedro run --params sort_batches.batch_size=100"))
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_run_is_refused_while_the_lock_is_held_and_a_killed_holder_blocks_nothing(tmp_path):
    lock_path = tmp_path / "data" / "runs" / "run.lock"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(lock_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(rm.RunLockedError) as refused:
            rm.RunLock(lock_path).acquire(rm.holder_record("T2", "kedro run"))
        message = str(refused.value)
        assert f"PID {holder.pid}" in message and "`kedro run --params sort_batches.batch_size=100`" in message
        assert "a copy of the project" in message and "conf/<env>/catalog.yml" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert json.loads(lock_path.read_text())["pid"] == holder.pid  # the killed run's record stays behind...
    lock = rm.RunLock(lock_path)
    lock.acquire(rm.holder_record("T3", "kedro run"))  # ...and blocks nothing
    lock.release()


# --------------------------------------------------------------------------- whole-project runs


class FailBeforeNode:
    """A hook that fails the run when ``node_name`` is about to run (after earlier nodes saved their outputs)."""

    def __init__(self, node_name: str) -> None:
        self.node_name = node_name

    @hook_impl
    def before_node_run(self, node):
        if node.name == self.node_name:
            raise RuntimeError(f"injected failure before {node.name}")


def run_in(project: Path, pipelines: list[str], params: dict | None = None, nodes: list[str] | None = None,
           namespaces: list[str] | None = None, load_versions: dict | None = None, hooks=()) -> None:
    """One in-process ``kedro run`` in ``project`` with the finished project's quick-run parameters."""
    previous = Path.cwd()
    os.chdir(project)
    try:
        bootstrap_project(project)
        with KedroSession.create(project_path=project, runtime_params={**QUICK_RUN_PARAMS, **(params or {})}) as s:
            for hook in hooks:
                s._hook_manager.register(hook)
            s.run(pipeline_names=pipelines, node_names=nodes, namespaces=namespaces, load_versions=load_versions)
    finally:
        os.chdir(previous)


def manifests_of(project: Path) -> dict[str, dict]:
    root = project / MANIFESTS
    return {p.name: json.loads((p / "run_manifest.json").read_text()) for p in sorted(root.iterdir())}


def last_manifest(project: Path) -> dict:
    return list(manifests_of(project).values())[-1]


def versions(project: Path, path: str) -> list[str]:
    return sorted(p.name for p in (project / path).iterdir())


@pytest.fixture
def finished_copy(finished_project, tmp_path, monkeypatch) -> Path:
    """A copy of the finished quick run (batches of 100), to run more pipelines in."""
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    project = tmp_path / "project"
    shutil.copytree(finished_project, project, ignore=shutil.ignore_patterns("logs"))
    return project


BATCH_SELECTION_FIRST_NODE = ["batch_selection.prepare_policies"]


@pytest.mark.slow
def test_a_failed_run_is_not_the_input_of_the_next_separate_pipeline(finished_copy):
    project = finished_copy
    finished = last_manifest(project)
    assert finished["status"] == "completed"
    with pytest.raises(RuntimeError, match="injected failure"):
        run_in(project, ["distance_analysis"], {"distance_analysis": {"seed": 7}},
               hooks=[FailBeforeNode("evaluate_paper_claims")])
    failed = last_manifest(project)
    assert failed["status"] == "failed" and "injected failure" in failed["error"]
    assert "batch_phase_stats" in failed["outputs"]  # saved before the failure: the newest version on disk
    assert versions(project, "data/08_reporting/analysis/batch_phase_stats.parquet")[-1] == failed["run_id"]

    run_in(project, ["batch_selection"], nodes=BATCH_SELECTION_FIRST_NODE)
    selection = last_manifest(project)
    assert selection["status"] == "completed"
    assert selection["inputs"]["batch_phase_stats"] == finished["run_id"]
    assert selection["base_run"] == finished["run_id"]


@pytest.mark.slow  # trains every ordering again at another batch size (~1 min on the 2-core machine)
def test_an_exploratory_run_with_another_batch_size_is_refused_as_input_of_a_separate_pipeline(finished_copy):
    project = finished_copy
    finished = last_manifest(project)
    run_in(project, ["sort_batches", "gradient_training", "distance_analysis"], {"sort_batches": {"batch_size": 250}})
    exploratory = last_manifest(project)
    assert exploratory["status"] == "completed"
    stats = pd.read_parquet(project / "data/08_reporting/analysis/batch_phase_stats.parquet" / exploratory["run_id"]
                            / "batch_phase_stats.parquet")
    assert stats["batch"].max() + 1 == 20  # 5,000 images in batches of 250

    before = set((project / "data").rglob("*"))
    with pytest.raises(rm.RunInputsError) as refused:
        run_in(project, ["batch_selection"], nodes=BATCH_SELECTION_FIRST_NODE)  # parameters: batches of 100
    message = str(refused.value)
    assert (f"sort_batches.batch_size is 250 in run {exploratory['run_id']} (`kedro run --pipelines=sort_batches,"
            "gradient_training,distance_analysis") in message
    assert "'batch_phase_stats'" in message and "this run's parameters say 100." in message
    assert "--params sort_batches.batch_size=250" in message
    assert f"--load-versions run_manifest:{finished['run_id']}" in message
    assert set((project / "data").rglob("*")) == before, "a refused run writes nothing"

    # Either name the earlier run whose outputs fit...
    run_in(project, ["batch_selection"], nodes=BATCH_SELECTION_FIRST_NODE,
           load_versions={"run_manifest": finished["run_id"]})
    assert last_manifest(project)["inputs"]["batch_phase_stats"] == finished["run_id"]
    # ...(which makes that state the last completed one: batches of 250 are now refused, naming the run that has
    # them)...
    with pytest.raises(rm.RunInputsError, match=f"--load-versions run_manifest:{exploratory['run_id']}"):
        run_in(project, ["batch_selection"], {"sort_batches": {"batch_size": 250}}, nodes=BATCH_SELECTION_FIRST_NODE)
    # ...or run with the exploratory run's parameters, naming that run.
    run_in(project, ["batch_selection"], {"sort_batches": {"batch_size": 250}}, nodes=BATCH_SELECTION_FIRST_NODE,
           load_versions={"run_manifest": exploratory["run_id"]})
    assert last_manifest(project)["inputs"]["batch_phase_stats"] == exploratory["run_id"]


def test_a_node_reads_the_version_its_own_run_saved_not_a_newer_one(finished_copy):
    """Another run saving a newer version meanwhile (simulated: a version dated in the future) is not read."""
    project = finished_copy
    batches = project / "data/05_model_input/intensity/batch_assignments.parquet"
    newest = sorted(batches.iterdir())[-1]
    intruder = batches / "9999-12-31T23.59.59.999Z"
    intruder.mkdir()
    table = pd.read_parquet(newest / "batch_assignments.parquet")
    table = table.head(500).copy()
    table["batch"], table["position"] = table.index // 50, table.index % 50  # 10 batches of 50
    table.to_parquet(intruder / "batch_assignments.parquet")
    run_in(project, ["sort_batches", "gradient_training"], namespaces=["intensity"])
    run = last_manifest(project)
    distances = pd.read_parquet(project / "data/07_model_output/intensity/gradient_distances.parquet"
                                / run["run_id"] / "gradient_distances.parquet")
    assert distances["batch"].nunique() == 50  # its own 50 batches of 100, not the intruder's 10 of 50


def kedro_cli(project: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "MPLBACKEND": "Agg", "COLUMNS": "200"}
    return subprocess.Popen([str(KEDRO), "run", *args], cwd=project, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)


@pytest.mark.slow  # two `kedro run` processes (about 40 s of CPU)
def test_a_concurrent_run_is_refused_cleanly_and_a_killed_run_blocks_nothing(finished_copy):
    project = finished_copy
    # The finished run's quick parameters for the CLI runs; the first trains a new run (another seed).
    quick = {"training": {"phases": [{"epochs": 2, "lr": 0.1}, {"epochs": 2, "lr": 0.01}, {"epochs": 2, "lr": 0.001}]}}
    (project / "conf/local/parameters_quick.yml").write_text(yaml.safe_dump(quick))
    lock = project / "data/runs/run.lock"
    first = kedro_cli(project, "--pipelines=gradient_training", "--namespaces=random",
                      "--params=gradient_training.seeds=[1]")
    second = None
    try:
        deadline = time.monotonic() + 300
        while not (lock.exists() and lock.read_text().strip()):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
            time.sleep(0.5)
        holder = json.loads(lock.read_text())
        assert holder["pid"] == first.pid
        batches_before = versions(project, "data/05_model_input/random/batch_assignments.parquet")
        second = kedro_cli(project, "--pipelines=sort_batches", "--params=sort_batches.batch_size=50")
        output = second.communicate(timeout=300)[0]
        assert first.poll() is None, "the first run ended before the second reached the lock; the test needs it running"
        assert second.returncode == 1, output
        message = output[output.index("Another kedro run"):]
        assert (f"PID {first.pid}" in message and "`kedro run --pipelines=gradient_training --namespaces=random "
                "'--params=gradient_training.seeds=[1]'`" in " ".join(message.split()))  # shell-quoted: [] are special
        assert "Traceback" not in output and "╭" not in output, output  # the message alone, no traceback
        assert versions(project, "data/05_model_input/random/batch_assignments.parquet") == batches_before
    finally:
        stop(first)  # SIGKILL: the first run dies holding the lock
        if second is not None:
            stop(second)
    killed = last_manifest(project)
    assert killed["status"] == "running" and killed["pid"] == first.pid
    run_in(project, ["sort_batches"], {"sort_batches": {"batch_size": 50}})  # not blocked by the dead run's lock
    assert last_manifest(project)["status"] == "completed"
