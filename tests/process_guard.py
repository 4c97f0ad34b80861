"""A pytest plugin: the test run ends with no process it started still running.

A test that starts a server (kedro viz, http.server, a `kedro run` in a subprocess) must
stop it, and every process that server started, in its teardown. This plugin checks that
they did: at the end of the session it lists every descendant of the test process that is
still alive, kills it, and fails the session naming each one.

On Linux the test process makes itself a *child subreaper* first, so that a grandchild
whose parent was stopped (orphaned: kedro viz's server process once its `kedro` parent
was terminated) is re-parented to the test process instead of to init, and the check
sees it. Processes that Python's ``multiprocessing`` keeps for the whole interpreter (the
fork server, the resource tracker) end with it and are left alone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

import psutil
import pytest

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Linux: orphaned descendants are re-parented to this process. Returns whether it worked."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def interpreter_helpers() -> set[int]:
    """PIDs of multiprocessing's fork server and resource tracker (they end with the interpreter)."""
    pids = set()
    try:
        from multiprocessing import forkserver, resource_tracker

        for pid in (getattr(forkserver._forkserver, "_forkserver_pid", None),
                    getattr(resource_tracker._resource_tracker, "_pid", None)):
            if pid:
                pids.add(pid)
    except (ImportError, AttributeError):
        pass
    return pids


def surviving_children() -> list[psutil.Process]:
    """Descendants of this process still running (zombies are dead: reaped, not reported)."""
    helpers = interpreter_helpers()
    alive = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                if child.ppid() == os.getpid():
                    os.waitpid(child.pid, os.WNOHANG)
                continue
            if child.pid in helpers or child.ppid() in helpers:
                continue
            alive.append(child)
        except (psutil.NoSuchProcess, ChildProcessError):
            continue
    return alive


def stop_processes(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)


def describe(process: psutil.Process) -> str:
    try:
        command = " ".join(process.cmdline())[:200] or process.name()
        return f"PID {process.pid}: {command}"
    except psutil.Error:
        return f"PID {process.pid}"


def pytest_configure(config: pytest.Config) -> None:
    become_subreaper()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    survivors = surviving_children()
    if not survivors:
        return
    lines = [describe(p) for p in survivors]
    stop_processes(survivors)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = ("Processes started by the tests were still running at the end of the session (killed now); "
               "stop every process a test starts in its teardown:\n  " + "\n  ".join(lines))
    if reporter is not None:
        reporter.write_line(message, red=True, bold=True)
    else:
        sys.stderr.write(message + "\n")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
