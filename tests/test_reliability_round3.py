"""Reliability round 3 (issue 23): each case reproduced first, then refused or handled.

Every test here failed on the code before its fix; docs/reliability.md lists them.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from best_minibatch.data.cifar import DatasetInputError, count_training_images, read_image_dataset

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --------------------------------------------------------------------------- case 1: no code from a data file


class _Payload:
    """Pickles as a call to ``pathlib.Path.touch`` on a marker file: proof that unpickling ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _write_release(root: Path, planted: dict[str, object] | None = None) -> Path:
    """A tiny CIFAR-10 python release as ``cifar-10-python.tar.gz``; ``planted`` adds entries to named batches."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, size=4).tolist(),
            b"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(4)],
        }
        if planted and name in planted:
            batch[b"extra"] = planted[name]
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": 4, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return archive


@pytest.mark.parametrize("as_archive", [True, False], ids=["tar.gz", "extracted-folder"])
@pytest.mark.parametrize("reader", [read_image_dataset, count_training_images], ids=["read", "count-in-the-checks"])
def test_a_pickle_payload_in_a_cifar_batch_is_refused_naming_the_file_and_never_runs(tmp_path, reader, as_archive):
    marker = tmp_path / "payload-ran"
    archive = _write_release(tmp_path / "release", planted={"data_batch_2": _Payload(marker)})
    path = archive if as_archive else archive.parent / "cifar-10-batches-py"
    with pytest.raises(DatasetInputError) as caught:
        reader(path)
    message = str(caught.value)
    assert "data_batch_2" in message and str(path) in message
    assert "names the global" in message and "Refused" in message
    assert not marker.exists(), "the planted payload ran"


def test_the_restricted_reader_still_reads_an_honest_release(tmp_path):
    archive = _write_release(tmp_path)
    dataset = read_image_dataset(archive)
    assert len(dataset.index) == 24 and dataset.class_names == CLASSES
    assert count_training_images(archive) == 20
