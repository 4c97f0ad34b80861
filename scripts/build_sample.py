"""Rebuild the embedded CIFAR-10 sample deterministically from the shared full zip.

    python scripts/build_sample.py [--source ../shared/data/cifar10-jpeg.zip]
                                   [--output data/01_raw/cifar10-sample.zip]

Takes, per class, a seeded random choice of 500 training and 100 test images
and copies their JPEG bytes unchanged into a zip of the same layout
(train/<class>/<file>, test/<class>/<file>), with fixed entry dates, so that
the same source always gives a byte-identical archive.
"""

from __future__ import annotations

import argparse
import hashlib
import zipfile
from collections import defaultdict
from pathlib import Path, PurePosixPath

import numpy as np

PER_CLASS = {"train": 500, "test": 100}
SEED = 20181201
FIXED_DATE = (2020, 1, 1, 0, 0, 0)


def build_sample(source: Path, output: Path, per_class: dict[str, int] = PER_CLASS, seed: int = SEED) -> str:
    """Write the sample zip to ``output`` and return its sha256."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(source) as full:
        groups: dict[tuple[str, str], list[str]] = defaultdict(list)
        for name in full.namelist():
            parts = PurePosixPath(name).parts
            if len(parts) == 3 and parts[0] in per_class:
                groups[(parts[0], parts[1])].append(name)
        chosen = []
        for split, cls in sorted(groups):
            names = sorted(groups[(split, cls)])
            picks = rng.choice(len(names), size=per_class[split], replace=False)
            chosen.extend(names[i] for i in sorted(picks))
        output.parent.mkdir(parents=True, exist_ok=True)
        temporary = output.with_suffix(".partial")
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED) as sample:
            for name in chosen:
                info = zipfile.ZipInfo(name, date_time=FIXED_DATE)
                info.external_attr = 0o644 << 16
                sample.writestr(info, full.read(name))
        temporary.replace(output)
    return hashlib.sha256(output.read_bytes()).hexdigest()


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=root.parent / "shared/data/cifar10-jpeg.zip")
    parser.add_argument("--output", type=Path, default=root / "data/01_raw/cifar10-sample.zip")
    args = parser.parse_args()
    digest = build_sample(args.source, args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size:,} bytes, sha256 {digest})")


if __name__ == "__main__":
    main()
