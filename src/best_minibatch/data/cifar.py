"""Read CIFAR-style image datasets into one table and two uint8 tensors.

Knows nothing of Kedro. Two source layouts are understood:

* ``image_folder``: ``train/<class>/<file>`` and ``test/<class>/<file>`` (PNG or
  JPEG), as a folder or as a zip (the layout of ``cifar10-jpeg.zip``);
* ``cifar_python``: the canonical CIFAR-10 python release, as
  ``cifar-10-python.tar.gz`` or its extracted ``cifar-10-batches-py/`` folder.

Every check runs before anything is returned, so a caller that writes only
after :func:`read_image_dataset` returns never writes a partial result.

The images come back as ``uint8`` tensors in **NHWC** layout (``N x 32 x 32 x 3``,
RGB channel order); row ``i`` of a split's tensor is the image whose ``row`` in
the index table is ``i``. ``image_id`` is unique across splits: training images
get ``0 .. N_train-1`` (equal to their row), test images ``N_train ..``.
"""

from __future__ import annotations

import tarfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch

from best_minibatch.config import Section
from best_minibatch.data.safe_pickle import UnsafePickleError, load_numpy_pickle

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CANONICAL_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CANONICAL_FILES = CANONICAL_TRAIN_BATCHES + ("test_batch", "batches.meta")
INDEX_COLUMNS = ["image_id", "split", "row", "label", "class_name", "source"]
#: Training images of the release :func:`download_cifar_python` fetches (five batches of 10,000): what the
#: checks before a run count when the dataset is still to be downloaded.
CIFAR10_TRAIN_IMAGES = len(CANONICAL_TRAIN_BATCHES) * 10_000
WHERE = "conf/<env>/parameters_ingest_cifar.yml"


class DatasetInputError(ValueError):
    """A raw dataset that cannot be ingested; the message names the problem and the fix."""


#: Layouts :func:`read_image_dataset` reads (``auto`` detects one of the others).
LAYOUTS = ("auto", "image_folder", "cifar_python")


@dataclass(frozen=True)
class SourceConfig:
    """The ``ingest_cifar`` section's ``source``, every key checked (conf/<env>/parameters_ingest_cifar.yml)."""

    path: str
    layout: str = "auto"
    download: bool = False
    download_root: str = "data/01_raw"

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> SourceConfig:
        """``params``: the whole ``ingest_cifar`` section (``{"source": {...}}``)."""
        ingest = Section(params, "ingest_cifar", ("source",), where=WHERE)
        section = ingest.section("source", ("path", "layout", "download", "download_root"))
        fix = "Set it to the raw dataset (a folder, zip, or cifar-10-python.tar.gz)."
        layout = section.choice("layout", cls.layout, LAYOUTS)
        download = section.boolean("download", cls.download)
        download_root = section.text("download_root", cls.download_root,
                                     "Name the folder the download goes to, e.g. data/01_raw.")
        section.required("path", fix)  # last: config.every_problem takes a bad key out and reads the rest again
        return cls(path=section.text("path", None, fix), layout=layout, download=download, download_root=download_root)


@dataclass(frozen=True)
class ImageDataset:
    """A whole dataset in memory: the index table and one uint8 NHWC tensor per split."""

    index: pd.DataFrame
    images: dict[str, torch.Tensor]

    @property
    def class_names(self) -> list[str]:
        pairs = self.index[["label", "class_name"]].drop_duplicates().sort_values("label")
        return pairs["class_name"].tolist()


# --------------------------------------------------------------------------- entry point


def read_image_dataset(path: str | Path, layout: str = "auto") -> ImageDataset:
    """Read a dataset from ``path``; ``layout`` is ``auto``, ``image_folder`` or ``cifar_python``."""
    path = Path(path)
    if not path.exists():
        raise DatasetInputError(
            f"Raw dataset not found: '{path}'. Set ingest_cifar.source.path to an existing "
            "folder, zip, or cifar-10-python.tar.gz (relative paths start at the project root)."
        )
    if layout == "auto":
        layout = detect_layout(path)
    readers: dict[str, Callable[[Path], ImageDataset]] = {
        "image_folder": read_image_folder,
        "cifar_python": read_cifar_python,
    }
    if layout not in readers:
        raise DatasetInputError(
            f"Unknown layout '{layout}' for '{path}'. Use one of: auto, "
            + ", ".join(readers)
            + "."
        )
    return readers[layout](path)


def count_training_images(path: str | Path, layout: str = "auto") -> int:
    """Training images in a raw dataset, without decoding any image (for checks before a run).

    Image folders are counted from their listing; the python release from its label lists.
    """
    path = Path(path)
    layout = detect_layout(path) if layout == "auto" else layout
    if layout == "image_folder":
        return sum(len(names) for names in _group_image_folder(path, _list_names(path))["train"].values())
    if layout == "cifar_python":
        batches = _load_canonical_pickles(path)
        return sum(len(_get(batches[name], "labels", name, path)) for name in CANONICAL_TRAIN_BATCHES if name in batches)
    raise DatasetInputError(f"Unknown layout '{layout}' for '{path}'. Use one of: auto, image_folder, cifar_python.")


def detect_layout(path: Path) -> str:
    """Guess the layout of ``path`` from its entries, or raise naming what was found."""
    names = _list_names(path)
    if any(PurePosixPath(n).name in CANONICAL_FILES for n in names):
        return "cifar_python"
    if any(PurePosixPath(n).parts[:1] in (("train",), ("test",)) for n in _strip_common_root(names)):
        return "image_folder"
    sample = ", ".join(sorted(names)[:5]) or "nothing"
    raise DatasetInputError(
        f"Unknown layout in '{path}': expected train/<class>/<image> and test/<class>/<image> "
        f"(image_folder) or data_batch_1..5, test_batch, batches.meta (cifar_python); found {sample}."
    )


def _list_names(path: Path) -> list[str]:
    if path.is_dir():
        return [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
    if zipfile.is_zipfile(path):
        with _open_zip(path) as archive:
            return [n for n in archive.namelist() if not n.endswith("/")]
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        with _open_tar(path) as archive:
            try:
                return [m.name for m in archive.getmembers() if m.isfile()]
            except (tarfile.TarError, EOFError, OSError) as error:
                raise DatasetInputError(
                    f"Corrupt or truncated tar archive '{path}': {error}. Re-download cifar-10-python.tar.gz."
                ) from error
    raise DatasetInputError(
        f"Cannot read '{path}': it is neither a folder, a zip archive nor a tar archive "
        "(a corrupt or truncated archive looks like this too). Re-download or rebuild it."
    )


# --------------------------------------------------------------------------- image folders


def read_image_folder(path: Path) -> ImageDataset:
    """Read ``train/<class>/<file>`` and ``test/<class>/<file>`` from a folder or a zip."""
    if path.is_dir():
        entries = {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()}
        def read_bytes(name: str) -> bytes:
            return entries[name].read_bytes()

        names = list(entries)
        archive = None
    elif zipfile.is_zipfile(path):
        archive = _open_zip(path)
        names = [n for n in archive.namelist() if not n.endswith("/")]
        def read_bytes(name: str) -> bytes:
            return _read_zip_entry(archive, path, name)

    else:
        mismatch = _layout_mismatch(path, "image_folder")
        if mismatch is not None:
            raise mismatch
        raise DatasetInputError(
            f"'{path}' is not a folder or a readable zip archive (corrupt or truncated?). "
            "Rebuild the archive or point ingest_cifar.source.path at the extracted folder."
        )
    try:
        by_split = _group_image_folder(path, names)
        train_classes = sorted(by_split["train"])
        extra = sorted(set(by_split["test"]) - set(train_classes))
        if extra:
            raise DatasetInputError(
                f"'{path}': test split has class folder(s) {extra} that train lacks; every test "
                "class must also be a training class. Remove them or add their training images."
            )
        label_of = {name: label for label, name in enumerate(train_classes)}
        images, records = {}, []
        for split in SPLITS:
            split_names = [
                (cls, name)
                for cls in sorted(by_split[split])
                for name in sorted(by_split[split][cls])
            ]
            arrays = [_decode_image(read_bytes(name), f"{path}:{name}") for _, name in split_names]
            images[split] = _stack_same_size(arrays, [n for _, n in split_names], path, split)
            records.append(
                pd.DataFrame(
                    {
                        "split": split,
                        "row": np.arange(len(split_names), dtype=np.int64),
                        "label": np.array([label_of[c] for c, _ in split_names], dtype=np.int64),
                        "class_name": [c for c, _ in split_names],
                        "source": [f"{path.name}:{n}" for _, n in split_names],
                    }
                )
            )
    finally:
        if archive is not None:
            archive.close()
    return _assemble(records, images)


def _strip_common_root(names: Iterable[str]) -> list[str]:
    """Drop one leading folder shared by every entry (zips often wrap everything in one)."""
    names = list(names)
    firsts = {PurePosixPath(n).parts[0] for n in names if PurePosixPath(n).parts}
    if len(firsts) == 1 and not firsts & set(SPLITS):
        return ["/".join(PurePosixPath(n).parts[1:]) for n in names]
    return names


def _group_image_folder(path: Path, names: list[str]) -> dict[str, dict[str, list[str]]]:
    stripped = dict(zip(_strip_common_root(names), names))
    by_split: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
    for rel, original in stripped.items():
        parts = PurePosixPath(rel).parts
        if len(parts) != 3 or parts[0] not in SPLITS:
            continue
        if PurePosixPath(rel).name.startswith("."):
            continue
        if PurePosixPath(rel).suffix.lower() not in IMAGE_SUFFIXES:
            raise DatasetInputError(
                f"'{path}': entry '{original}' is not a PNG or JPEG image. "
                "Remove it, or convert it to .png/.jpg."
            )
        by_split[parts[0]].setdefault(parts[1], []).append(original)
    for split in SPLITS:
        if not by_split[split]:
            raise DatasetInputError(
                f"'{path}': the {split} split is empty (no {split}/<class>/<image> entries). "
                f"Add {split} images in that layout."
            )
    return by_split


def _decode_image(data: bytes, where: str) -> np.ndarray:
    """Decode PNG/JPEG bytes to an RGB uint8 array, refusing corrupt or truncated files."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        complete = b"IEND" in data[-12:]
    elif data[:2] == b"\xff\xd8":
        # A JPEG ends with the EOI marker (possibly followed by padding).
        complete = b"\xff\xd9" in data[-16:]
    else:
        complete = False
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR) if complete else None
    if decoded is None:
        raise DatasetInputError(
            f"Corrupt or truncated image '{where}' ({len(data)} bytes). "
            "Replace or delete that file and run ingest_cifar again."
        )
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def _stack_same_size(arrays: list[np.ndarray], names: list[str], path: Path, split: str) -> torch.Tensor:
    shapes: dict[tuple[int, ...], str] = {}
    for array, name in zip(arrays, names):
        shapes.setdefault(array.shape, name)
    if len(shapes) > 1:
        listed = "; ".join(f"{shape} e.g. '{name}'" for shape, name in shapes.items())
        raise DatasetInputError(
            f"'{path}': {split} images have mixed sizes ({listed}). All images must share "
            "one height x width x 3; resize them before ingesting."
        )
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise DatasetInputError(
            f"Corrupt or truncated zip archive '{path}': {error}. Re-download or rebuild it."
        ) from error


def _read_zip_entry(archive: zipfile.ZipFile, path: Path, name: str) -> bytes:
    try:
        return archive.read(name)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        # zipfile checks each entry's CRC, so a damaged entry fails here.
        raise DatasetInputError(
            f"Corrupt or truncated entry '{name}' in '{path}': {error}. Re-download or rebuild the archive."
        ) from error


# --------------------------------------------------------------------------- canonical release


def read_cifar_python(path: Path) -> ImageDataset:
    """Read the canonical python release (tar.gz or the extracted ``cifar-10-batches-py``)."""
    batches = _load_canonical_pickles(path)
    missing = [name for name in CANONICAL_FILES if name not in batches]
    if missing:
        raise DatasetInputError(
            f"'{path}' is missing {missing} of the CIFAR-10 python release (needs "
            f"{', '.join(CANONICAL_FILES)}). Re-download or re-extract cifar-10-python.tar.gz."
        )
    meta = batches["batches.meta"]
    class_names = [_text(n) for n in _get(meta, "label_names", "batches.meta", path)]
    images, records = {}, []
    for split, files in (("train", CANONICAL_TRAIN_BATCHES), ("test", ("test_batch",))):
        data, labels, filenames, sources = [], [], [], []
        for file in files:
            batch = batches[file]
            raw = np.asarray(_get(batch, "data", file, path), dtype=np.uint8)
            batch_labels = list(_get(batch, "labels", file, path))
            names = [_text(n) for n in _get(batch, "filenames", file, path)]
            if raw.ndim != 2 or raw.shape[1] != 3 * 32 * 32 or len(batch_labels) != len(raw):
                raise DatasetInputError(
                    f"'{path}': '{file}' has data of shape {raw.shape} and {len(batch_labels)} "
                    "labels; the release stores N x 3072 uint8 rows with one label each. "
                    "The file is corrupt; re-download the release."
                )
            # Each row is the red plane, then green, then blue, each 32x32 row-major.
            data.append(raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.extend(int(label) for label in batch_labels)
            filenames.extend(names)
            sources.extend(f"{file}:{i}:{n}" for i, n in enumerate(names))
        if not labels:
            raise DatasetInputError(f"'{path}': the {split} split is empty. Re-download the release.")
        bad = sorted({label for label in labels if not 0 <= label < len(class_names)})
        if bad:
            raise DatasetInputError(
                f"'{path}': {split} labels {bad[:5]} are outside the {len(class_names)} classes "
                "of batches.meta. The release is corrupt; re-download it."
            )
        images[split] = torch.from_numpy(np.ascontiguousarray(np.concatenate(data)))
        records.append(
            pd.DataFrame(
                {
                    "split": split,
                    "row": np.arange(len(labels), dtype=np.int64),
                    "label": np.array(labels, dtype=np.int64),
                    "class_name": [class_names[label] for label in labels],
                    "source": sources,
                }
            )
        )
    return _assemble(records, images)


def _load_canonical_pickles(path: Path) -> dict[str, dict]:
    found: dict[str, dict] = {}
    if path.is_dir():
        for file in path.rglob("*"):
            if file.is_file() and file.name in CANONICAL_FILES:
                found[file.name] = _unpickle(file.read_bytes(), f"{path}:{file.relative_to(path)}")
        if not found:
            mismatch = _layout_mismatch(path, "cifar_python")
            if mismatch is not None:
                raise mismatch
        return found
    if zipfile.is_zipfile(path):  # tarfile would call it a corrupt tar archive
        raise _layout_mismatch(path, "cifar_python") or DatasetInputError(
            f"'{path}' is a zip archive; layout 'cifar_python' reads the CIFAR-10 python release as the original "
            "cifar-10-python.tar.gz or as its extracted folder. Extract the zip and set ingest_cifar.source.path "
            "to the folder, or use the .tar.gz."
        )
    with _open_tar(path) as archive:
        try:
            for member in archive:
                name = PurePosixPath(member.name).name
                if member.isfile() and name in CANONICAL_FILES:
                    handle = archive.extractfile(member)
                    found[name] = _unpickle(handle.read(), f"{path}:{member.name}")
        except (tarfile.TarError, EOFError, OSError) as error:
            raise DatasetInputError(
                f"Corrupt or truncated tar archive '{path}': {error}. Re-download cifar-10-python.tar.gz."
            ) from error
    return found


def _layout_mismatch(path: Path, asked: str) -> DatasetInputError | None:
    """When ``path`` holds the other layout than ``asked``: an error saying what it is and which layout reads it."""
    try:
        found = detect_layout(path)
    except DatasetInputError:
        return None  # unreadable or unknown: the caller's own message applies
    kind = "a folder" if path.is_dir() else "a zip archive" if zipfile.is_zipfile(path) else "a tar archive"
    if found == asked and not (found == "cifar_python" and kind == "a zip archive"):
        return None
    if found == "image_folder":
        return DatasetInputError(
            f"'{path}' is {kind} of image folders (train/<class>/<image> and test/<class>/<image>), which layout "
            f"'image_folder' reads, not '{asked}'. Set ingest_cifar.source.layout: image_folder (or auto, which "
            "recognises it)."
        )
    release = "the CIFAR-10 python release (data_batch_1..5, test_batch, batches.meta)"
    if kind == "a zip archive":
        return DatasetInputError(
            f"'{path}' is a zip archive holding {release}. Layout 'cifar_python' reads that release as the original "
            "cifar-10-python.tar.gz or as its extracted folder: extract the zip and set ingest_cifar.source.path to "
            "the folder (layout: cifar_python or auto)."
        )
    return DatasetInputError(
        f"'{path}' is {kind} holding {release}, which layout 'cifar_python' reads, not '{asked}'. Set "
        "ingest_cifar.source.layout: cifar_python (or auto, which recognises it)."
    )


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DatasetInputError(
            f"Corrupt or truncated tar archive '{path}': {error}. Re-download cifar-10-python.tar.gz."
        ) from error


def _unpickle(data: bytes, where: str) -> dict:
    # Never plain pickle.load: a planted global would run while loading (issue 23, case 1).
    # The release needs dicts, lists, bytes, ints and numpy arrays; nothing else is admitted.
    try:
        loaded = load_numpy_pickle(data, encoding="bytes")
    except UnsafePickleError as error:
        raise DatasetInputError(
            f"Refused to read '{where}': {error} A CIFAR-10 python batch holds only dicts, lists, bytes, "
            "numbers and numpy arrays, so this file is not the release (it would run code if unpickled "
            "freely). Delete it and download cifar-10-python.tar.gz from its official source."
        ) from error
    except Exception as error:  # pickle raises many types on damaged input
        raise DatasetInputError(
            f"Corrupt or truncated entry '{where}': {error!r}. Re-download the CIFAR-10 python release."
        ) from error
    if not isinstance(loaded, dict):
        raise DatasetInputError(f"Entry '{where}' is not a CIFAR batch dictionary. Re-download the release.")
    return loaded


def _get(batch: dict, key: str, file: str, path: Path):
    for candidate in (key, key.encode()):
        if candidate in batch:
            return batch[candidate]
    raise DatasetInputError(
        f"'{path}': '{file}' has no '{key}' entry; the release is corrupt. Re-download it."
    )


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------- download


def download_cifar_python(root: Path) -> Path:
    """Fetch the canonical release through torchvision into ``root``; return the extracted folder."""
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(root=str(root), train=True, download=True)
    except Exception as error:  # urllib raises URLError, socket errors, HTTP errors...
        raise DatasetInputError(
            f"Downloading CIFAR-10 into '{root}' failed ({error}). This machine may have no "
            "internet: download cifar-10-python.tar.gz elsewhere and set "
            "ingest_cifar.source.path to it, with ingest_cifar.source.download: false."
        ) from error
    return root / "cifar-10-batches-py"


# --------------------------------------------------------------------------- assembly


def _assemble(records: list[pd.DataFrame], images: dict[str, torch.Tensor]) -> ImageDataset:
    shapes = {split: tuple(tensor.shape[1:]) for split, tensor in images.items()}
    if len(set(shapes.values())) > 1:
        raise DatasetInputError(
            f"Train and test images have different sizes {shapes}; both splits must share "
            "one height x width x 3. Resize one split before ingesting."
        )
    index = pd.concat(records, ignore_index=True)
    index.insert(0, "image_id", np.arange(len(index), dtype=np.int64))
    return ImageDataset(index=index[INDEX_COLUMNS], images=images)
