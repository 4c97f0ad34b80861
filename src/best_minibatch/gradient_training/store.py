"""One run's folders: its identity, its checkpoints, its spilled gradients, the resume decision.

Knows nothing of Kedro. A run is named either explicitly or by a short hash of
everything that determines its results (:func:`config_hash`), and lives in
``<checkpoint_root>/<run_name>/<ordering>/``:

* ``run.json``: the run's configuration and its hash, written once when the run
  starts; a later start with a different configuration under the same name is
  refused before any work;
* ``epoch=EEE.pt``: a checkpoint after every completed epoch (a dict of tensors
  in the project's tensor format, written atomically), the newest few kept;
* ``scratch/``: temporary gradient files of the epoch in progress.

Its spilled gradients go to ``<gradients_root>/<run_name>/<ordering>/epoch=EEE/batch=KKKK.pt``
(:class:`GradientFiles`, the one writer of those files under every runner; the
catalog's partitioned dataset ``{ordering}.batch_gradients`` declares and reads them).

Every file is written under a temporary name and renamed, so a killed run never
leaves a half-written file under a real name (leftover temporary files are
removed when the run resumes). Each checkpoint carries a CRC-32 of its own
content and of every gradient file spilled up to its epoch, so a file damaged
after it was written (truncated, overwritten, a flipped bit) is recognised when
the run resumes instead of being read as valid: a damaged checkpoint is set
aside and the run resumes from the newest intact one, recomputing the epochs
after it (:meth:`RunStore.resume_point`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from best_minibatch.data.tensor_io import (
    PARTIAL_SUFFIX,
    load_tensors,
    save_tensors_atomically,
    write_text_atomically,
)
from best_minibatch.gradient_training.tables import Progress

logger = logging.getLogger(__name__)

#: The one checkpoint format read: a content checksum, the gradient files' checksums, and every column of
#: :class:`~best_minibatch.gradient_training.tables.Progress`. Checkpoints of the project's earlier formats
#: (before 2026-12) are refused with the fix (docs/architecture.md: no compatibility code for old files).
CHECKPOINT_FORMAT = 2
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


class GradientFiles:
    """A run's spilled gradients, ``<folder>/epoch=EEE/batch=KKKK.pt``: one flat tensor each, in the spill dtype.

    The one writer of these files under every runner (the sequential runner and the
    Dask workers alike); ``{ordering}.batch_gradients`` in the catalog is the
    partitioned dataset over the same folder that declares and reads them
    (docs/gradient_spill_format.md).
    """

    def __init__(self, folder: str | os.PathLike, num_params: int, dtype: torch.dtype) -> None:
        self.folder = Path(folder)
        self.num_params, self.dtype = num_params, dtype

    def path(self, epoch: int, batch: int) -> Path:
        return self.folder / f"epoch={epoch:03d}" / f"batch={batch:04d}.pt"

    def write(self, epoch: int, batch: int, gradient: torch.Tensor) -> int:
        """Write one kept gradient atomically; return its CRC-32 (the next checkpoint records it)."""
        save_tensors_atomically(gradient, self.path(epoch, batch))
        return tensor_checksum(gradient)

    def problem(self, path: Path, expected_checksum: int | None) -> str | None:
        """Why a spilled gradient file cannot be trusted (``None``: it holds what was spilled)."""
        if not path.exists():
            return "missing"
        try:
            tensor = load_tensors(path)
        except Exception as error:  # load_tensors names truncated and corrupt files
            return f"unreadable: {error}"
        if not isinstance(tensor, torch.Tensor) or tensor.shape != (self.num_params,) or tensor.dtype != self.dtype:
            shape = (f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor)
                     else type(tensor).__name__)
            return f"holds {shape}, expected {self.dtype} ({self.num_params},)"
        if expected_checksum is not None and tensor_checksum(tensor) != expected_checksum:
            return "its values differ from the gradient that was spilled (checksum mismatch)"
        return None

    def damaged(self, epochs: Iterable[int], num_batches: int, checksums: dict[str, Any],
                verified: dict[tuple[Path, int | None], str | None]) -> list[tuple[Path, str]]:
        """The files of ``epochs`` that are missing or differ from what was spilled (``checksums`` by
        ``"EEE"``, as a checkpoint records them; ``verified`` caches answers across checkpoints)."""
        bad = []
        for epoch in epochs:
            recorded = checksums.get(f"{epoch:03d}")
            for batch in range(num_batches):
                path = self.path(epoch, batch)
                key = (path, int(recorded[batch]) if recorded is not None else None)
                if key not in verified:
                    verified[key] = self.problem(*key)
                if verified[key] is not None:
                    bad.append((path, verified[key]))
        return bad


class RunStore:
    """The folder of one run of one ordering, and the gradients folder it spills into.

    ``gradients_dir`` is the run's spilled-gradient folder
    (``<gradients_root>/<run_name>/<ordering>``, :class:`GradientFiles`): a folder that
    holds gradients but no run manifest is refused, and its leftovers are cleaned on resume.
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
        if state.get("format") != CHECKPOINT_FORMAT:
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
        recorded = state.pop("content_checksum", None)
        if recorded != content_checksum(state):
            raise DamagedCheckpointError(path, "its content does not match its checksum (the file was "
                                               "damaged after it was written)")
        if missing := Progress.missing_keys(state):
            raise CheckpointError(
                f"Checkpoint '{path}' was written by an earlier version of the project (it lacks "
                f"{', '.join(missing[:4])}). Delete the run folder '{self.folder}' and its gradients to train "
                "the run again, or finish it with the version that started it."
            )
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

    # ------------------------------------------------------------------ resume

    def resume_point(self, digest: str, gradients: GradientFiles, kept_epochs: Iterable[int], num_batches: int,
                     label: str) -> tuple[int, dict[str, Any] | None]:
        """``(epochs done, their checkpoint's state)`` to resume from: ``(0, None)`` for a fresh start.

        A checkpoint is usable when it is intact (readable, content matching its checksum)
        and every gradient file it records (the kept epochs up to it) exists and matches
        the checksum recorded when it was computed. Otherwise the run falls back to an
        older usable checkpoint and recomputes the epochs after it (which rewrites their
        files); if none is left, it stops naming the damaged files.
        """
        self.remove_partial_files()
        newest, chosen, bad_files, verified = None, None, [], {}
        for epoch, state in self.intact_checkpoints(digest):
            newest = epoch if newest is None else newest
            bad = gradients.damaged([e for e in sorted(kept_epochs) if e <= epoch], num_batches,
                                    state["gradient_checksums"], verified)
            if not bad:
                chosen = epoch, state
                break
            bad_files.extend(b for b in bad if b not in bad_files)
        damaged = [f"checkpoint '{path}' ({reason})" for path, reason in self.damaged]
        damaged += [f"spilled gradient '{path}' ({reason})" for path, reason in bad_files]
        listed = "; ".join(damaged[:3]) + (f"; and {len(damaged) - 3} more" if len(damaged) > 3 else "")
        if chosen is None:
            if not damaged:
                return 0, None
            raise CheckpointError(
                f"Run '{self.run_name}' of '{self.ordering}' cannot resume: {listed}. No older intact checkpoint is "
                f"left to recompute from. Restore the file(s), or delete '{self.folder}' and "
                f"'{gradients.folder}' to start the run over."
            )
        done, state = chosen
        if damaged:
            self.set_aside_checkpoints_after(done)
            logger.warning("%s: %s. Resuming from the intact checkpoint of epoch %d and recomputing epochs %d..%d.",
                           label, listed, done, done + 1, max(newest or done, done + 1))
        return done, state


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file that cannot be read or whose content fails its checksum."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"Checkpoint '{path}' is damaged: {reason}. Delete it to resume from the epoch "
                         "before, or delete the run folder to start over.")
