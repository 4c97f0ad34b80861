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
leaves a half-written file under a real name (leftover temporary files are
removed when the run resumes). Each checkpoint carries a CRC-32 of its own
content and of every gradient file spilled up to its epoch, so a file damaged
after it was written (truncated, overwritten, a flipped bit) is recognised when
the run resumes instead of being read as valid: a damaged checkpoint is set
aside and the run resumes from the newest intact one, recomputing the epochs
after it (see ``gradient_training.GradientProbeRun``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from best_minibatch.data.tensor_io import PARTIAL_SUFFIX, load_tensors, save_tensors_atomically

logger = logging.getLogger(__name__)

#: 2 adds ``content_checksum`` and the gradient files' checksums; format 1 is still read.
CHECKPOINT_FORMAT = 2
_READABLE_FORMATS = (1, 2)
#: A checkpoint found damaged when resuming is renamed with this suffix (kept for inspection).
DAMAGED_SUFFIX = ".damaged"
_CHECKPOINT_NAME = re.compile(r"^epoch=(\d{3,})\.pt$")


class RunConflictError(RuntimeError):
    """A run folder already holds a run with another configuration."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def tensor_checksum(tensor: torch.Tensor) -> int:
    """CRC-32 of a tensor's dtype, shape and bytes (what a spilled gradient file must still hold)."""
    return _feed(0, tensor)


def content_checksum(data: Any) -> int:
    """CRC-32 of nested dicts, lists, tensors and plain values, independent of dict order.

    Lists and tuples count alike, since a load may return either.
    """
    return _feed(0, data)


def _feed(crc: int, data: Any) -> int:
    if isinstance(data, torch.Tensor):
        tensor = data.detach().cpu().contiguous()
        crc = zlib.crc32(f"T{tensor.dtype}{tuple(tensor.shape)}".encode(), crc)
        if tensor.numel():
            crc = zlib.crc32(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), crc)
        return crc
    if isinstance(data, dict):
        crc = zlib.crc32(f"D{len(data)}".encode(), crc)
        for key in sorted(data, key=str):
            crc = _feed(zlib.crc32(f"K{key!s}".encode(), crc), data[key])
        return crc
    if isinstance(data, (list, tuple)):
        crc = zlib.crc32(f"L{len(data)}".encode(), crc)
        for item in data:
            crc = _feed(crc, item)
        return crc
    return zlib.crc32(f"V{data!r}".encode(), crc)


def remove_partial_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of interrupted atomic writes under ``folder``; return them."""
    folder = Path(folder)
    if not folder.exists():
        return []
    leftovers = [p for p in folder.rglob(f"*{PARTIAL_SUFFIX}") if p.is_file()]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


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
        self.damaged: list[tuple[Path, str]] = []

    # ------------------------------------------------------------------ identity

    def check_compatible(self, config: dict[str, Any], digest: str | None,
                         unknown: tuple[str, ...] = ()) -> None:
        """Raise :class:`RunConflictError` if this run's folders hold another configuration's run.

        ``unknown``: keys of ``config`` not known yet (``digest`` is then ``None``);
        only the other keys are compared. Writes nothing; call :meth:`claim` once
        every other check has passed.
        """
        if self.manifest_path.exists():
            try:
                manifest = json.loads(self.manifest_path.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise RunConflictError(
                    f"The run manifest '{self.manifest_path}' cannot be read ({error}). Delete the "
                    f"folder '{self.folder}' to start the run afresh, or choose another run_name."
                ) from error
            config = json.loads(json.dumps(config, default=str))  # compare as the manifest stores it
            differing = sorted(
                key for key in set(manifest.get("config", {})) | set(config)
                if key not in unknown and manifest.get("config", {}).get(key) != config.get(key)
            )
            if differing or (digest is not None and manifest.get("config_hash") != digest):
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
        state = {**state, "format": CHECKPOINT_FORMAT, "config_hash": digest, "epoch": epoch}
        state["content_checksum"] = content_checksum(state)
        save_tensors_atomically(state, path)
        for old in self.checkpoint_epochs()[: -self.keep_checkpoints]:
            self.checkpoint_path(old).unlink(missing_ok=True)
        return path

    def remove_partial_files(self) -> list[Path]:
        """Delete leftovers of writes a killed run left behind: temporary files and scratch buffers."""
        leftovers = remove_partial_files(self.folder)
        if self.gradients_dir is not None:
            leftovers += remove_partial_files(self.gradients_dir)
        if self.scratch_dir.exists():
            for path in self.scratch_dir.glob("epoch-gradients-*.scratch"):
                path.unlink(missing_ok=True)
                leftovers.append(path)
        if leftovers:
            logger.info("%s: removed %d unfinished file(s) of an interrupted run (e.g. %s)",
                        self.ordering, len(leftovers), leftovers[0])
        return leftovers

    def read_checkpoint(self, epoch: int, digest: str) -> dict[str, Any]:
        """The checkpoint of ``epoch``, checked.

        Raises :class:`CheckpointError` if it belongs to another run, and
        :class:`DamagedCheckpointError` if it cannot be read or its content does not
        match its checksum.
        """
        path = self.checkpoint_path(epoch)
        try:
            state = load_tensors(path)
        except Exception as error:
            raise DamagedCheckpointError(path, f"it cannot be read ({error})") from error
        if not isinstance(state, dict):
            raise DamagedCheckpointError(path, "it does not hold a dict")
        problems = []
        if state.get("format") not in _READABLE_FORMATS:
            problems.append(f"format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
        if state.get("config_hash") != digest:
            problems.append("it belongs to another configuration")
        if state.get("epoch") != epoch:
            problems.append(f"it holds epoch {state.get('epoch')!r}, its name says {epoch}")
        if problems:
            raise CheckpointError(
                f"Checkpoint '{path}' does not belong to this run ({'; '.join(problems)}). Delete it, or "
                "delete the run folder to start over."
            )
        if state["format"] >= 2:
            recorded = state.pop("content_checksum", None)
            if recorded != content_checksum(state):
                raise DamagedCheckpointError(path, "its content does not match its checksum (the file was "
                                                   "damaged after it was written)")
        return state

    def intact_checkpoints(self, digest: str) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(epoch, state)`` of each readable checkpoint, newest first.

        Damaged ones are skipped with a warning and listed in :attr:`damaged` as
        ``(path, reason)``; a checkpoint of another run raises :class:`CheckpointError`.
        """
        self.damaged: list[tuple[Path, str]] = []
        for epoch in reversed(self.checkpoint_epochs()):
            try:
                yield epoch, self.read_checkpoint(epoch, digest)
            except DamagedCheckpointError as error:
                logger.warning("%s", error)
                self.damaged.append((error.path, error.reason))

    def set_aside_checkpoints_after(self, epoch: int) -> list[Path]:
        """Rename every checkpoint newer than ``epoch`` to ``*.damaged``: the run goes on from ``epoch``."""
        moved = []
        for newer in self.checkpoint_epochs():
            if newer > epoch:
                path = self.checkpoint_path(newer)
                target = path.with_name(path.name + DAMAGED_SUFFIX)
                os.replace(path, target)
                moved.append(target)
        return moved


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file that cannot be read or whose content fails its checksum."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"Checkpoint '{path}' is damaged: {reason}. Delete it to resume from the epoch "
                         "before, or delete the run folder to start over.")
