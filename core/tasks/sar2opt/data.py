"""Co-registered Sentinel-1 GRD / Sentinel-2 L2A pairs of any size for SAR->optical translation.

A folder holds ``S1GRD/<name>.tif`` (VV, VH backscatter in dB) and ``S2L2A/<name>.tif`` (12 L2A
bands, reflectance DN on the 0..10000 scale), paired by file name. As with the DEM task's
rasters, a pair is a raster of windows: the window index (``core.data.window_index``) checks
both files of every pair from their headers (co-registration, bands, room for one window),
reads them once a strip at a time to record each window's share of valid pixels, and is
cached; a sample is then one windowed read of each file. A 10,000 x 10,000 scene pair trains
without cutting, and memory does not grow with the data. Training adds seeded crops of the
windows (``PairDataset.with_crops``); validation reads the fixed windows.

Both modalities are standardised with fixed per-band statistics (TerraMind's pretraining
ones), not per window: the pretrained encoder expects inputs on the scale it was trained on,
and a prediction must map back to absolute reflectance. Invalid pixels (nodata, not finite,
optical 0 DN) are filled and masked (``sample["mask"]``), never a reason to drop a pair.

``ensure_default_pairs`` writes the embedded default data: procedural pairs in which SAR and
optical are two sensors looking at one land-cover map and one relief, so the translation has a
physical answer a model can learn, and tests can check that the answer is there.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import rasterio
import torch
from affine import Affine
from numpy.typing import ArrayLike
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.io import DatasetReader
from rasterio.windows import Window
from torch.utils.data import Dataset

from core.config import DataSection
from core.data.cache import build_once, cache_root, read_manifest
from core.data.datasets import SkippedFiles
from core.data.geotiff import gdal_cache, geotiff_profile, open_geotiff, require_file
from core.data.noise import power_law_noise
from core.data.rasters import GDAL_CACHE_MB, OpenRasters
from core.data.spatial_split import split_folders, split_windows
from core.data.window_index import (
    GridFile,
    WindowIndex,
    build_index,
    cached_index,
    file_identity,
    index_key,
    window_name,
)
from core.errors import DataError
from core.tasks.sar2opt.config import PairsSection

SAR_BANDS = ("VV", "VH")
"""Sentinel-1 GRD polarisations, backscatter (sigma0) in dB."""
OPTICAL_BANDS = (
    "B01",
    "B02",
    "B03",
    "B04",
    "B05",
    "B06",
    "B07",
    "B08",
    "B8A",
    "B09",
    "B11",
    "B12",
)
"""Sentinel-2 L2A bands in TerraMind's order, reflectance DN (10000 = reflectance 1)."""
SAR_DIR, OPTICAL_DIR = "S1GRD", "S2L2A"
MULTIPLE = 32
"""Window sides must be multiples of this: TerraMind's diffusion decoder needs it."""
DEFAULT_TILE_SIZE = 64
"""The window side when ``data.tile_size`` is 0."""
LAYOUT = (
    f"expected {SAR_DIR}/<name>.tif ({len(SAR_BANDS)} bands: {', '.join(SAR_BANDS)} in dB) and "
    f"{OPTICAL_DIR}/<name>.tif ({len(OPTICAL_BANDS)} bands: {' '.join(OPTICAL_BANDS)}, "
    "reflectance DN), paired by file name"
)


def _read_only(values: ArrayLike) -> np.ndarray:
    array = np.array(values, dtype=np.float64)
    array.setflags(write=False)
    return array


@attrs.frozen(eq=False)
class Standardisation:
    """Per-band mean/std used to standardise both modalities (TerraMind's pretraining statistics).

    One set for the whole dataset, so standardised values keep their physical meaning across
    tiles and a prediction destandardises to absolute reflectance.
    """

    sar_mean: np.ndarray = attrs.field(converter=_read_only)  # [2] dB
    sar_std: np.ndarray = attrs.field(converter=_read_only)  # [2] dB
    optical_mean: np.ndarray = attrs.field(converter=_read_only)  # [12] DN
    optical_std: np.ndarray = attrs.field(converter=_read_only)  # [12] DN

    def __attrs_post_init__(self) -> None:
        for name, bands in (
            ("sar_mean", SAR_BANDS),
            ("sar_std", SAR_BANDS),
            ("optical_mean", OPTICAL_BANDS),
            ("optical_std", OPTICAL_BANDS),
        ):
            value = getattr(self, name)
            if value.shape != (len(bands),) or not np.isfinite(value).all():
                raise ValueError(
                    f"{name} needs {len(bands)} finite values ({', '.join(bands)}), got {value}"
                )
            if name.endswith("std") and (value <= 0).any():
                raise ValueError(f"{name} must be positive, got {value}")


TERRAMIND_V1 = Standardisation(
    sar_mean=(-12.599, -20.293),
    sar_std=(5.195, 5.890),
    optical_mean=(
        1390.458,
        1503.317,
        1718.197,
        1853.91,
        2199.1,
        2779.975,
        2987.011,
        3083.234,
        3132.22,
        3162.988,
        2424.884,
        1857.648,
    ),
    optical_std=(
        2106.761,
        2141.107,
        2038.973,
        2134.138,
        2085.321,
        1889.926,
        1820.257,
        1871.918,
        1753.829,
        1797.379,
        1434.261,
        1334.311,
    ),
)
"""TerraMind v1 pretraining statistics (``untok_sen1grd@224``, ``untok_sen2l2a@224``)."""


MIN_VALID = 0.9
"""Default share of valid pixels a window needs (``[pairs] min_valid``)."""
DARK_DN = 1000.0
"""The size of ESA's L2A offset (``BOA_ADD_OFFSET`` = -1000 since processing baseline 04.00):
an offset product stores reflectance 0 as 1000 DN, so almost none of its values lie below."""
OFFSET_LOOK = 0.01
"""A product whose valid optical values lie below ``DARK_DN`` less often than this looks
offset: without the offset, water, shadow and the blue bands of vegetation (a few hundred
DN) put far more of a scene there."""
INDEX_RULES = "pairs-v1"
"""Part of the index key: change it when what the index records about a window changes."""


@attrs.frozen(eq=False)
class _Pairs:
    """The window index of a folder of pairs and how its windows are read: shared by a
    dataset and all its subsets, and all a DataLoader worker receives (no pixels)."""

    index: WindowIndex
    optical_paths: tuple[str, ...]
    """Aligned with ``index.files``, whose paths are the pairs' SAR files."""
    stats: Standardisation
    l2a_offset: float
    min_valid: float
    rasters: OpenRasters = attrs.field(factory=OpenRasters)

    def read(self, file_no: int, row: int, col: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SAR dB ``[2, s, s]``, optical DN ``[12, s, s]`` (as stored) and validity ``[s, s]``
        of the window whose top-left cell is (``row``, ``col``)."""
        size = self.index.size
        path = self.index.files[file_no].path
        return _read_pair(
            self.rasters, path, self.optical_paths[file_no], Window(col, row, size, size)
        )


@attrs.frozen(eq=False)
class _Views:
    """Where each sample is read: its window in the index, the top-left cell it actually
    starts at (a crop moves it), and whether it is flipped north-south."""

    window: np.ndarray
    row: np.ndarray
    col: np.ndarray
    flip: np.ndarray

    def __len__(self) -> int:
        return len(self.window)

    def take(self, indices: np.ndarray) -> _Views:
        return _Views(*(values[indices] for values in attrs.astuple(self, recurse=False)))

    def join(self, other: _Views) -> _Views:
        return _Views(
            *(
                np.concatenate([mine, theirs])
                for mine, theirs in zip(
                    attrs.astuple(self, recurse=False),
                    attrs.astuple(other, recurse=False),
                    strict=True,
                )
            )
        )


class PairDataset(Dataset):
    """Standardised (SAR, optical) windows of co-registered pairs of any size, with a mask
    of the valid pixels.

    Build with ``from_folder``. The index lists every window once; a sample is read from
    disk when it is asked for, so memory does not grow with the scenes. ``names``,
    ``regions`` and ``terrains`` (all 0: samplers and the split group by terrain) are
    aligned with the samples; ``skipped`` lists ``(path, reason)`` for pairs left out, the
    path being the pair's S1GRD file (its S2L2A file when there is no SAR), and one entry
    for the folder when windows were left out or pixels masked.
    """

    def __init__(self, pairs: _Pairs, views: _Views, skipped: list[tuple[str, str]]) -> None:
        self._pairs = pairs
        self._views = views
        self.stats = pairs.stats
        self.skipped = skipped
        index = pairs.index
        files = index["file"][views.window]
        self.names = [
            _view_name(index, f, r, c, flip)
            for f, r, c, flip in zip(files, views.row, views.col, views.flip, strict=True)
        ]
        self.regions = [index.files[f].name for f in files]
        self.landscapes = self.regions  # a pair is its own landscape
        self.terrains = np.zeros(len(views), dtype=np.int64)

    @classmethod
    def from_folder(
        cls,
        folder: Path,
        stats: Standardisation,
        *,
        size: int,
        strict: bool = False,
        l2a_offset: float = 0.0,
        min_valid: float = MIN_VALID,
        quiet: bool = True,
    ) -> PairDataset:
        """Every ``size`` x ``size`` window of every pair ``folder/S1GRD/<name>.tif`` and
        ``folder/S2L2A/<name>.tif``, indexed once (cached) and read when a sample is asked
        for; ``l2a_offset`` is subtracted from the optical DN (1000 undoes ESA's offset).

        A bad pair is skipped with a warning, or raises ``DataError`` when ``strict``; a
        missing subfolder, a ``size`` that is not a multiple of 32, or no usable window at
        all always raises. Unless ``quiet``, prints what was left out or masked.
        """
        folder = Path(folder)
        check_window_size(size)
        if not folder.is_dir():
            raise DataError(f"{folder}: not a folder of SAR/optical pairs; {LAYOUT}")
        for sub in (SAR_DIR, OPTICAL_DIR):
            if not (folder / sub).is_dir():
                raise DataError(f"{folder}: no {sub}/ subfolder; {LAYOUT}")
        sar_files = _geotiffs(folder / SAR_DIR)
        optical_files = _geotiffs(folder / OPTICAL_DIR)
        names = sorted(sar_files.keys() | optical_files.keys())
        if not names:
            raise DataError(f"{folder}: no .tif or .tiff files in {SAR_DIR}/ or {OPTICAL_DIR}/")

        skipped = SkippedFiles(strict)
        files: list[GridFile] = []
        optical_paths: list[str] = []
        offset_notes: list[str | None] = []
        for name in names:
            sar_path, optical_path = sar_files.get(name), optical_files.get(name)
            if optical_path is None:
                skipped.add(
                    sar_path, DataError(f"{sar_path}: no {OPTICAL_DIR}/{name} to pair with")
                )
            elif sar_path is None:
                skipped.add(
                    optical_path, DataError(f"{optical_path}: no {SAR_DIR}/{name} to pair with")
                )
            else:
                try:
                    grid, note = _pair_grid(sar_path, optical_path, size)
                except DataError as error:
                    skipped.add(sar_path, error)
                    continue
                files.append(grid)
                optical_paths.append(str(optical_path))
                offset_notes.append(note)
        if not files:
            raise DataError(f"{folder}: none of the {len(names)} pairs is usable")

        indexer = _Indexer(files, optical_paths, size, min_valid)
        settings = {
            "size": size,
            "min_valid": min_valid,
            "optical": optical_paths,
            "rules": INDEX_RULES,
        }
        index = cached_index(
            index_key([Path(f.path) for f in files] + [Path(p) for p in optical_paths], settings),
            lambda: build_index(
                files,
                size,
                indexer.read_strip,
                indexer.describe,
                quiet=quiet,
                desc=f"indexing {size}x{size} windows of SAR/optical pairs",
            ),
        )
        for file_no, problem in sorted(index.problems.items(), key=lambda item: int(item[0])):
            skipped.add(Path(files[int(file_no)].path), DataError(problem))
        if not len(index):
            raise DataError(f"{folder}: none of the {len(names)} pairs is usable")
        if l2a_offset == 0:
            _warn_offset(index, optical_paths, offset_notes)
        entries = skipped.entries
        dropped = _dropped(index)
        if dropped:
            entries.append((str(folder), dropped))
            if not quiet:
                print(f"SAR->optical pairs in {folder}: {dropped}")
        pairs = _Pairs(index, tuple(optical_paths), stats, l2a_offset, min_valid)
        return cls(pairs, _lattice(index), entries)

    def subset(self, indices: Sequence[int] | np.ndarray) -> PairDataset:
        """A view on some samples (positions in this dataset), renumbered from 0."""
        chosen = self._views.take(np.asarray(indices, dtype=np.int64))
        return PairDataset(self._pairs, chosen, self.skipped)

    def with_crops(self, count: int, seed: int, *, flips: bool) -> PairDataset:
        """These samples, then ``count`` crops of each window that has room to move.

        A crop starts up to half a window from its window in each direction (within the
        pair), so it stays clear of the validation windows the one-window buffer keeps away;
        with ``flips``, half of them (seeded) are flipped north-south. The crops are drawn
        once from ``seed``: every epoch and every process sees the same sample at the same
        index, and the per-sample caches of the generator plugins stay valid.
        """
        index, views, size = self._pairs.index, self._views, self._pairs.index.size
        heights = np.array([f.height for f in index.files])[index["file"][views.window]]
        widths = np.array([f.width for f in index.files])[index["file"][views.window]]
        room = np.flatnonzero((heights > size) | (widths > size))
        if count == 0 or not len(room):
            return self
        rng = np.random.default_rng([seed, count])
        half = size // 2
        shape = (len(room), count)
        rows = views.row[room, None] + rng.integers(-half, half + 1, shape)
        cols = views.col[room, None] + rng.integers(-half, half + 1, shape)
        flip = rng.random(shape) < 0.5 if flips else np.zeros(shape, dtype=bool)
        crops = _Views(
            np.repeat(views.window[room], count),
            np.clip(rows, 0, heights[room, None] - size).ravel(),
            np.clip(cols, 0, widths[room, None] - size).ravel(),
            flip.ravel(),
        )
        return PairDataset(self._pairs, views.join(crops), self.skipped)

    def __len__(self) -> int:
        return len(self._views)

    def bounds(self) -> np.ndarray:
        """``[N, 4]`` (left, bottom, right, top) of every sample, in its CRS: its window of
        the lattice, moved as far as its crop moved (north-up grids, as the index's)."""
        index, views = self._pairs.index, self._views
        transforms = np.array([f.transform for f in index.files])[index["file"][views.window]]
        dx = transforms[:, 0] * (views.col - index["col"][views.window])
        dy = transforms[:, 4] * (views.row - index["row"][views.window])
        return index.bounds()[views.window] + np.stack([dx, dy, dx, dy], axis=1)

    def crs(self) -> np.ndarray:
        return self._pairs.index.window_crs()[self._views.window]

    def fingerprint(self, modality: str) -> str:
        """A hash of what this dataset's ``"sar"`` or ``"optical"`` samples are made of, in
        order: every file's path, size and modification time, every sample's window and
        flip, the standardisation and the L2A offset. What a per-sample cache computed from
        them is keyed by; it reads no pixel."""
        from core.keyed_cache import fingerprint

        pairs = self._pairs
        files = [
            file_identity(Path(path))
            for grid, optical in zip(pairs.index.files, pairs.optical_paths, strict=True)
            for path in (grid.path, optical)
        ]
        stats = (
            (pairs.stats.sar_mean, pairs.stats.sar_std)
            if modality == "sar"
            else (pairs.stats.optical_mean, pairs.stats.optical_std, pairs.l2a_offset)
        )
        return fingerprint(
            modality, pairs.index.size, pairs.min_valid, files, *stats,
            *attrs.astuple(self._views, recurse=False),
        )  # fmt: skip

    def __getitem__(self, idx: int) -> dict[str, Any]:
        pairs, views = self._pairs, self._views
        window = int(views.window[idx])
        file_no = int(pairs.index["file"][window])
        sar, optical, valid = pairs.read(file_no, int(views.row[idx]), int(views.col[idx]))
        if valid.mean() < pairs.min_valid:  # a crop reaching into voids: its checked window
            row, col = int(pairs.index["row"][window]), int(pairs.index["col"][window])
            sar, optical, valid = pairs.read(file_no, row, col)
        if views.flip[idx]:
            sar, optical, valid = sar[:, ::-1], optical[:, ::-1], valid[::-1]
        stats = pairs.stats
        return {
            "sar": torch.from_numpy(_standardise(sar, stats.sar_mean, stats.sar_std, valid)),
            "optical": torch.from_numpy(
                _standardise(
                    optical - pairs.l2a_offset, stats.optical_mean, stats.optical_std, valid
                )
            ),
            "mask": torch.from_numpy(np.ascontiguousarray(valid)[None]),
            "terrain": torch.tensor(self.terrains[idx], dtype=torch.int64),
            "idx": int(idx),
        }

    def destandardise_optical(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised optical (``[..., 12, H, W]``) back to reflectance DN, for metrics in
        physical units and for writing predictions."""
        if x.ndim < 3 or x.shape[-3] != len(OPTICAL_BANDS):
            raise ValueError(
                f"expected [..., {len(OPTICAL_BANDS)}, H, W] optical, got {tuple(x.shape)}"
            )
        mean = torch.tensor(self.stats.optical_mean, dtype=x.dtype, device=x.device)
        std = torch.tensor(self.stats.optical_std, dtype=x.dtype, device=x.device)
        return x * std[:, None, None] + mean[:, None, None]


def load_pairs(
    folder: Path, data: DataSection, pairs: PairsSection, *, quiet: bool = True
) -> tuple[PairDataset, PairDataset]:
    """Training (with ``pairs.crops`` crops per window) and validation windows of ``folder``.

    A folder with ``train/`` and ``val/`` subfolders (each in the pairs layout) is split
    already. Anything else is split spatially as the DEM task splits rasters
    (``core.data.spatial_split``): by ``data.val_regions`` (pair names) when given, else by
    seeded blocks of ``data.val_block`` windows, with a one-window buffer either way.
    """
    size = data.tile_size or DEFAULT_TILE_SIZE

    def read(path: Path) -> PairDataset:
        return PairDataset.from_folder(
            path,
            TERRAMIND_V1,
            size=size,
            strict=data.strict,
            l2a_offset=pairs.l2a_offset,
            min_valid=pairs.min_valid,
            quiet=quiet,
        )

    if folders := split_folders(Path(folder), data):
        train, val = read(folders[0]), read(folders[1])
        train.skipped.extend(val.skipped)
    else:
        dataset = read(Path(folder))
        split = split_windows(dataset, data, data.split_seed)
        train, val = dataset.subset(split.train), dataset.subset(split.val)
    return train.with_crops(pairs.crops, data.split_seed, flips=pairs.flips), val


def check_window_size(size: int) -> None:
    """TerraMind's diffusion decoder needs sides that are multiples of ``MULTIPLE``."""
    if size < MULTIPLE or size % MULTIPLE:
        raise DataError(
            f"data.tile_size must be a positive multiple of {MULTIPLE} (TerraMind's diffusion "
            f"decoder needs it), got {size}"
        )


def _lattice(index: WindowIndex) -> _Views:
    n = len(index)
    return _Views(np.arange(n), index["row"], index["col"], np.zeros(n, dtype=bool))


def _view_name(index: WindowIndex, file_no: int, row: int, col: int, flip: bool) -> str:
    """The pair's name for a file of one window, else ``<name>_r<row>_c<col>``; a flipped
    crop ends in ``_flipped``."""
    name = window_name(index.files[file_no], index.size, row, col)
    return f"{name}_flipped" if flip else name


def _geotiffs(folder: Path) -> dict[str, Path]:
    """GeoTIFF files directly in ``folder``, by file name; a symbolic link that points
    nowhere is kept, so reading it reports it instead of dropping it silently."""
    suffixes = {".tif", ".tiff"}
    return {
        p.name: p
        for p in folder.iterdir()
        if p.suffix.lower() in suffixes and (p.is_file() or (p.is_symlink() and not p.exists()))
    }


def _standardise(
    data: np.ndarray, mean: np.ndarray, std: np.ndarray, valid: np.ndarray
) -> np.ndarray:
    """Standardised bands, invalid pixels filled with 0 (the band's mean): masked out of the
    metrics, and no NaN reaches the model."""
    standard = (data - mean[:, None, None]) / std[:, None, None]
    return np.where(valid, standard, 0.0).astype(np.float32)


def _read_pair(
    rasters: OpenRasters, sar_path: str, optical_path: str, window: Window
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SAR and optical of one window as float32, and where every band of both is valid:
    not the file's nodata, finite, and (optical) not 0 DN, which L2A reserves for no data."""
    with gdal_cache(GDAL_CACHE_MB):
        sar, sar_valid = _read_bands(rasters, sar_path, window)
        optical, optical_valid = _read_bands(rasters, optical_path, window)
    return sar, optical, sar_valid & optical_valid & (optical != 0).all(axis=0)


def _read_bands(rasters: OpenRasters, path: str, window: Window) -> tuple[np.ndarray, np.ndarray]:
    try:
        ds = rasters.get(path)
        data = ds.read(window=window, out_dtype="float32")
        valid = (ds.read_masks(window=window) != 0).all(axis=0)
    except RasterioError as error:
        raise DataError(
            f"{path}: not a readable GeoTIFF (rows {window.row_off} to "
            f"{window.row_off + window.height}: {error.__cause__ or error})"
        ) from error
    return data, valid & np.isfinite(data).all(axis=0)


class _Indexer:
    """What the window index needs of a pair: strips of both files' validity (and how many
    optical values lie below ``DARK_DN``), and each window's share of valid pixels."""

    def __init__(
        self, files: list[GridFile], optical_paths: list[str], size: int, min_valid: float
    ) -> None:
        self.files = files
        self.optical_paths = optical_paths
        self.size = size
        self.min_valid = min_valid
        self.rasters = OpenRasters()

    def read_strip(self, file_no: int, row: int) -> tuple[np.ndarray, np.ndarray]:
        grid = self.files[file_no]
        window = Window(0, row, grid.width, self.size)
        _, optical, valid = _read_pair(self.rasters, grid.path, self.optical_paths[file_no], window)
        return valid, np.where(valid, (optical < DARK_DN).sum(axis=0), 0)

    def describe(
        self, file_no: int, row: int, col: int, strip: tuple[np.ndarray, np.ndarray]
    ) -> dict[str, Any] | str:
        valid = strip[0][:, col : col + self.size]
        share = float(valid.mean())
        if share == 0.0:
            return "every pixel is nodata or not finite"
        if share < self.min_valid:
            return f"fewer than {self.min_valid:.0%} of the pixels are valid"
        return {
            "valid": share,
            "invalid": int(valid.size - valid.sum()),
            "dark": int(strip[1][:, col : col + self.size].sum()),
        }


def _pair_grid(sar_path: Path, optical_path: Path, size: int) -> tuple[GridFile, str | None]:
    """The pair's grid, checked from the headers: band counts, one grid for both files (size,
    CRS, transform), a CRS, and room for one window; and what in the optical file's metadata
    says its DN carry ESA's offset, if anything."""
    for path in (sar_path, optical_path):
        require_file(path)
    with open_geotiff(sar_path) as sar, open_geotiff(optical_path) as optical:
        for path, ds, bands, kind in (
            (sar_path, sar, SAR_BANDS, SAR_DIR),
            (optical_path, optical, OPTICAL_BANDS, OPTICAL_DIR),
        ):
            if ds.count != len(bands):
                raise DataError(
                    f"{path}: has {ds.count} bands; an {kind} file needs {len(bands)} "
                    f"({', '.join(bands)})"
                )
        (height, width), other = sar.shape, optical.shape
        if (height, width) != other:
            raise DataError(
                f"{sar_path} is {height}x{width} pixels but {optical_path} is "
                f"{other[0]}x{other[1]}; SAR and optical must be co-registered on one grid"
            )
        if sar.crs != optical.crs:
            raise DataError(
                f"{sar_path} has CRS {sar.crs} but {optical_path} has {optical.crs}; "
                "SAR and optical must be co-registered on one grid"
            )
        if not sar.transform.almost_equals(optical.transform):
            raise DataError(
                f"{sar_path} and {optical_path} have different geotransforms "
                f"({tuple(sar.transform)[:6]} vs {tuple(optical.transform)[:6]}); "
                "SAR and optical must be co-registered on one grid"
            )
        if sar.crs is None:
            raise DataError(
                f"{sar_path}: has no CRS (neither has {optical_path}); the spatial split "
                "needs one (fix: rio edit-info --crs EPSG:... on both files)"
            )
        grid = GridFile(
            str(sar_path),
            height,
            width,
            tuple(sar.transform)[:6],
            sar.crs.to_string(),
            sar_path.stem,
        )
        note = _offset_note(optical)
    if height < size or width < size:
        fits = min(height, width) // MULTIPLE * MULTIPLE
        hint = (
            f"set data.tile_size to {fits} or less"
            if fits
            else f"TerraMind needs at least {MULTIPLE}x{MULTIPLE}"
        )
        raise DataError(
            f"{sar_path}: {height}x{width} pixels cannot hold one square {size}x{size} window "
            f"(data.tile_size, a multiple of {MULTIPLE}); {hint}"
        )
    return grid, note


def _offset_note(ds: DatasetReader) -> str | None:
    """The tag that says an L2A product's DN carry ESA's offset: a non-zero
    ``BOA_ADD_OFFSET`` (of the file or a band), or ``PROCESSING_BASELINE`` 04.00 or later."""
    tags = ds.tags()
    for band in ds.indexes:
        tags.update(ds.tags(band))
    for key, value in sorted(tags.items()):
        if "BOA_ADD_OFFSET" in key.upper() and _number(value):
            return f"{key}={value}"
    baseline = tags.get("PROCESSING_BASELINE", "")
    if _number(baseline) and float(baseline) >= 4.0:
        return f"PROCESSING_BASELINE={baseline}"
    return None


def _number(text: str) -> bool:
    """Whether ``text`` is a finite non-zero number."""
    try:
        return math.isfinite(value := float(text)) and value != 0
    except ValueError:
        return False


def _warn_offset(index: WindowIndex, optical_paths: list[str], notes: list[str | None]) -> None:
    """Warn about each optical file whose metadata says its DN carry ESA's -1000 offset and
    whose values look like it, while no ``[pairs] l2a_offset`` undoes it."""
    file_of = index["file"]
    values = (index.size**2 - index["invalid"]) * len(OPTICAL_BANDS)
    for file_no, note in enumerate(notes):
        mine = file_of == file_no
        if note is None or not mine.any():
            continue
        below = index["dark"][mine].sum() / values[mine].sum()
        if below < OFFSET_LOOK:
            warnings.warn(
                f"{optical_paths[file_no]}: {note} and {below:.2%} of its valid values lie "
                f"below {DARK_DN:g} DN: its DN look offset (reflectance = (DN - 1000) / "
                "10000 since processing baseline 04.00), but no offset is set; set "
                "--set pairs.l2a_offset=1000 unless the offset was removed already",
                stacklevel=3,
            )


def _dropped(index: WindowIndex) -> str:
    """The windows the index left out and the pixels it masks, in one line ("" when none);
    the pairs left out whole are listed one by one."""
    parts = []
    rejected = sum(index.rejected.values())
    if rejected:
        reasons = "; ".join(f"{count} {reason}" for reason, count in index.rejected.items())
        parts.append(
            f"{rejected} of {rejected + len(index)} windows left out ({reasons}): "
            f"{rejected * index.size**2:,} pixels"
        )
    masked = int(index["invalid"].sum())
    if masked:
        windows = int((index["invalid"] > 0).sum())
        parts.append(
            f"{masked:,} invalid pixels masked in {windows} of the {len(index)} windows kept "
            "(filled, and left out of the metrics)"
        )
    return "; ".join(parts)


# --- the embedded default pairs --------------------------------------------------------------

CACHE_VERSION = "v1"
"""Bump when the generator or the file format change, so old caches are not reused."""
DEFAULT_PAIRS = 40
SEED = 20240501
PIXEL_M = 10.0
CRS_DEFAULT = "EPSG:32632"
"""UTM zone 32N, a projected CRS in metres, as Sentinel-2 tiles use."""
LULC_DIR = "LULC"
LAND_COVER = ("water", "vegetation", "bare", "urban")
"""Classes of the land-cover map both sensors see, by their code in ``LULC/<name>.tif``."""

_REFLECTANCE_DN: dict[str, tuple[float, ...]] = {
    # B01   B02   B03   B04   B05   B06   B07   B08   B8A   B09   B11   B12
    "water": (700, 620, 560, 360, 300, 240, 210, 180, 160, 110, 60, 40),
    "vegetation": (300, 380, 700, 380, 1200, 2900, 3500, 3700, 3850, 3600, 1900, 900),
    "bare": (900, 1100, 1500, 1900, 2100, 2300, 2450, 2600, 2700, 2750, 3500, 3100),
    "urban": (1800, 1900, 2000, 2100, 2150, 2200, 2250, 2300, 2300, 2250, 2400, 2200),
}
"""Surface reflectance signatures: water dark and darkest in NIR/SWIR, vegetation with the red
edge and NIR plateau, soil brightening with wavelength, built-up surfaces bright and flat."""
_BACKSCATTER_DB: dict[str, tuple[float, float]] = {
    "water": (-22.0, -28.0),  # specular: the pulse is reflected away from the sensor
    "vegetation": (-8.0, -14.0),  # volume scattering in the canopy, strong cross-pol
    "bare": (-12.0, -20.0),  # surface scattering, weak cross-pol
    "urban": (-3.0, -9.0),  # double bounce between walls and ground
}
"""Sentinel-1 sigma0 (VV, VH) at the scene's incidence angle on flat ground."""
_BACKSCATTER_POWER = {name: 10 ** (np.array(db) / 10) for name, db in _BACKSCATTER_DB.items()}
_LOOKS = 4.0
"""Equivalent number of looks of the speckle (GRD high resolution is about 4.4)."""
_TILES_PER_ROW = 8


def ensure_default_pairs(tile_size: int = 64, *, quiet: bool = False) -> Path:
    """Write ``DEFAULT_PAIRS`` procedural pairs once; return their folder.

    The folder is ``<cache_root()>/sar2opt-<tile_size>-v1``. It holds
    ``S1GRD/``, ``S2L2A/``, ``LULC/`` (the land-cover map behind each pair) and a
    ``manifest.json``, is built in a temporary folder and renamed into place, so an interrupted
    or concurrent first run never leaves a partial dataset; a later call only reads the manifest.
    """
    check_window_size(tile_size)
    folder = cache_root() / f"sar2opt-{tile_size}-{CACHE_VERSION}"
    manifest = build_once(folder, lambda staging: _build(staging, tile_size), _read_manifest)
    if not quiet:
        fractions = ", ".join(f"{k} {v:.0%}" for k, v in manifest["land_cover_fractions"].items())
        print(
            f"SAR->optical default pairs: {folder} ({manifest['pairs']} procedural S1 GRD / "
            f"S2 L2A pairs of {tile_size}x{tile_size} at {PIXEL_M:g} m; {fractions})"
        )
    return folder


@attrs.frozen(eq=False)
class _Scene:
    """What both sensors look at: one map of the ground, shared by SAR and optical."""

    cover: np.ndarray  # [H, W] uint8 codes into LAND_COVER
    canopy: np.ndarray  # [H, W] fraction of each pixel under vegetation
    moisture: np.ndarray  # [H, W] soil wetness, zero mean, unit std
    normal: np.ndarray  # [3, H, W] unit surface normals (east, north, up)

    def where(self, *names: str) -> np.ndarray:
        """Pixels of any of the named classes."""
        return np.isin(self.cover, [LAND_COVER.index(name) for name in names])


def _default_pair(n: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Land cover ``[H, W]`` uint8, SAR ``[2, H, W]`` float32 dB and optical ``[12, H, W]``
    uint16 DN of default pair ``n``; the same ``(n, size)`` always gives the same arrays."""
    rng = np.random.default_rng([SEED, n, size])
    scene = _scene(rng, size)
    return scene.cover, _sar(rng, scene), _optical(rng, scene)


def _scene(rng: np.random.Generator, size: int) -> _Scene:
    """A lake fills the lowest ground, a settlement and patches of bare soil lie on the rest,
    vegetation covers what is left; canopy density and soil moisture vary smoothly."""
    elevation = 300 + rng.uniform(2, 12) * power_law_noise(rng, size, 4.0)  # slopes mostly < 20°
    water_fraction = 0.0 if rng.random() < 0.3 else rng.uniform(0.05, 0.3)
    level = np.quantile(elevation, water_fraction)
    water = elevation < level
    elevation = np.maximum(elevation, level)  # a flat lake surface
    urban = _patches(rng, size, ~water, rng.uniform(0.0, 0.3))
    bare = _patches(rng, size, ~water & ~urban, rng.uniform(0.1, 0.4))
    cover = np.full((size, size), LAND_COVER.index("vegetation"), dtype=np.uint8)
    for name, where in (("water", water), ("urban", urban), ("bare", bare)):
        cover[where] = LAND_COVER.index(name)
    density = power_law_noise(rng, size, 3.0)
    canopy = np.select(
        [cover == LAND_COVER.index("vegetation"), cover == LAND_COVER.index("bare")],
        [np.clip(0.85 + 0.1 * density, 0.5, 1.0), np.clip(0.1 + 0.08 * density, 0.0, 0.3)],
        0.0,
    )
    return _Scene(cover, canopy, power_law_noise(rng, size, 3.0), _surface_normal(elevation))


def _patches(
    rng: np.random.Generator, size: int, within: np.ndarray, fraction: float
) -> np.ndarray:
    """About ``fraction`` of the ``within`` pixels, as smooth blobs."""
    field = power_law_noise(rng, size, 3.5)
    if not within.any():
        return within
    return within & (field > np.quantile(field[within], 1.0 - fraction))


def _surface_normal(elevation: np.ndarray) -> np.ndarray:
    """Unit upward normals ``[3, H, W]`` as (east, north, up); row 0 is the northern edge."""
    dz_drow, dz_dcol = np.gradient(elevation, PIXEL_M)
    normal = np.stack([-dz_dcol, dz_drow, np.ones_like(elevation)])
    return normal / np.linalg.norm(normal, axis=0)


def _towards(azimuth_deg: float, zenith_deg: float) -> np.ndarray:
    """Unit vector (east, north, up) pointing at ``azimuth`` (from north), ``zenith`` off up."""
    az, zen = math.radians(azimuth_deg), math.radians(zenith_deg)
    return np.array([math.sin(zen) * math.sin(az), math.sin(zen) * math.cos(az), math.cos(zen)])


def _per_class(scene: _Scene, table: dict[str, ArrayLike]) -> np.ndarray:
    """``table[class]`` at every pixel: ``[len(values), H, W]``."""
    values = np.array([table[name] for name in LAND_COVER], dtype=np.float64)  # [classes, C]
    return np.moveaxis(values[scene.cover], -1, 0)


def _mix_canopy(scene: _Scene, table: dict[str, ArrayLike], soil: np.ndarray) -> np.ndarray:
    """Vegetated and bare pixels as canopy over soil (linear in reflectance or power); the
    other classes keep their own values."""
    canopy = np.array(table["vegetation"], dtype=np.float64)[:, None, None]
    mixed = scene.canopy * canopy + (1 - scene.canopy) * soil
    return np.where(scene.where("vegetation", "bare"), mixed, _per_class(scene, table))


def _optical(rng: np.random.Generator, scene: _Scene) -> np.ndarray:
    """Sentinel-2 L2A DN: class signatures, canopy over soil (wet soil is darker), mild
    texture, lit by a late-morning sun over the relief."""
    size = scene.cover.shape[0]
    wetness = np.clip(1 - 0.12 * scene.moisture, 0.6, 1.3)
    soil = np.array(_REFLECTANCE_DN["bare"])[:, None, None] * wetness
    reflectance = _mix_canopy(scene, _REFLECTANCE_DN, soil)
    reflectance *= 1 + 0.04 * power_law_noise(rng, size, 2.0)
    reflectance *= np.where(scene.where("urban"), 1 + 0.15 * power_law_noise(rng, size, 1.0), 1.0)
    sun = _towards(rng.uniform(135, 170), rng.uniform(30, 55))
    hillshade = np.einsum("c,chw->hw", sun, scene.normal) / sun[2]
    illumination = np.where(scene.where("water"), 1.0, np.clip(hillshade, 0.15, None))
    dn = reflectance * illumination + rng.normal(0, 15, reflectance.shape)
    return np.clip(np.rint(dn), 1, 10000).astype(np.uint16)  # 0 is L2A's nodata


def _sar(rng: np.random.Generator, scene: _Scene) -> np.ndarray:
    """Sentinel-1 GRD sigma0 in dB: class backscatter, canopy over soil in power (wet soil is
    brighter), brighter on slopes facing the radar and darker on those facing away, then
    multiplicative speckle in power."""
    size = scene.cover.shape[0]
    wetness = 10 ** (2.0 * scene.moisture / 10)  # +-2 dB
    soil = _BACKSCATTER_POWER["bare"][:, None, None] * wetness
    power = _mix_canopy(scene, _BACKSCATTER_POWER, soil)
    roughness_db = np.where(scene.where("urban"), 3.0, 1.0) * power_law_noise(rng, size, 2.0)
    power *= 10 ** (roughness_db / 10)
    incidence = rng.uniform(31, 45)  # Sentinel-1 IW swath
    look = 80.0 if rng.random() < 0.5 else 280.0  # right-looking, ascending or descending
    radar = _towards(look + 180.0, incidence)
    cos_local = np.einsum("c,chw->hw", radar, scene.normal)
    local = np.clip(np.arccos(np.clip(cos_local, -1, 1)), np.radians(10), np.radians(89))
    theta0 = math.radians(incidence)
    power *= (np.cos(local) / math.cos(theta0)) * (math.sin(theta0) / np.sin(local))
    power *= rng.gamma(_LOOKS, 1.0 / _LOOKS, power.shape)
    return (10 * np.log10(np.maximum(power, 1e-5))).astype(np.float32)


def _tile_transform(n: int, size: int) -> Affine:
    """Tiles on a grid with one-tile gaps, so every tile has its own footprint."""
    extent = size * PIXEL_M
    row, col = divmod(n, _TILES_PER_ROW)
    origin = Affine.translation(400_000 + 2 * col * extent, 5_000_000 - 2 * row * extent)
    return origin @ Affine.scale(PIXEL_M, -PIXEL_M)


def write_bands(
    path: Path,
    data: np.ndarray,
    transform: Affine,
    bands: Sequence[str],
    tags: dict[str, str],
    *,
    crs: CRS | str = CRS_DEFAULT,
) -> None:
    """A tiled, deflate-compressed multi-band GeoTIFF with named bands."""
    count, height, width = data.shape
    profile = geotiff_profile(height, width, count, data.dtype.name, crs, transform)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
        ds.descriptions = tuple(bands)
        ds.update_tags(**tags)


def _build(out: Path, tile_size: int) -> dict:
    counts = np.zeros(len(LAND_COVER), dtype=np.int64)
    for n in range(DEFAULT_PAIRS):
        cover, sar, optical = _default_pair(n, tile_size)
        counts += np.bincount(cover.ravel(), minlength=len(LAND_COVER))
        transform = _tile_transform(n, tile_size)
        tags = {"source": "terraplug procedural", "seed": str(SEED), "pair": str(n)}
        name = f"pair_{n:03d}.tif"
        write_bands(out / SAR_DIR / name, sar, transform, SAR_BANDS, tags)
        write_bands(out / OPTICAL_DIR / name, optical, transform, OPTICAL_BANDS, tags)
        codes = {f"class_{k}": c for k, c in enumerate(LAND_COVER)}
        write_bands(out / LULC_DIR / name, cover[None], transform, ["land_cover"], tags | codes)
    manifest = {
        "version": f"sar2opt-{CACHE_VERSION}",
        "source": "terraplug procedural: one land-cover map and relief per pair, seen by both",
        "seed": SEED,
        "pairs": DEFAULT_PAIRS,
        "tile_size": tile_size,
        "pixel_size_m": PIXEL_M,
        "crs": CRS_DEFAULT,
        "sar_bands": list(SAR_BANDS),
        "optical_bands": list(OPTICAL_BANDS),
        "land_cover_fractions": {
            name: float(c / counts.sum()) for name, c in zip(LAND_COVER, counts, strict=True)
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _read_manifest(folder: Path) -> dict | None:
    def complete(manifest: dict) -> bool:
        return all(
            sum(1 for _ in (folder / sub).glob("pair_*.tif")) == manifest.get("pairs")
            for sub in (SAR_DIR, OPTICAL_DIR, LULC_DIR)
        )

    return read_manifest(folder, f"sar2opt-{CACHE_VERSION}", complete)
