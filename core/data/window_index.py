"""A lattice of fixed-size windows over rasters of any size, described once and cached.

A training sample is a window of ``size`` x ``size`` cells of one raster file: a 48 x 48 tile
is a raster that holds one window, a 10,000 x 10,000 lidar tile holds 43,264. The index is
what a dataset needs to know before the first batch (where each window is, whether it is
usable, its terrain) without holding any pixel: building it reads each file once, a strip of
``size`` rows at a time, so memory stays flat in the raster's size; afterwards a dataset reads
one window per sample (``rasterio`` windowed reads).

Windows stay within one file, on that file's own grid: nothing is reprojected, so files in
different CRSs mix freely (each window keeps its file's cell size). The lattice is anchored
at each file's first cell and never overlaps; the cells past the last whole window are left
out.

The index is cached under ``<cache_root()>/windows/``, keyed by every file's identity
(``file_identity``) and by the settings that change it (``index_key``): a second run over the
same files reads it back in milliseconds; a touched file or another setting builds a new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import numpy as np
from affine import Affine
from rasterio.windows import Window
from tqdm.auto import tqdm

from core.data.cache import cache_root
from core.errors import DataError

INDEX_VERSION = 3
"""Bump when the stored layout changes, so old indexes are rebuilt."""

KEPT_INDEXES = 256
"""Indexes kept in the cache; a few kilobytes each, a few megabytes for a national mosaic."""

Strip = TypeVar("Strip")


@attrs.frozen
class GridFile:
    """One raster's grid, as the index saw it."""

    path: str
    height: int
    width: int
    transform: tuple[float, ...]
    """The affine's six coefficients (a, b, c, d, e, f)."""
    crs: str
    name: str
    """What reports call the file: its ``landscape`` or ``region`` tag, else its stem."""

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform)


@attrs.frozen(eq=False)
class WindowIndex:
    """Every usable window: ``file``, ``row`` and ``col`` (top-left cell) plus the columns the
    task's ``describe`` gave, all aligned; ``rejected`` counts the windows left out, by
    reason, ``problems`` the files left out.

    A text column is stored as integer codes into ``categories[name]`` (``text(name)`` reads
    it back): a few bytes a window, so an index of millions of windows stays small.
    """

    size: int
    files: tuple[GridFile, ...]
    columns: Mapping[str, np.ndarray]
    rejected: Mapping[str, int] = attrs.field(factory=dict)
    problems: Mapping[str, str] = attrs.field(factory=dict)
    """File number (as text) -> why that whole file was left out."""
    categories: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)

    def text(self, name: str, positions: np.ndarray | None = None) -> list[str]:
        """A text column's values (of ``positions``, else of every window)."""
        codes = self.columns[name] if positions is None else self.columns[name][positions]
        labels = self.categories[name]
        return [labels[code] for code in codes]

    def __len__(self) -> int:
        return len(self.columns["file"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def window(self, i: int) -> Window:
        return Window(int(self["col"][i]), int(self["row"][i]), self.size, self.size)

    def transform(self, i: int) -> Affine:
        """The affine of window ``i``'s own grid."""
        return self.files[self["file"][i]].affine @ Affine.translation(
            int(self["col"][i]), int(self["row"][i])
        )

    def bounds(self) -> np.ndarray:
        """``[N, 4]`` (left, bottom, right, top) of every window in its file's CRS."""
        transforms = np.array([f.transform for f in self.files], dtype=np.float64)
        t = transforms[self["file"]]
        cols = np.stack([self["col"], self["col"] + self.size], axis=1).astype(np.float64)
        rows = np.stack([self["row"], self["row"] + self.size], axis=1).astype(np.float64)
        # corners of north-up grids (b = d = 0, which every DEM this index reads has)
        x = t[:, [0]] * cols + t[:, [2]]
        y = t[:, [4]] * rows + t[:, [5]]
        return np.stack([x.min(1), y.min(1), x.max(1), y.max(1)], axis=1)

    def window_crs(self) -> np.ndarray:
        """The CRS of every window's file."""
        return np.array([f.crs for f in self.files], dtype=object)[self["file"]]


def window_name(grid: GridFile, size: int, row: int, col: int) -> str:
    """A window's name: its file's stem for the one window of a tile, else
    ``<stem>_r<row>_c<col>``."""
    stem = Path(grid.path).stem
    tile = grid.height < 2 * size and grid.width < 2 * size and row == 0 and col == 0
    return stem if tile else f"{stem}_r{row}_c{col}"


def file_identity(path: Path) -> list[str | int]:
    """What says a file is unchanged: its resolved path, inode, size, and modification and
    status-change times (a file rewritten in place within the clock's resolution still gets
    a new status-change time or inode)."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def index_key(paths: Sequence[Path], settings: Mapping[str, Any]) -> str:
    """The cache key of an index over ``paths`` built with ``settings``."""
    payload = {
        "version": INDEX_VERSION,
        "files": [file_identity(path) for path in paths],
        "settings": dict(settings),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def build_index(
    files: Sequence[GridFile],
    size: int,
    read_strip: Callable[[int, int], Strip],
    describe: Callable[[int, int, int, Strip], Mapping[str, Any] | str],
    *,
    quiet: bool = False,
    desc: str = "indexing windows",
) -> WindowIndex:
    """Visit every lattice window of every file, a strip of ``size`` rows at a time.

    ``read_strip(file_no, row)`` reads rows ``row .. row + size`` of that file (in whatever
    form the task needs); ``describe(file_no, row, col, strip)`` returns the window's
    columns (numbers, or text, which is stored as codes), or the reason it is left out. A
    ``DataError`` from either leaves the whole file out; so does a file without a usable
    window. Either is recorded in ``problems``.
    """
    total = sum((f.height // size) * (f.width // size) for f in files)
    parts: list[dict[str, np.ndarray]] = []
    vocabulary: dict[str, dict[str, int]] = {}
    rejected: Counter[str] = Counter()
    problems: dict[str, str] = {}
    with tqdm(total=total, desc=desc, unit="window", disable=quiet, mininterval=1.0) as bar:
        for file_no, grid in enumerate(files):
            kept: list[tuple[int, int]] = []
            rows: list[Mapping[str, Any]] = []
            reasons: Counter[str] = Counter()
            try:
                for row in range(0, grid.height - size + 1, size):
                    strip = read_strip(file_no, row)
                    for col in range(0, grid.width - size + 1, size):
                        result = describe(file_no, row, col, strip)
                        if isinstance(result, str):
                            reasons[result] += 1
                        else:
                            kept.append((row, col))
                            rows.append(result)
                    bar.update(grid.width // size)
            except DataError as error:
                problems[str(file_no)] = str(error)
                continue
            rejected.update(reasons)
            if not kept:
                problems[str(file_no)] = f"{grid.path}: {_no_window(reasons)}"
                continue
            parts.append(_columns(file_no, kept, rows, vocabulary))  # one file's, as arrays
    columns = {
        name: np.concatenate([part[name] for part in parts]) if parts else np.zeros(0, np.int32)
        for name in _names(parts)
    }
    categories = {name: tuple(codes) for name, codes in vocabulary.items()}
    return WindowIndex(size, tuple(files), columns, dict(rejected), problems, categories)


def _columns(
    file_no: int,
    kept: list[tuple[int, int]],
    rows: list[Mapping[str, Any]],
    vocabulary: dict[str, dict[str, int]],
) -> dict[str, np.ndarray]:
    """One file's windows as arrays; text becomes codes into ``vocabulary`` (extended)."""
    position = np.array(kept, dtype=np.int32)
    out = {
        "file": np.full(len(kept), file_no, dtype=np.int32),
        "row": position[:, 0],
        "col": position[:, 1],
    }
    for name in rows[0]:
        values = [row[name] for row in rows]
        if isinstance(values[0], str):
            codes = vocabulary.setdefault(name, {})
            out[name] = np.array([codes.setdefault(v, len(codes)) for v in values], np.int32)
        else:
            out[name] = np.asarray(values)
    return out


def _names(parts: list[dict[str, np.ndarray]]) -> list[str]:
    return list(parts[0]) if parts else ["file", "row", "col"]


def _no_window(reasons: Counter[str]) -> str:
    """Why a file gave no window: the one reason, or each with its count."""
    if len(reasons) == 1:
        return next(iter(reasons))
    listed = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
    return f"no usable window ({listed})"


def cached_index(key: str, build: Callable[[], WindowIndex]) -> WindowIndex:
    """The index stored under ``key``, built and stored first if there is none.

    Stored as one ``.npz`` (no pickles: read back with ``allow_pickle=False``) written to a
    temporary name and renamed, so concurrent processes never read half an index.
    """
    path = index_folder() / f"{key}.npz"
    if path.is_file():
        try:
            index = _load(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # damaged or from another layout: build it again
        else:
            with contextlib.suppress(OSError):  # a read-only cache is still read
                os.utime(path)  # recently used: pruned last
            return index
    index = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(descriptor)
    staged = Path(name)
    try:
        with staged.open("wb") as stream:
            np.savez(stream, **_stored(index))
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    _prune(path.parent)
    return index


def index_folder() -> Path:
    """Where indexes are kept: ``<cache_root()>/windows``."""
    return cache_root() / "windows"


def _prune(folder: Path) -> None:
    """Keep the ``KEPT_INDEXES`` most recently used indexes: a changed file or setting leaves
    its old index behind."""
    stored = sorted(folder.glob("*.npz"), key=_last_used, reverse=True)
    for old in stored[KEPT_INDEXES:]:
        old.unlink(missing_ok=True)


def _last_used(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:  # pruned by another process meanwhile
        return 0


def _stored(index: WindowIndex) -> dict[str, np.ndarray]:
    meta = {
        "version": INDEX_VERSION,
        "size": index.size,
        "files": [attrs.asdict(f) for f in index.files],
        "rejected": index.rejected,
        "problems": index.problems,
        "categories": index.categories,
        "columns": list(index.columns),
    }
    columns = {f"column_{name}": np.asarray(values) for name, values in index.columns.items()}
    return {"meta": np.array(json.dumps(meta)), **columns}


def _load(path: Path) -> WindowIndex:
    with np.load(path, allow_pickle=False) as stored:
        meta = json.loads(str(stored["meta"]))
        if meta["version"] != INDEX_VERSION:
            raise ValueError("another index layout")
        columns = {name: stored[f"column_{name}"] for name in meta["columns"]}
    files = tuple(GridFile(**{**f, "transform": tuple(f["transform"])}) for f in meta["files"])
    categories = {name: tuple(labels) for name, labels in meta["categories"].items()}
    return WindowIndex(meta["size"], files, columns, meta["rejected"], meta["problems"], categories)
