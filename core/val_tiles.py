"""A run's per-tile validation errors, ``val_tiles.csv.gz``: one row per validation tile.

The trainer writes the task's ``VAL_TILES`` records of every epoch's validation (the last one
stays) with the epoch in front; the experiment reads them to resample tiles and to say which
domain carries how much of each metric. The file is a gzip of CSV written without a time
stamp, so the same validation gives the same bytes.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.run_folder import VAL_TILES_CSV
from core.safe_io import atomic_write


def write_val_tiles(run_dir: Path, epoch: int, records: Sequence[Mapping[str, Any]]) -> None:
    """``records`` (one dict per tile, same keys) as ``run_dir / val_tiles.csv.gz``."""
    columns = ["epoch", *dict.fromkeys(key for record in records for key in record)]

    def write(handle: Any) -> None:
        with (
            gzip.GzipFile(fileobj=handle, mode="wb", mtime=0) as zipped,
            io.TextIOWrapper(zipped, encoding="utf-8", newline="") as text,
        ):
            writer = csv.DictWriter(text, columns)
            writer.writeheader()
            writer.writerows({"epoch": epoch, **record} for record in records)

    atomic_write(Path(run_dir) / VAL_TILES_CSV, write)


def read_val_tiles(run_dir: Path) -> dict[str, np.ndarray] | None:
    """The file's columns as arrays (numbers as float64, others as text); None without it."""
    path = Path(run_dir) / VAL_TILES_CSV
    if not path.is_file():
        return None
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    names = list(rows[0]) if rows else []
    columns: dict[str, np.ndarray] = {}
    for name in names:
        values = [row[name] for row in rows]
        try:
            columns[name] = np.array([float(value) for value in values])
        except ValueError:
            columns[name] = np.array(values, dtype=str)
    return columns
