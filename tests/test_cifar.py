"""ingest: reading CIFAR-10 in both layouts, and refusing bad input with a clear error."""

from __future__ import annotations

import pickle
import tarfile
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from best_minibatch.data.cifar import DatasetInputError, read_image_dataset

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_full_cifar10_zip_has_the_published_counts_and_means(full_dataset):
    index = full_dataset.index
    train, test = full_dataset.images["train"], full_dataset.images["test"]
    assert train.shape == (50_000, 32, 32, 3) and train.dtype == torch.uint8
    assert test.shape == (10_000, 32, 32, 3)
    assert (index.split == "train").sum() == 50_000 and (index.split == "test").sum() == 10_000
    assert index.groupby("split").class_name.value_counts().unstack().loc["train"].eq(5_000).all()
    assert index.groupby("split").class_name.value_counts().unstack().loc["test"].eq(1_000).all()
    assert full_dataset.class_names == CLASSES
    means = train.double().mean(dim=(0, 1, 2)) / 255
    assert means.numpy() == pytest.approx([0.491, 0.482, 0.447], abs=1e-3)
    # image_id is unique and train ids equal their tensor row.
    assert index.image_id.is_unique
    trains = index[index.split == "train"]
    assert (trains.image_id == trains.row).all()


def test_embedded_sample_is_stratified(sample_dataset):
    counts = sample_dataset.index.groupby(["split", "class_name"]).size()
    assert counts.loc["train"].eq(500).all() and counts.loc["test"].eq(100).all()
    assert sample_dataset.images["train"].shape == (5_000, 32, 32, 3)


def test_image_folder_from_a_folder_equals_the_zip(tmp_path, sample_dataset):
    from tests.conftest import SAMPLE_ZIP

    with zipfile.ZipFile(SAMPLE_ZIP) as archive:
        members = [n for n in archive.namelist() if "/cat/" in n or "/dog/" in n]
        archive.extractall(tmp_path / "folder", members=members)
    folder = read_image_dataset(tmp_path / "folder")
    expected = sample_dataset.index[sample_dataset.index.class_name.isin(["cat", "dog"])]
    assert len(folder.index) == len(expected) == 1_200
    rows = expected[expected.split == "train"].row.tolist()
    assert torch.equal(folder.images["train"], sample_dataset.images["train"][rows])


# --------------------------------------------------------------------------- canonical python release


def _write_canonical_release(root: Path, rng: np.random.Generator, per_batch: int = 6) -> dict:
    """Write a small archive in exactly the CIFAR-10 python format; return what was written."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {"train": [], "train_labels": [], "test": None, "test_labels": None}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        batch = {
            b"batch_label": f"{name} of 6".encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{name}_{i}.png".encode() for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        if name == "test_batch":
            written["test"], written["test_labels"] = data, labels
        else:
            written["train"].append(data)
            written["train_labels"].extend(labels)
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as archive:
        archive.add(folder, arcname="cifar-10-batches-py")
    return written


@pytest.mark.parametrize("as_archive", [True, False], ids=["tar.gz", "extracted-folder"])
def test_canonical_python_release_reads_back_bit_exact(tmp_path, as_archive):
    written = _write_canonical_release(tmp_path, np.random.default_rng(0))
    path = tmp_path / ("cifar-10-python.tar.gz" if as_archive else "cifar-10-batches-py")
    dataset = read_image_dataset(path)
    train = np.concatenate(written["train"])
    # The release stores each image as 1024 red, 1024 green, 1024 blue bytes, row-major.
    expected = train.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert np.array_equal(dataset.images["train"].numpy(), expected)
    assert dataset.images["train"][0, 0, 1, 2].item() == train[0, 2 * 1024 + 1]  # blue of pixel (0, 1)
    assert np.array_equal(
        dataset.images["test"].numpy(), written["test"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    )
    index = dataset.index
    assert index[index.split == "train"].label.tolist() == written["train_labels"]
    assert index[index.split == "test"].label.tolist() == written["test_labels"]
    assert dataset.class_names == CLASSES
    assert index.source.iloc[0] == "data_batch_1:0:img_data_batch_1_0.png"


# --------------------------------------------------------------------------- bad input


def _png(color: tuple[int, int, int], size: int = 32) -> bytes:
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[:] = color[::-1]  # OpenCV writes BGR
    return cv2.imencode(".png", image)[1].tobytes()


def _make_folder(root: Path, layout: dict[str, dict[str, int]], size: int = 32) -> Path:
    for split, classes in layout.items():
        for cls, count in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (root / split / cls / f"{i:04d}.png").write_bytes(_png((i * 40 % 256, 10, 200), size))
    return root


GOOD_LAYOUT = {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1, "dog": 1}}


def test_png_folder_reads_rgb_values(tmp_path):
    dataset = read_image_dataset(_make_folder(tmp_path / "d", GOOD_LAYOUT))
    assert dataset.images["train"].shape == (4, 32, 32, 3)
    assert dataset.images["train"][1, 5, 5].tolist() == [40, 10, 200]
    assert dataset.class_names == ["cat", "dog"]


def test_missing_path_names_the_parameter(tmp_path):
    with pytest.raises(DatasetInputError, match=r"not found.*ingest_cifar\.source\.path"):
        read_image_dataset(tmp_path / "nowhere.zip")


def test_unknown_layout_is_refused(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hello")
    with pytest.raises(DatasetInputError, match="Unknown layout"):
        read_image_dataset(tmp_path / "stuff")


def test_unknown_layout_name_is_refused(tmp_path):
    folder = _make_folder(tmp_path / "d", GOOD_LAYOUT)
    with pytest.raises(DatasetInputError, match="Unknown layout 'hdf5'"):
        read_image_dataset(folder, layout="hdf5")


def test_truncated_zip_archive_is_refused(tmp_path):
    from tests.conftest import SAMPLE_ZIP

    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(SAMPLE_ZIP.read_bytes()[: 3_000_000])
    with pytest.raises(DatasetInputError, match="(corrupt|truncated)"):
        read_image_dataset(damaged)


def test_corrupt_zip_entry_is_named(tmp_path):
    folder = _make_folder(tmp_path / "d", GOOD_LAYOUT)
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as out:
        for file in sorted(folder.rglob("*.png")):
            out.write(file, file.relative_to(folder).as_posix())
    # Flip bytes inside one stored entry: its CRC no longer matches.
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as z:
        info = z.getinfo("train/dog/0001.png")
    start = info.header_offset + 30 + len(info.filename) + 40
    data[start : start + 8] = b"\x00" * 8
    archive.write_bytes(bytes(data))
    with pytest.raises(DatasetInputError, match="train/dog/0001.png"):
        read_image_dataset(archive)


def test_truncated_image_is_named(tmp_path):
    folder = _make_folder(tmp_path / "d", GOOD_LAYOUT)
    victim = folder / "test" / "cat" / "0000.png"
    victim.write_bytes(victim.read_bytes()[:40])
    with pytest.raises(DatasetInputError, match=r"test/cat/0000\.png"):
        read_image_dataset(folder)


def test_truncated_jpeg_is_named(tmp_path):
    folder = _make_folder(tmp_path / "d", GOOD_LAYOUT)
    image = cv2.imdecode(np.frombuffer((folder / "train/cat/0000.png").read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    jpeg = cv2.imencode(".jpg", image)[1].tobytes()
    (folder / "train/cat/0000.png").unlink()
    (folder / "train/cat/0000.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    with pytest.raises(DatasetInputError, match=r"train/cat/0000\.jpg"):
        read_image_dataset(folder)


def test_mixed_image_sizes_are_refused(tmp_path):
    folder = _make_folder(tmp_path / "d", GOOD_LAYOUT)
    (folder / "train/dog/0001.png").write_bytes(_png((1, 2, 3), size=28))
    with pytest.raises(DatasetInputError, match=r"mixed sizes.*train/dog/0001\.png"):
        read_image_dataset(folder)


def test_test_class_missing_from_train_is_refused(tmp_path):
    folder = _make_folder(tmp_path / "d", {"train": {"cat": 1}, "test": {"cat": 1, "emu": 1}})
    with pytest.raises(DatasetInputError, match=r"\['emu'\].*train lacks"):
        read_image_dataset(folder)


@pytest.mark.parametrize("empty", ["train", "test"])
def test_empty_split_is_refused(tmp_path, empty):
    layout = {split: ({} if split == empty else {"cat": 1}) for split in ("train", "test")}
    folder = _make_folder(tmp_path / "d", layout)
    with pytest.raises(DatasetInputError, match=f"the {empty} split is empty"):
        read_image_dataset(folder)


def test_corrupt_canonical_batch_is_named(tmp_path):
    _write_canonical_release(tmp_path, np.random.default_rng(1))
    victim = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(DatasetInputError, match="data_batch_3"):
        read_image_dataset(tmp_path / "cifar-10-batches-py")


def test_canonical_release_missing_a_batch_is_refused(tmp_path):
    _write_canonical_release(tmp_path, np.random.default_rng(2))
    (tmp_path / "cifar-10-batches-py" / "data_batch_5").unlink()
    with pytest.raises(DatasetInputError, match="data_batch_5"):
        read_image_dataset(tmp_path / "cifar-10-batches-py")


def test_truncated_tar_is_refused(tmp_path):
    _write_canonical_release(tmp_path, np.random.default_rng(3))
    archive = tmp_path / "cifar-10-python.tar.gz"
    damaged = tmp_path / "damaged" / "cifar-10-python.tar.gz"
    damaged.parent.mkdir()
    damaged.write_bytes(archive.read_bytes()[:2_000])
    with pytest.raises(DatasetInputError, match="(corrupt|truncated|missing)"):
        read_image_dataset(damaged)


def test_count_training_images_without_decoding(tmp_path, sample_dataset):
    from best_minibatch.data.cifar import count_training_images
    from tests.conftest import SAMPLE_ZIP

    assert count_training_images(SAMPLE_ZIP) == len(sample_dataset.images["train"]) == 5_000
    _write_canonical_release(tmp_path, np.random.default_rng(4), per_batch=7)
    assert count_training_images(tmp_path / "cifar-10-python.tar.gz") == 5 * 7
