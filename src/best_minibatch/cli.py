"""Project CLI: ``kedro run`` as Kedro's own, but a refusal prints its message, not a traceback.

Kedro loads the ``cli`` group of this module and its commands override the built-in
ones. ``run`` takes every option of Kedro's ``run`` and adds ``--verbose``. When the
run stops on a *user error* -- a problem with the configuration, the data or the
command line that its message explains, with the fix -- the message is printed alone,
last, on stderr, and the full traceback goes to ``logs/errors.log`` in the project;
``--verbose`` prints the traceback instead, as Kedro does. Anything else (a bug) keeps
Kedro's full traceback. A user error is

* any exception of this project's own classes (``best_minibatch.*``: ``RunCheckError``,
  ``RunInputsError``, ``RunLockedError``, ``DatasetInputError``, ...), whenever raised:
  each of them names the problem and the fix; or
* an exception Kedro itself raised before the first node ran (an unknown pipeline or
  namespace, a malformed ``--params``, missing configuration).

See docs/reliability.md ("Messages").
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import click
from kedro.framework.cli.project import run as kedro_run

PROJECT_PACKAGE = __name__.split(".")[0]
ERROR_LOG = Path("logs") / "errors.log"


def put_environment_programs_on_path() -> None:
    """Put this interpreter's ``bin`` folder first on ``PATH``, as activating the virtual environment would.

    Kedro imports this module for every ``kedro`` command of the project. Plugins start programs of
    the environment by name: ``kedro mlflow ui`` runs ``mlflow`` from ``PATH``, so
    ``.venv/bin/kedro mlflow ui`` without an activated venv failed with ``FileNotFoundError: 'mlflow'``.
    """
    bin_dir = Path(sys.executable).parent
    entries = os.environ.get("PATH", "").split(os.pathsep)
    if (bin_dir / "mlflow").exists() and str(bin_dir) not in entries:
        os.environ["PATH"] = os.pathsep.join([str(bin_dir), *filter(None, entries)])


put_environment_programs_on_path()


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is a refusal whose message says what to do (see the module docstring)."""
    if any(cls.__module__.split(".")[0] == PROJECT_PACKAGE for cls in type(error).__mro__):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    if not frames or any("/kedro/runner/" in frame.filename.replace("\\", "/") for frame in frames):
        return False  # raised while nodes ran: not a refusal of the command
    return "/kedro/" in frames[-1].filename.replace("\\", "/")


def write_error_log(error: BaseException, project_path: Path, command: list[str]) -> Path:
    """Append the full traceback of ``error`` to the project's error log; returns the log's path."""
    log = project_path / ERROR_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')}  {' '.join(command)}\n")
        handle.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
        handle.write("\n")
    return log


def _once_each(values: Any) -> Any:
    """``values`` (a list or tuple of names) with each name once, in order; anything else as it is."""
    if isinstance(values, (list, tuple)) and len(set(values)) < len(values):
        return type(values)(dict.fromkeys(values))
    return values


def _run(verbose: bool, **options: Any) -> Any:
    # `--namespaces=edges,edges` meant edges once; Kedro added its nodes twice and refused with a message
    # about node names. A name given twice on the command line is the same as given once.
    for key in ("namespaces", "pipelines", "node_names", "tags"):
        if key in options:
            options[key] = _once_each(options[key])
    try:
        return kedro_run.callback(**options)
    except Exception as error:
        if verbose or not is_user_error(error):
            raise
        ctx = click.get_current_context()
        metadata = ctx.find_root().obj  # Kedro passes the project's metadata as the context object
        project_path = Path(getattr(metadata, "project_path", None) or Path.cwd())
        command = ["kedro", *sys.argv[1:]]
        try:
            log = write_error_log(error, project_path, command)
            where = f"The full traceback is in {log}; run again with --verbose to print it."
        except OSError:
            where = "Run again with --verbose to print the full traceback."
        click.secho(f"\n{error}", fg="red", err=True)
        click.echo(f"({type(error).__name__}. {where})", err=True)
        ctx.exit(1)


@click.group(name=PROJECT_PACKAGE)
def cli() -> None:
    """Project-specific commands of best_minibatch."""


run = click.Command(
    name="run",
    callback=_run,
    params=[
        *kedro_run.params,
        click.Option(["--verbose", "-v"], is_flag=True, default=False,
                     help="On an error of the configuration or the data, print the full traceback "
                          "(by default only the message; the traceback goes to logs/errors.log)."),
    ],
    help=kedro_run.help,
    short_help=kedro_run.short_help,
    context_settings=kedro_run.context_settings,
)
cli.add_command(run)
