"""One training run's folder: its identity, its checkpoints, its scratch space.

Knows nothing of Kedro. A run is named either explicitly or by a short hash of
everything that determines its results (:func:`config_hash`), and lives in
``<checkpoint_root>/<run_name>/<ordering>/``:

* ``run.json``: the run's configuration and its hash, written once when the run
  starts; a later start with a different configuration under the same name is
  refused before any work;
* ``epoch=EEE.pt``: a checkpoint after every completed epoch (a dict of tensors
  in the project's tensor format, written atomically), the newest few kept;
* ``scratch/``: temporary gradient files of the epoch in progress.

Every file is written under a temporary name and renamed, so a killed run never
leaves a half-written file under a real name; a checkpoint that still cannot be
read (a damaged disk) raises an error naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from best_minibatch.datasets import load_tensors, save_tensors_atomically

CHECKPOINT_FORMAT = 1
_CHECKPOINT_NAME = re.compile(r"^epoch=(\d{3,})\.pt$")


class RunConflictError(RuntimeError):
    """A run folder already holds a run with another configuration."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def config_hash(config: dict[str, Any]) -> str:
    """A stable hex digest of a JSON-serialisable configuration (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def write_text_atomically(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class RunStore:
    """The folder of one run of one ordering, and the gradients folder it spills into.

    ``gradients_dir`` is the run's spilled-gradient folder
    (``<gradients_root>/<run_name>/<ordering>``); it is only inspected here, never
    written (gradients are written through the Kedro catalog).
    """

    def __init__(self, checkpoint_root: str | os.PathLike, run_name: str, ordering: str,
                 gradients_dir: str | os.PathLike | None = None, keep_checkpoints: int = 2) -> None:
        if keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be at least 1, got {keep_checkpoints}.")
        self.run_name = run_name
        self.ordering = ordering
        self.folder = Path(checkpoint_root) / run_name / ordering
        self.manifest_path = self.folder / "run.json"
        self.scratch_dir = self.folder / "scratch"
        self.gradients_dir = Path(gradients_dir) if gradients_dir is not None else None
        self.keep_checkpoints = keep_checkpoints

    # ------------------------------------------------------------------ identity

    def check_compatible(self, config: dict[str, Any], digest: str) -> None:
        """Raise :class:`RunConflictError` if this run's folders hold another configuration's run.

        Writes nothing; call :meth:`claim` once every other check has passed.
        """
        if self.manifest_path.exists():
            try:
                manifest = json.loads(self.manifest_path.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise RunConflictError(
                    f"The run manifest '{self.manifest_path}' cannot be read ({error}). Delete the "
                    f"folder '{self.folder}' to start the run afresh, or choose another run_name."
                ) from error
            if manifest.get("config_hash") != digest:
                differing = sorted(
                    key for key in set(manifest.get("config", {})) | set(config)
                    if manifest.get("config", {}).get(key) != config.get(key)
                )
                raise RunConflictError(
                    f"Run '{self.run_name}' of ordering '{self.ordering}' in '{self.folder}' was started "
                    f"with another configuration (differs in: {', '.join(differing) or 'data or code version'}). "
                    "Choose another gradient_training.run_name (or 'auto', which names runs by their "
                    "configuration), or delete that folder and the run's gradients to start over."
                )
            return
        if self.gradients_dir is not None and self.gradients_dir.exists() and any(self.gradients_dir.rglob("*.pt")):
            raise RunConflictError(
                f"'{self.gradients_dir}' already holds spilled gradients, but no run manifest exists at "
                f"'{self.manifest_path}', so they may come from another configuration. Choose another "
                "gradient_training.run_name (or 'auto'), or delete that gradients folder."
            )

    def claim(self, config: dict[str, Any], digest: str) -> None:
        """Write the run manifest (once; an existing matching one is kept)."""
        self.check_compatible(config, digest)
        if not self.manifest_path.exists():
            manifest = {"run_name": self.run_name, "ordering": self.ordering,
                        "config_hash": digest, "config": config}
            write_text_atomically(json.dumps(manifest, indent=2, sort_keys=True, default=str), self.manifest_path)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_path(self, epoch: int) -> Path:
        return self.folder / f"epoch={epoch:03d}.pt"

    def checkpoint_epochs(self) -> list[int]:
        if not self.folder.exists():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _CHECKPOINT_NAME.match(p.name)))

    def save_checkpoint(self, epoch: int, state: dict[str, Any], digest: str) -> Path:
        """Write the checkpoint of a completed epoch atomically, then drop all but the newest few."""
        path = self.checkpoint_path(epoch)
        save_tensors_atomically({**state, "format": CHECKPOINT_FORMAT, "config_hash": digest, "epoch": epoch}, path)
        for old in self.checkpoint_epochs()[: -self.keep_checkpoints]:
            self.checkpoint_path(old).unlink(missing_ok=True)
        return path

    def load_latest_checkpoint(self, digest: str) -> dict[str, Any] | None:
        """The newest checkpoint of this run, validated against ``digest``; ``None`` if there is none."""
        epochs = self.checkpoint_epochs()
        if not epochs:
            return None
        path = self.checkpoint_path(epochs[-1])
        try:
            state = load_tensors(path)
        except Exception as error:
            raise CheckpointError(
                f"Checkpoint '{path}' cannot be read ({error}). Delete it to resume from the epoch "
                "before, or delete the run folder to start over."
            ) from error
        problems = []
        if not isinstance(state, dict):
            problems.append("it is not a dict")
        else:
            if state.get("format") != CHECKPOINT_FORMAT:
                problems.append(f"format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
            if state.get("config_hash") != digest:
                problems.append("it belongs to another configuration")
            if state.get("epoch") != epochs[-1]:
                problems.append(f"it holds epoch {state.get('epoch')!r}, its name says {epochs[-1]}")
        if problems:
            raise CheckpointError(
                f"Checkpoint '{path}' does not belong to this run ({'; '.join(problems)}). Delete it, or "
                "delete the run folder to start over."
            )
        return state
