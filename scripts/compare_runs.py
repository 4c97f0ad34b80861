"""Compare two runs' data folders bit for bit (the newest version of every dataset in each).

Usage: python scripts/compare_runs.py DATA_A DATA_B [--ignore-columns seconds,probe_seconds]

Tables (Parquet) must be equal cell for cell, including dtypes, except the
wall-clock columns named by ``--ignore-columns``; tensors (``.pt``: one tensor or a
dict of tensors) must be equal bit for bit; figures (PNG) and text files (JSON,
Markdown, HTML) byte for byte. Checkpoints are skipped (they hold wall-clock
seconds), and so are PDFs (they embed their creation date). Prints one line per dataset and exits 1
if any differs; the renovation issue uses it
to show that the refactored engine reproduces the old one.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd
import torch

VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}\.\d{2}\.\d{2}\.\d{3}Z$")
SKIPPED_PARTS = {"checkpoints", "01_raw"}


def newest_files(root: Path) -> dict[str, Path]:
    """``dataset path -> file`` with the newest version of each versioned dataset."""
    found: dict[str, tuple[str, Path]] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or SKIPPED_PARTS & set(path.relative_to(root).parts) or path.suffix == ".pdf":
            continue
        parts = path.relative_to(root).parts
        version = next((p for p in parts if VERSION.match(p)), None)
        key = "/".join(p for p in parts if p != version)
        if version is None or key not in found or version > found[key][0]:
            found[key] = (version or "", path)
    return {key: path for key, (_, path) in found.items()}


def same(a: Path, b: Path, ignore: set[str]) -> str | None:
    """``None`` when equal, else what differs."""
    if a.suffix == ".parquet":
        left, right = pd.read_parquet(a), pd.read_parquet(b)
        drop = sorted(c for c in set(left.columns) | set(right.columns) if any(token in str(c) for token in ignore))
        try:
            pd.testing.assert_frame_equal(left.drop(columns=drop), right.drop(columns=drop), check_exact=True)
        except AssertionError as error:
            return str(error).splitlines()[0] + " " + " ".join(str(error).splitlines()[1:4])
        return None
    if a.suffix == ".pt":
        left, right = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        if isinstance(left, torch.Tensor):
            left, right = {"": left}, {"": right}
        if left.keys() != right.keys():
            return f"keys differ: {sorted(left.keys() ^ right.keys())[:5]}"
        bad = [k for k in left if left[k].dtype != right[k].dtype or not torch.equal(left[k], right[k])]
        return f"tensors differ: {bad[:5]}" if bad else None
    return None if a.read_bytes() == b.read_bytes() else "bytes differ"


def differences(a: Path, b: Path, ignore: set[str], only: str = "", skip: set[str] = frozenset()) -> tuple[int, list[str]]:
    """How many files were compared, and a line for each that differs (or exists on one side only).

    ``skip``: folder names left out besides the checkpoints (e.g. ``runs``: the run manifests
    hold each run's id, times and process).
    """
    left, right = newest_files(a), newest_files(b)
    keys = [k for k in sorted(left.keys() | right.keys()) if only in k and not skip & set(k.split("/"))]
    problems = []
    for key in keys:
        if key not in left or key not in right:
            problems.append(f"ONLY IN {'A' if key in left else 'B'}  {key}")
            continue
        problem = same(left[key], right[key], ignore)
        if problem:
            problems.append(f"DIFFERS  {key}: {problem}")
    return len(keys), problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--ignore-columns", default="seconds")
    parser.add_argument("--only", default="", help="compare only dataset paths containing this text")
    args = parser.parse_args()
    ignore = set(filter(None, args.ignore_columns.split(",")))
    left, right = newest_files(args.a), newest_files(args.b)
    differ = 0
    for key in sorted(left.keys() | right.keys()):
        if args.only not in key:
            continue
        if key not in left or key not in right:
            print(f"ONLY IN {'A' if key in left else 'B'}  {key}")
            differ += 1
            continue
        problem = same(left[key], right[key], ignore)
        print(f"{'DIFFERS' if problem else 'same   '}  {key}" + (f": {problem}" if problem else ""))
        differ += problem is not None
    compared = sum(1 for k in left.keys() | right.keys() if args.only in k)
    print(f"{compared - differ} of {compared} files identical ({', '.join(sorted(ignore)) or 'no'} columns ignored)")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
