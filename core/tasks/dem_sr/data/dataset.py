"""Windows of elevation rasters of any size as (LR, HR) training pairs with masks, terrain
labels and units.

``--data`` may be one GeoTIFF, a folder of them, or both mixed: a 48 x 48 tile is a raster
that holds one window, a national mosaic one that holds millions. The window index
(``core.data.window_index``) checks, labels and places every window once, reading a strip of
rows at a time, and is cached; the dataset then reads one window per sample, so memory stays
flat in the size of the rasters and samplers know every window's terrain before the first
batch. A bad file is reported when the index is built, not in a worker mid-epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.windows import Window
from torch.utils.data import Dataset

from core.config import DataSection
from core.data.datasets import SkippedFiles
from core.data.geotiff import (
    ELEVATION_RANGE_M,
    GEOTIFF_ONLY,
    cell_size_m,
    gdal_cache,
    implausible,
    lonlat_bounds,
    mask_implausible,
    open_dem,
    read_elevation,
)
from core.data.rasters import GDAL_CACHE_MB, OpenRasters
from core.data.spatial_split import split_folders, split_windows
from core.data.window_index import (
    GridFile,
    WindowIndex,
    build_index,
    cached_index,
    index_key,
    window_name,
)
from core.errors import DataError
from core.tasks.dem_sr.data import labels
from core.tasks.dem_sr.data.labels import explain_label, name_in_tile_id, terrain_stats
from core.tasks.dem_sr.data.regions import COLORADO_REGIONS, GLOBE_REGIONS, SRTM_REGIONS, Region
from core.tasks.dem_sr.terrain import TERRAINS, terrain_index

MIN_STD_M = 1.0
"""Floor of the per-window std, so near-flat windows are not blown up into noise."""
MIN_VALID_FRACTION = 0.5
"""A window needs at least this share of valid HR cells: a window that is mostly sea or void
teaches the model little and its few cells would weigh as much as a whole window's."""
LABELLER_VERSION = 1
"""Bump when the code that labels a window changes; its settings are in the index key by
value (``labelling_rules``)."""
NAMED_REGIONS: tuple[Region, ...] = (*SRTM_REGIONS, *GLOBE_REGIONS, *COLORADO_REGIONS)


class TileDataset(Dataset):
    """HR windows and their LR counterparts, normalised by the window's LR mean and its LR
    std or one ``global_scale_m`` (``normalisation``).

    Build with ``from_folder``. ``terrains`` (an array), ``tile_ids``, ``regions``,
    ``landscapes`` and ``paths`` (lists, made when asked for) are aligned with the sample
    positions; ``skipped`` lists ``(path, reason)`` for files left out. Per window it holds
    only its position in the index and its terrain, so memory stays flat in the data's size.
    """

    def __init__(
        self,
        index: WindowIndex,
        positions: np.ndarray,
        scale: int,
        skipped: list[tuple[str, str]],
        lr_paths: tuple[str | None, ...],
        global_scale_m: float | None = None,
    ) -> None:
        self.index = index
        self.global_scale_m = global_scale_m
        self._positions = np.asarray(positions, dtype=np.int64)
        self.scale = scale
        self.skipped = skipped
        self._lr_paths = lr_paths
        self._rasters = OpenRasters()
        self.terrains: np.ndarray = index["terrain"][self._positions].astype(np.int64)

    @property
    def tile_ids(self) -> list[str]:
        return [self._tile_id(int(p)) for p in self._positions]

    @property
    def regions(self) -> list[str]:
        """Each window's named box, else its raster's name (``landscapes``)."""
        return self.index.text("region", self._positions)

    @property
    def landscapes(self) -> list[str]:
        """Each window's raster by its ``landscape`` or ``region`` tag, else its file name."""
        return [self.index.files[f].name for f in self.index["file"][self._positions]]

    @property
    def paths(self) -> list[Path]:
        return [Path(self.index.files[f].path) for f in self.index["file"][self._positions]]

    def _tile_id(self, position: int) -> str:
        """The file's stem, with the window's row and column where the file holds several."""
        grid = self.index.files[self.index["file"][position]]
        return window_name(
            grid, self.index.size, self.index["row"][position], self.index["col"][position]
        )

    @classmethod
    def from_folder(
        cls,
        data: Path | Sequence[Path],
        scale: int,
        *,
        tile_size: int = 48,
        strict: bool = False,
        quiet: bool = True,
        global_scale_m: float | None = None,
    ) -> TileDataset:
        """Every ``tile_size`` window of a GeoTIFF, of every ``*.tif``/``*.tiff`` under a
        folder (recursive, sorted), or of a list of either.

        LR windows are ``scale`` x ``scale`` block means of HR, unless a folder has ``hr/``
        and ``lr/`` subfolders with the same file names, which are then read as pairs. A bad
        file is skipped with a warning, or raises ``DataError`` when ``strict``.
        ``global_scale_m``: normalise every window by this scale instead of its own std.
        """
        if scale < 1:
            raise DataError(f"scale must be a positive integer, got {scale}")
        if tile_size % scale:
            raise DataError(
                f"data.tile_size {tile_size} is not a multiple of data.scale {scale}: an LR "
                "window must cover whole HR cells"
            )
        hr_paths, lr_paths = _rasters(data)
        problems: dict[Path, DataError] = {}
        files: list[GridFile] = []
        lr_of: list[str | None] = []
        for path, lr_path in zip(hr_paths, lr_paths, strict=True):
            try:
                files.append(_grid(path, lr_path, scale, tile_size))
                lr_of.append(str(lr_path) if lr_path else None)
            except DataError as error:
                problems[path] = error
        if not files:
            _report(problems, hr_paths, strict)
            raise DataError(f"{_named(data)}: none of the {len(hr_paths)} GeoTIFF files is usable")
        settings = {
            "size": tile_size,
            "scale": scale,
            "strict": strict,
            "lr": lr_of,
            "rules": labelling_rules(),
        }
        paths = [Path(f.path) for f in files] + [Path(p) for p in lr_of if p]
        indexer = _Indexer(files, lr_of, scale, tile_size, strict)
        with _one_torch_thread():
            index = cached_index(
                index_key(paths, settings),
                lambda: build_index(
                    files,
                    tile_size,
                    indexer.read_strip,
                    indexer.describe,
                    quiet=quiet,
                    desc=f"indexing {tile_size}x{tile_size} windows",
                ),
            )
        for file_no, problem in index.problems.items():
            problems[Path(files[int(file_no)].path)] = DataError(problem)
        skipped = _report(problems, hr_paths, strict)
        if not len(index):
            raise DataError(f"{_named(data)}: none of the {len(hr_paths)} GeoTIFF files is usable")
        return cls(index, np.arange(len(index)), scale, skipped, tuple(lr_of), global_scale_m)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TileDataset:
        """A view on some samples (positions in this dataset), renumbered from 0."""
        chosen = self._positions[np.asarray(indices, dtype=np.int64)]
        return TileDataset(
            self.index, chosen, self.scale, self.skipped, self._lr_paths, self.global_scale_m
        )

    def bounds(self) -> np.ndarray:
        """``[N, 4]`` (left, bottom, right, top) of every sample's window, in its CRS."""
        return self.index.bounds()[self._positions]

    def crs(self) -> np.ndarray:
        return self.index.window_crs()[self._positions]

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        position = int(self._positions[idx])
        hr, lr = self._read(position)
        lr_valid = np.isfinite(lr)
        mean, std = normalisation(lr, self.global_scale_m)
        mask = np.isfinite(hr)
        return {
            "lr": torch.from_numpy(((np.where(lr_valid, lr, mean) - mean) / std)[None]).float(),
            "hr": torch.from_numpy(((np.where(mask, hr, mean) - mean) / std)[None]).float(),
            "mask": torch.from_numpy(mask[None]),
            "terrain": torch.tensor(self.terrains[idx], dtype=torch.int64),
            "tile_id": self._tile_id(position),
            "region": self.index.categories["region"][self.index["region"][position]],
            "idx": int(idx),
            "mean": torch.tensor(mean, dtype=torch.float32),
            "std": torch.tensor(std, dtype=torch.float32),
            "cell_size": torch.tensor(
                [self.index["cell_dy"][position], self.index["cell_dx"][position]],
                dtype=torch.float32,
            ),
        }

    def _read(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """HR and LR of one window, in metres with NaN voids."""
        file_no = int(self.index["file"][position])
        window = self.index.window(position)
        with gdal_cache(GDAL_CACHE_MB):
            hr = _plausible(
                read_elevation(self._rasters.get(self.index.files[file_no].path), window)
            )
            lr_path = self._lr_paths[file_no]
            lr = (
                block_mean(hr, self.scale)
                if lr_path is None
                else _plausible(
                    read_elevation(self._rasters.get(lr_path), _scaled(window, self.scale))
                )
            )
        return hr, lr


class _Indexer:
    """What the window index needs of DEM rasters: strips of HR (and LR) rows, and each
    window's validity, terrain label, region and cell size."""

    def __init__(
        self, files: list[GridFile], lr_of: list[str | None], scale: int, size: int, strict: bool
    ) -> None:
        self.files = files
        self.lr_of = lr_of
        self.scale = scale
        self.size = size
        self.strict = strict
        self._regions: dict[int, list[Region]] = {}

    def read_strip(self, file_no: int, row: int) -> tuple[np.ndarray, np.ndarray | None]:
        grid, lr_path = self.files[file_no], self.lr_of[file_no]
        strip = Window(0, row, grid.width, self.size)
        try:
            with gdal_cache(GDAL_CACHE_MB), rasterio.Env(**GEOTIFF_ONLY):
                with rasterio.open(grid.path, driver="GTiff") as ds:
                    hr = read_elevation(ds, strip)
                lr = None
                if lr_path is not None:
                    with rasterio.open(lr_path, driver="GTiff") as ds:
                        lr = read_elevation(ds, _scaled(strip, self.scale))
        except RasterioError as error:
            raise DataError(
                f"{grid.path}: not a readable GeoTIFF (rows {row} to {row + self.size}: "
                f"{error.__cause__ or error})"
            ) from error
        mask_implausible(hr, grid.path, strict=self.strict)
        if lr is not None:
            mask_implausible(lr, lr_path, strict=self.strict)
        return hr, lr

    def describe(
        self, file_no: int, row: int, col: int, strip: tuple[np.ndarray, np.ndarray | None]
    ) -> dict[str, Any] | str:
        grid, size, scale = self.files[file_no], self.size, self.scale
        hr = strip[0][:, col : col + size]
        valid = float(np.isfinite(hr).mean())
        if valid == 0.0:
            return "every pixel is nodata"
        if valid < MIN_VALID_FRACTION:
            return f"less than {MIN_VALID_FRACTION:.0%} of the cells are valid"
        lr = (
            block_mean(hr, scale)
            if strip[1] is None
            else strip[1][:, col // scale : (col + size) // scale]
        )
        if not np.isfinite(lr).any():
            return "no LR cell is valid (every block touches nodata)"
        transform = grid.affine @ Affine.translation(col, row)
        cell_size = cell_size_m(transform, grid.crs, (size, size))
        window_id = window_name(grid, size, row, col)
        named = name_in_tile_id(window_id)
        tile = window_id == Path(grid.path).stem
        region = None
        if named in TERRAINS or (tile and named):  # the user's word, or a tile's region
            name = window_id
        else:  # a raster of many windows is no one region: a box holding the window, if any
            region = self._region(file_no, transform)
            name = region.name if region else ""
        stats = terrain_stats(hr, cell_size)
        label = explain_label(name, hr, cell_size, stats)
        return {
            "region": region.name if region else grid.name,
            "terrain": np.int8(terrain_index(label.category)),
            "label": label.source,
            "relief_m": np.float32(stats.relief_m),
            "roughness_m": np.float32(stats.roughness_m),
            "mean_slope_deg": np.float32(stats.mean_slope_deg),
            "cell_dy": np.float32(cell_size[0]),
            "cell_dx": np.float32(cell_size[1]),
            "valid": np.float32(valid),
        }

    def _region(self, file_no: int, transform: Affine) -> Region | None:
        """The named box (``regions.py``) that holds the whole window, if any; only boxes
        that meet the file are tried, so most files cost no per-window transform."""
        grid = self.files[file_no]
        crs = CRS.from_user_input(grid.crs)
        if file_no not in self._regions:
            west, south, east, north = lonlat_bounds(grid.affine, crs, (grid.height, grid.width))
            self._regions[file_no] = [
                r
                for r in NAMED_REGIONS
                if r.south < north and south < r.north and r.west < east and west < r.east
            ]
        if not self._regions[file_no]:
            return None
        west, south, east, north = lonlat_bounds(transform, crs, (self.size, self.size))
        return next(
            (r for r in self._regions[file_no] if r.contains(south, north, west, east)), None
        )


def _report(problems: dict[Path, DataError], paths: list[Path], strict: bool) -> list:
    """Warn about (or, ``strict``, raise) each file left out, in the files' order."""
    skipped = SkippedFiles(strict)
    for path in paths:
        if path in problems:
            skipped.add(path, problems[path])
    return skipped.entries


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """One torch thread while windows are described: a window's slope is a tiny convolution,
    for which torch's thread pool costs far more than it saves (twenty times more on a busy
    machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def labelling_rules() -> str:
    """A digest of everything that decides a window's label: the thresholds, the margin, the
    canyon shape, the region names and boxes, the plausible elevations. Part of the index
    key, so changing any of them rebuilds the indexes."""
    rules = (
        LABELLER_VERSION,
        labels.REGIONS,
        labels.DEM_THRESHOLDS,
        labels.HINT_SPANS,
        labels.OVERRULE_FACTOR,
        labels.CANYON_TOP_QUARTER_AREA,
        labels.CANYON_SKEWNESS,
        NAMED_REGIONS,
        ELEVATION_RANGE_M,
        MIN_VALID_FRACTION,
    )
    return hashlib.sha256(repr(rules).encode()).hexdigest()[:16]


def _plausible(elevation: np.ndarray) -> np.ndarray:
    """Values no terrain has as voids, in place, before any block mean sees them (the index
    reported them when it was built)."""
    elevation[implausible(elevation)] = np.nan
    return elevation


def _scaled(window: Window, scale: int) -> Window:
    return Window(
        window.col_off // scale, window.row_off // scale, window.width // scale,
        window.height // scale,
    )  # fmt: skip


def _grid(path: Path, lr_path: Path | None, scale: int, size: int) -> GridFile:
    """The grid of one raster, checked: readable, one band, a CRS, at least one window, and
    a paired LR raster exactly ``scale`` times smaller."""
    with open_dem(path) as ds:
        tags = ds.tags()
        name = tags.get("landscape") or tags.get("region") or path.stem
        grid = GridFile(
            str(path), ds.height, ds.width, tuple(ds.transform)[:6], ds.crs.to_string(), name
        )
    if grid.affine.b or grid.affine.d:
        raise DataError(
            f"{path}: a rotated or sheared grid; windows need north-up cells (warp it first, "
            "e.g. gdalwarp)"
        )
    if grid.height < size or grid.width < size:
        raise DataError(
            f"{path}: {grid.height} x {grid.width} cells is smaller than one {size} x {size} "
            "window; set data.tile_size to the tiles' size"
        )
    if lr_path is not None:
        if not lr_path.is_file():
            raise DataError(f"{path}: no matching LR file {lr_path}")
        with open_dem(lr_path) as ds:
            lr_shape = (ds.height, ds.width)
        if (lr_shape[0] * scale, lr_shape[1] * scale) != (grid.height, grid.width):
            raise DataError(
                f"{path} is {(grid.height, grid.width)} but {lr_path} is {lr_shape}; at scale "
                f"{scale} the LR raster must be exactly HR / {scale}"
            )
    return grid


def _rasters(data: Path | Sequence[Path]) -> tuple[list[Path], list[Path | None]]:
    """HR rasters and their paired LR rasters (None: block means) of a file, a folder or a
    list of either."""
    hr: list[Path] = []
    lr: list[Path | None] = []
    for item in [data] if isinstance(data, str | Path) else data:
        item = Path(item)
        if item.is_dir():
            paired = (item / "hr").is_dir() and (item / "lr").is_dir()
            root = item / "hr" if paired else item
            found = _geotiffs(root)
            if not found:
                raise DataError(f"{item}: no .tif or .tiff files found")
            hr.extend(found)
            lr.extend(item / "lr" / p.relative_to(root) if paired else None for p in found)
        elif item.is_file() or item.is_symlink():
            hr.append(item)
            lr.append(None)
        else:
            raise DataError(f"{item}: not a GeoTIFF or a folder of GeoTIFFs")
    return hr, lr


def _named(data: Path | Sequence[Path]) -> str:
    return str(data) if isinstance(data, str | Path) else ", ".join(map(str, data))


def normalisation(lr: np.ndarray, global_scale_m: float | None = None) -> tuple[float, float]:
    """Mean and scale of a window's valid LR cells, in metres: the std (floored at
    ``MIN_STD_M``), or ``global_scale_m`` for every window (``data.normalisation``).

    Only the LR is known at inference, so LR and HR are both normalised with these; a window
    without a valid cell gets (0, ``MIN_STD_M``). The mean stays per window either way: a
    window's height above the sea says nothing of its shape.
    """
    valid = np.isfinite(lr)
    if not valid.any():
        return 0.0, global_scale_m or MIN_STD_M
    if global_scale_m is not None:
        return float(lr[valid].mean()), global_scale_m
    return float(lr[valid].mean()), max(float(lr[valid].std()), MIN_STD_M)


def load_split(
    data_path: Path, data: DataSection, seed: int, *, quiet: bool = True
) -> tuple[TileDataset, TileDataset]:
    """Training and validation windows of ``data_path``.

    A folder with ``train/`` and ``val/`` subfolders is split already (the built-in sources
    hold out a spatially separate block). Anything else is split spatially
    (``core.data.spatial_split``): by ``data.val_regions`` when given, else by seeded blocks
    of ``data.val_block`` windows, with a one-window buffer either way.
    """
    settings: dict[str, Any] = {
        "tile_size": data.tile_size or 48,
        "strict": data.strict,
        "quiet": quiet,
        "global_scale_m": data.global_scale,
    }
    if folders := split_folders(Path(data_path), data):
        train, val = (TileDataset.from_folder(folder, data.scale, **settings) for folder in folders)
        train.skipped.extend(val.skipped)
        return train, val
    dataset = TileDataset.from_folder(data_path, data.scale, **settings)
    split = split_windows(dataset, data, seed)
    if not quiet:
        print(
            f"spatial split: {len(split.train)} training and {len(split.val)} validation "
            f"windows; {len(split.buffer)} training windows within one window of validation "
            "left out",
            flush=True,
        )
    return dataset.subset(split.train), dataset.subset(split.val)


def _geotiffs(folder: Path) -> list[Path]:
    """GeoTIFF files under ``folder``, recursively, in a stable order; a symbolic link that
    points nowhere is kept, so reading it reports it instead of dropping it silently."""
    suffixes = {".tif", ".tiff"}
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in suffixes and (p.is_file() or (p.is_symlink() and not p.exists()))
    )


def block_mean(elevation: np.ndarray, scale: int) -> np.ndarray:
    """Mean of each ``scale`` x ``scale`` block; NaN if any cell of the block is NaN."""
    h, w = elevation.shape[0] // scale, elevation.shape[1] // scale
    blocks = elevation[: h * scale, : w * scale].reshape(h, scale, w, scale)
    return blocks.mean(axis=(1, 3), dtype=np.float64).astype(np.float32)
