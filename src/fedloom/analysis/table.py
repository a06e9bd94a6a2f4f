"""A site's table for a federated analysis: named numeric columns of equal length.

A site's own data is a CSV file with a header line (``analysis.table`` in its data
folder); an empty cell, ``NA`` or ``NaN`` is a missing value, left out of that column's
statistics. A built-in dataset's share is a table too: its features are ``feature_0``,
``feature_1`` … and its labels (or regression targets) ``label``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedloom.core.errors import TaskError

Table = Mapping[str, np.ndarray]  # column name -> float64 values, NaN where missing

MISSING = frozenset({"", "na", "nan", "null", "none"})
MAX_TABLE_BYTES = 1 << 30


def read_table(path: Path) -> dict[str, np.ndarray]:
    """The CSV file at ``path`` as a table; :class:`TaskError` naming the file, line and
    column of a value that is not a number, or a file that cannot be a table."""
    try:
        size = path.stat().st_size
    except OSError as err:
        raise TaskError(
            f"cannot read this site's table {path}: {err.strerror or err}",
            hint="the plan's analysis.table names a CSV file in each site's data folder",
        ) from err
    if size > MAX_TABLE_BYTES:
        raise TaskError(f"{path} is {size} bytes: at most {MAX_TABLE_BYTES} are read")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = csv.reader(handle)
        header = next(rows, None)
        if not header or any(not h.strip() for h in header):
            raise TaskError(f"{path}: the first line must name every column")
        names = [h.strip() for h in header]
        if len(set(names)) != len(names):
            raise TaskError(f"{path}: a column is named twice in the header: {names}")
        values: list[list[float]] = [[] for _ in names]
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) != len(names):
                raise TaskError(f"{path}, line {line}: {len(row)} values for {len(names)} columns")
            for name, column, cell in zip(names, values, row, strict=True):
                column.append(_number(cell, path, line, name))
    return {n: np.asarray(v, np.float64) for n, v in zip(names, values, strict=True)}


def _number(cell: str, path: Path, line: int, column: str) -> float:
    text = cell.strip()
    if text.lower() in MISSING:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise TaskError(
            f"{path}, line {line}, column {column!r}: {cell!r} is not a number",
            hint="an analysis reads numeric columns; code categories as numbers",
        ) from None
    if math.isinf(value):
        raise TaskError(f"{path}, line {line}, column {column!r}: {cell!r} is not finite")
    return value


def table_of_arrays(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """A built-in dataset's share as a table: ``feature_<i>`` and ``label``."""
    features = np.asarray(x, np.float64).reshape(len(x), -1)
    table = {f"feature_{i}": features[:, i] for i in range(features.shape[1])}
    table["label"] = np.asarray(y, np.float64)
    return table


def column(table: Table, name: str, where: str) -> np.ndarray:
    """The column ``name``; :class:`TaskError` listing the table's columns if missing."""
    if name not in table:
        shown = ", ".join(sorted(table)[:20])
        raise TaskError(
            f"{where}: this site's table has no column {name!r} (it has: {shown})",
            hint="the plan's analysis names the columns every site's table must have",
        )
    return np.asarray(table[name], np.float64)
