"""A gradient-training run in its own process, with faults injected on request (tests only).

:func:`run_in_child` is the target of a child process (``tests/test_reliability.py``
starts it from a fork server that has imported torch once, so a child starts in a
fraction of a second); ``python tests/fault_harness.py WORK OUT DATA [GRADIENTS_DIR]``
does the same from a shell, faults taken from the environment. It trains the tiny
model of ``tests/test_reliability.py`` with the training core and spills each kept
gradient the way the Kedro catalog does (``save_tensors_atomically`` per
partition), then writes the distance table, history and model to ``OUT``.

Faults, each chosen by one setting (an environment variable on the command line):

* ``FAULT_KILL_WRITE=<path suffix>``: when a file whose path ends with the suffix is
  about to be renamed into place, cut its temporary file to half its length and
  kill this process with SIGKILL: a kill in the middle of writing that file.
* ``FAULT_FILL_DISK_AT=<epoch>:<batch>``: just before that gradient is saved, fill
  the gradients' file system with a file ``hog`` (a real ENOSPC follows).
* ``FAULT_ENOSPC_AT=<path suffix>``: the write of that file fails with ENOSPC
  (an injected error, for machines where no small file system can be mounted).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

import torch
from torch import nn

from best_minibatch.data.tensor_io import save_tensors_atomically
from best_minibatch.gradient_training import GradientProbeRun, TrainingConfig, TrainingData

EPOCHS = 4
KEEP_CHECKPOINTS = 2


def tiny_model() -> nn.Module:
    """286 parameters, BatchNorm included; float32 like the real models."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10))


def config(work: Path, gradients_dir: Path) -> TrainingConfig:
    return TrainingConfig.from_params({
        "training": {
            "model": {"name": "small_cnn"},  # the harness passes its own tiny model's factory
            "phases": [{"epochs": EPOCHS // 2, "lr": 0.05}, {"epochs": EPOCHS - EPOCHS // 2, "lr": 0.01}],
            "augment": True, "cpu_threads": 1, "progress_bar": False,
        },
        "keep_gradients": "all",
        "keep_checkpoints": KEEP_CHECKPOINTS,
        "checkpoint_dir": str(work / "checkpoints"),
        "gradients_dir": str(gradients_dir),
    })


def install_faults(faults: dict[str, str]) -> None:
    kill_suffix = faults.get("FAULT_KILL_WRITE")
    if kill_suffix:
        real_replace = os.replace

        def replace_then_die(source, destination, *args, **kwargs):
            if str(destination).endswith(kill_suffix):
                size = os.path.getsize(source)
                os.truncate(source, size // 2)
                print(f"killing myself while writing {destination}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(source, destination, *args, **kwargs)

        os.replace = replace_then_die

    enospc_suffix = faults.get("FAULT_ENOSPC_AT")
    if enospc_suffix:
        real_fdopen = os.fdopen

        class FullDisk:
            def __init__(self, stream):
                self._stream = stream

            def write(self, data):
                raise OSError(errno.ENOSPC, "No space left on device (injected)")

            def __getattr__(self, name):
                return getattr(self._stream, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc_info):
                self._stream.close()

        def fdopen(fd, *args, **kwargs):
            stream = real_fdopen(fd, *args, **kwargs)
            target = os.readlink(f"/proc/self/fd/{fd}")  # the temporary name holds the real one
            if enospc_suffix.rsplit("/", 1)[-1] in Path(target).name and enospc_suffix.rsplit("/", 1)[0] in target:
                return FullDisk(stream)
            return stream

        os.fdopen = fdopen


def fill_disk(folder: Path) -> None:
    with open(folder / "hog", "wb", buffering=0) as hog:
        try:
            while True:
                hog.write(b"\0" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC, error


def train(work: Path, out: Path, data_path: Path, gradients_dir: Path | None, faults: dict[str, str]) -> None:
    gradients_dir = gradients_dir or work / "gradients"
    install_faults(faults)
    fill_at = faults.get("FAULT_FILL_DISK_AT")
    fill_at = tuple(int(x) for x in fill_at.split(":")) if fill_at else None
    data = TrainingData(**torch.load(data_path, weights_only=True))
    run = GradientProbeRun(config(work, gradients_dir), data, tiny_model, "intensity")
    write = run.gradients.write

    def write_after_filling(epoch: int, batch: int, gradient: torch.Tensor) -> int:
        if (epoch, batch) == fill_at:
            fill_disk(gradients_dir)
        return write(epoch, batch, gradient)

    run.gradients.write = write_after_filling
    run.run()
    out.mkdir(parents=True, exist_ok=True)
    run.results.distances.to_parquet(out / "distances.parquet")
    run.results.history.drop(columns="seconds").to_parquet(out / "history.parquet")
    save_tensors_atomically(run.results.model_state, out / "model.pt")
    print(f"run finished: {run.run_name}", flush=True)


def run_in_child(work: str, out: str, data_path: str, gradients_dir: str | None, faults: dict[str, str],
                 log_path: str) -> None:
    """The child process: log and any error's traceback go to ``log_path``; an error exits with 1."""
    log = open(log_path, "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    logging.basicConfig(level=logging.INFO, stream=log, format="%(levelname)s %(message)s", force=True)
    torch.set_num_threads(1)
    try:
        train(Path(work), Path(out), Path(data_path), Path(gradients_dir) if gradients_dir else None, faults)
    except BaseException:
        traceback.print_exc(file=log)
        log.flush()
        os._exit(1)
    log.flush()
    os._exit(0)


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
    work, out, data_path = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    gradients_dir = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    train(work, out, data_path, gradients_dir, {k: v for k, v in os.environ.items() if k.startswith("FAULT_")})


if __name__ == "__main__":
    main()
