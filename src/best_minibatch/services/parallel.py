"""Independent pieces of one node's work as tasks of the Dask cluster the node runs on, or one after another.

Knows nothing of Kedro. Two nodes of the project hold many independent trainings:
``gradient_training``'s one node per ordering (one training per seed) and
``batch_selection``'s ``run_selection_experiment`` (one run per policy and seed).
They call :func:`map_tasks`, which

* under the project's Dask runner (``best_minibatch.kedro_glue.runner.DaskRunner``, which runs
  the node inside :func:`handing_out`) submits one task per item to the same
  cluster, each asking for the worker resources of the node's tags (a GPU), and
  waits for them outside the worker's thread pool (``worker_client`` secedes), so
  the waiting node holds neither a thread nor a GPU;
* anywhere else (the sequential runner, a script, a test) calls the function on
  each item in turn, in this process.

Either way the results come back in the order of the items, so what the node does
with them does not depend on where they ran. A function handed out must need
nothing but its item (it is pickled to another process) and must be a pure
function of it; the trainings are (each seeds itself).

:func:`hands_out_work` marks a node function that waits for tasks it hands out:
the runner gives such a node's own task no resources (a seceded Dask task keeps
the resources it holds, so a waiting node holding the one GPU would block the
trainings it waits for). :func:`exclusive` keeps a second task off a run folder
while one trains in it (a task whose worker died may be run again while the first
attempt's thread is still running elsewhere).
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

#: The node tag that says "the trainings of this node need a GPU each" (conf/base/dask.yml maps it to resources).
GPU_TAG = "gpu"
#: Attribute set on a node function by :func:`hands_out_work`.
HANDS_OUT = "hands_out_work"

#: How often one handed-out task that the scheduler dropped (its worker, or the worker holding its item, died) is
#: handed out again before the node fails; each time only that task reruns.
LOST_TASK_RESUBMISSIONS = 3

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class HandOut:
    """How the node running now hands its work out: the resources each of its tasks asks for."""

    resources: Mapping[str, float] = field(default_factory=dict)


_HAND_OUT: contextvars.ContextVar[HandOut | None] = contextvars.ContextVar("best_minibatch_hand_out", default=None)


def hands_out_work(func: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``func`` (a node function) as one that waits for the tasks it hands out through :func:`map_tasks`."""
    setattr(func, HANDS_OUT, True)
    return func


def marked_hands_out(func: Callable[..., Any]) -> bool:
    """Whether ``func`` (or the function a ``functools.partial`` wraps) carries :func:`hands_out_work`'s mark."""
    return bool(getattr(func, HANDS_OUT, False) or getattr(getattr(func, "func", None), HANDS_OUT, False))


@contextlib.contextmanager
def handing_out(resources: Mapping[str, float] | None = None) -> Iterator[None]:
    """While the block runs (in this thread), :func:`map_tasks` submits to the Dask cluster of this worker."""
    token = _HAND_OUT.set(HandOut(dict(resources or {})))
    try:
        yield
    finally:
        _HAND_OUT.reset(token)


def is_handing_out() -> bool:
    return _HAND_OUT.get() is not None


_NO_SHARED = object()


def map_tasks(fn: Callable[..., R], items: Sequence[T], *, label: str,
              on_result: Callable[[int, R], None] | None = None, shared: Any = _NO_SHARED) -> list[R]:
    """``[fn(item) for item in items]``: as Dask tasks under :func:`handing_out`, else here, one after another.

    ``on_result(index, result)`` is called as each result arrives (in completion order
    on a cluster, in item order here). ``label`` names the tasks on the cluster's
    dashboard and in the log. A task the scheduler drops (cancelled: a worker died with
    its scattered item) is handed out again from this process's copy of the item, up to
    ``LOST_TASK_RESUBMISSIONS`` times; a task killed by a worker's death is rerun by Dask
    itself. The first task that fails otherwise cancels the others and its error is
    raised here. With ``shared``, every call is ``fn(item, shared)``: what all items need
    (the training images) is shipped to each worker once, not once per item (items are
    scattered one by one, so a large object inside every item would be copied as many
    times as there are items).
    """
    hand_out = _HAND_OUT.get()
    extra = () if shared is _NO_SHARED else (shared,)
    if hand_out is None or len(items) == 0:
        results = []
        for index, item in enumerate(items):
            results.append(fn(item, *extra))
            if on_result is not None:
                on_result(index, results[-1])
        return results
    from distributed import as_completed, worker_client

    logger.info("%s: %d task(s) handed to the Dask cluster%s", label, len(items),
                f" (each asks for {dict(hand_out.resources)})" if hand_out.resources else "")
    # worker_client secedes this task from the worker's thread pool while it waits: the worker
    # runs other tasks (the ones handed out among them) in its place.
    with worker_client() as client:
        if extra:  # once to every worker (the tasks may run on any of them)
            extra = (client.scatter(shared, broadcast=True, hash=False),)

        def submit(index: int) -> Any:
            # Scattered one by one: an item (training data) is shipped to the worker that runs it only.
            return client.submit(fn, client.scatter(items[index], hash=False), *extra,
                                 key=f"{label}-{index}-{os.urandom(4).hex()}",
                                 resources=dict(hand_out.resources) or None, pure=False)

        futures = {index: submit(index) for index in range(len(items))}
        index_of = {future.key: index for index, future in futures.items()}
        resubmitted = dict.fromkeys(futures, 0)
        results: list[Any] = [None] * len(items)
        try:
            running = as_completed(list(futures.values()), loop=client.loop)
            for future in running:
                index = index_of[future.key]
                if future.status == "cancelled" and resubmitted[index] < LOST_TASK_RESUBMISSIONS:
                    # The scheduler dropped the task: its scattered item died with a worker ("lost
                    # dependencies"). This process still holds the item: hand it out again, alone.
                    resubmitted[index] += 1
                    logger.warning("%s: task %d of %d was lost with a Dask worker (%s); handing it out again "
                                   "(%d of %d times)", label, index + 1, len(items), _cancel_reason(future),
                                   resubmitted[index], LOST_TASK_RESUBMISSIONS)
                    futures[index] = submit(index)
                    index_of[futures[index].key] = index
                    running.add(futures[index])
                    continue
                results[index] = future.result()  # raises the task's error
                if on_result is not None:
                    on_result(index, results[index])
        except BaseException:
            client.cancel(list(futures.values()))
            raise
    return results


def _cancel_reason(future: Any) -> str:
    try:
        future.result(timeout=0)
    except BaseException as error:  # FutureCancelledError names the key and the scheduler's reason
        return str(error) or type(error).__name__
    return "cancelled"


# --------------------------------------------------------------------------- one task per run folder

_FOLDER_LOCKS: dict[str, threading.Lock] = {}
_FOLDER_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def exclusive(folder: Path | str) -> Iterator[None]:
    """Hold ``folder``'s lock (a file ``.lock`` in it) while the block runs; wait while another holds it.

    An operating-system lock (``flock``), so it holds across processes and is
    released when a killed process's file closes; a lock per folder within the
    process as well, because two threads of one worker share the process.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    with _FOLDER_LOCKS_GUARD:
        local = _FOLDER_LOCKS.setdefault(key, threading.Lock())
    with local, open(folder / ".lock", "a+") as handle:
        if not _try_lock(handle):
            logger.info("Waiting for another task that trains in %s to finish", folder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _try_lock(handle: Any) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
