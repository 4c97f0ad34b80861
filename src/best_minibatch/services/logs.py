"""The run's log file: every record at INFO and above, including what the terminal leaves out.

Knows nothing of Kedro. :func:`install` (called per session by ``hooks.RunLog``: Kedro's
``logging.yml`` admits no project classes) adds :class:`RunLogFile`
(``<project>/logs/info.log``) to the root logger and keeps the terminal for what a
person follows: :class:`TerminalFilter` on the terminal's handlers leaves out Kedro's
per-dataset "Loading data from ..." / "Saving data to ..." lines and its per-node
"Running node" / "Completed node" lines and each training's per-epoch lines (below
WARNING), which the file keeps; a training's start and end stay.

The folder is made when the first record arrives (a plain ``FileHandler`` fails
with "--- Logging error ---" when ``logs/`` is missing, as in a fresh clone). In a
Dask worker the handler writes nothing: the worker's records are forwarded to the
process that runs ``kedro`` (``cluster.Cluster.forward_logs``), which writes them
once.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
from pathlib import Path

#: Set in a Dask worker's environment by ``cluster.Cluster`` (its workers forward their records instead).
IN_WORKER_VARIABLE = "BEST_MINIBATCH_DASK_WORKER"
#: Columns of the terminal handler when its output is not a terminal (a pipe, a file, CI): rich's default of 80
#: leaves a message column of about 30 characters and wraps every record over 4-8 lines.
PIPED_WIDTH = 160


class RunLogFile(logging.handlers.RotatingFileHandler):
    """A rotating log file whose folder is made on the first record; silent in a Dask worker."""

    def __init__(self, filename: str, maxBytes: int = 10 * 2**20, backupCount: int = 5,  # noqa: N803 (logging's names)
                 encoding: str = "utf-8") -> None:
        super().__init__(filename, maxBytes=maxBytes, backupCount=backupCount, encoding=encoding, delay=True)

    def emit(self, record: logging.LogRecord) -> None:
        if os.environ.get(IN_WORKER_VARIABLE):
            return
        if self.stream is None:
            try:
                Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
            except OSError:
                return  # a read-only folder: the terminal still shows what matters
        super().emit(record)


class TerminalFilter(logging.Filter):
    """Leaves Kedro's per-dataset load and save lines (``kedro.io.data_catalog``) and its per-node "Running node" /
    "Completed node" / "Completed n out of N tasks" lines (``kedro.runner``, ``kedro.pipeline.node``) below WARNING
    out of the terminal: the project's own lines name every stage and training."""

    QUIET = ("kedro.io.data_catalog", "kedro.runner", "kedro.pipeline.node",
             "best_minibatch.gradient_training.run.epochs")
    #: The runners' per-node messages, whichever runner logs them (the project's Dask runner too).
    NODE_MESSAGES = ("Running node: %s", "Completed node: %s", "Completed %d out of %d tasks")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not (record.name.startswith(self.QUIET)
                                                         or record.msg in self.NODE_MESSAGES)


def install(project_path: str | os.PathLike, terminal_handlers: tuple[str, ...] = ("RichHandler", "StreamHandler")
            ) -> Path:
    """Add the run's log file to the root logger and the terminal filter to its terminal handlers; once each.

    Returns the log file's path (``<project_path>/logs/info.log``).
    """
    path = Path(project_path).resolve() / "logs" / "info.log"
    root = logging.getLogger()
    for handler in root.handlers:
        console = getattr(handler, "console", None)  # rich's handler: wider when piped (a terminal keeps its own)
        if console is not None and not console.is_terminal and console.width < PIPED_WIDTH:
            console.width = PIPED_WIDTH
        if type(handler).__name__ in terminal_handlers and not isinstance(handler, logging.FileHandler) and not any(
                isinstance(f, TerminalFilter) for f in handler.filters):
            handler.addFilter(TerminalFilter())
    if not any(isinstance(h, RunLogFile) and h.baseFilename == str(path) for h in root.handlers):
        for old in [h for h in root.handlers if isinstance(h, RunLogFile)]:  # another project's, in this process
            root.removeHandler(old)
            old.close()
        handler = RunLogFile(str(path))
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
        root.addHandler(handler)
    return path
