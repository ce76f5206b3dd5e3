"""A folder of GeoTIFF tiles as (LR, HR) training pairs with masks, terrain labels and units.

All tiles are read, checked and labelled once, when the dataset is built, and kept in memory
as stacked arrays: datasets here are small, a bad file is reported before training starts
rather than in a worker mid-epoch, and terrain labels are known without touching pixels again
(samplers group by terrain before the first batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import numpy as np
import torch
from torch.utils.data import Dataset

from core.config import DataSection
from core.data.datasets import SkippedFiles, train_val_split
from core.data.geotiff import read_dem
from core.errors import DataError
from core.tasks.dem_sr.data.labels import label_tile
from core.tasks.dem_sr.terrain import terrain_index

T = TypeVar("T", bound=tuple)

MIN_STD_M = 1.0
"""Floor of the per-tile std, so near-flat tiles are not blown up into noise."""


@attrs.frozen(eq=False)
class _Tiles:
    """Everything read from disk, shared by a dataset and all its subsets."""

    hr: np.ndarray  # [N, H, W] float32 metres, NaN = void
    lr: np.ndarray  # [N, H/s, W/s] float32 metres, NaN = void
    cell_size: np.ndarray  # [N, 2] float32 (dy, dx) of an HR cell in metres
    terrains: np.ndarray  # [N] int64
    tile_ids: list[str]
    paths: list[Path]


class TileDataset(Dataset):
    """HR tiles and their LR counterparts, normalised per tile by the LR mean and std.

    Build with ``from_folder``. ``tile_ids``, ``terrains`` and ``paths`` are aligned with the
    sample positions; ``skipped`` lists ``(path, reason)`` for files left out.
    """

    def __init__(
        self,
        tiles: _Tiles,
        indices: np.ndarray,
        scale: int,
        skipped: list[tuple[str, str]],
    ) -> None:
        self._tiles = tiles
        self._indices = np.asarray(indices, dtype=np.int64)
        self.scale = scale
        self.skipped = skipped
        self.tile_ids = [tiles.tile_ids[i] for i in self._indices]
        self.paths = [tiles.paths[i] for i in self._indices]
        self.terrains = tiles.terrains[self._indices]

    @classmethod
    def from_folder(cls, data_dir: Path, scale: int, *, strict: bool = False) -> TileDataset:
        """Every ``*.tif``/``*.tiff`` under ``data_dir`` (recursive, sorted).

        LR tiles are ``scale`` x ``scale`` block means of HR, unless ``data_dir`` has ``hr/``
        and ``lr/`` subfolders with the same file names, which are then read as pairs. A bad
        tile is skipped with a warning, or raises ``DataError`` when ``strict``.
        """
        data_dir = Path(data_dir)
        if scale < 1:
            raise DataError(f"scale must be a positive integer, got {scale}")
        if not data_dir.is_dir():
            raise DataError(f"{data_dir}: not a folder of GeoTIFF tiles")
        paired = (data_dir / "hr").is_dir() and (data_dir / "lr").is_dir()
        hr_root = data_dir / "hr" if paired else data_dir
        files = _geotiffs(hr_root)
        if not files:
            raise DataError(f"{data_dir}: no .tif or .tiff files found")

        skipped = SkippedFiles(strict)
        loaded = []
        for path in files:
            try:
                lr_path = data_dir / "lr" / path.relative_to(hr_root) if paired else None
                loaded.append((path, *_load_pair(path, lr_path, scale, strict)))
            except DataError as error:
                skipped.add(path, error)
        if not loaded:
            raise DataError(f"{data_dir}: none of the {len(files)} GeoTIFF files is usable")
        kept = skipped.keep_common_shape(loaded, lambda item: item[1].shape)

        tiles = _Tiles(
            hr=np.stack([item[1] for item in kept]),
            lr=np.stack([item[2] for item in kept]),
            cell_size=np.array([item[3] for item in kept], dtype=np.float32),
            terrains=np.array([terrain_index(item[4]) for item in kept], dtype=np.int64),
            tile_ids=[item[0].stem for item in kept],
            paths=[item[0] for item in kept],
        )
        return cls(tiles, np.arange(len(kept)), scale, skipped.entries)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TileDataset:
        """A view on some samples (positions in this dataset), renumbered from 0."""
        chosen = self._indices[np.asarray(indices, dtype=np.int64)]
        return TileDataset(self._tiles, chosen, self.scale, self.skipped)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        i = self._indices[idx]
        hr, lr = self._tiles.hr[i], self._tiles.lr[i]
        lr_valid = np.isfinite(lr)
        mean, std = normalisation(lr)
        mask = np.isfinite(hr)
        return {
            "lr": torch.from_numpy(((np.where(lr_valid, lr, mean) - mean) / std)[None]).float(),
            "hr": torch.from_numpy(((np.where(mask, hr, mean) - mean) / std)[None]).float(),
            "mask": torch.from_numpy(mask[None]),
            "terrain": torch.tensor(self.terrains[idx], dtype=torch.int64),
            "tile_id": self.tile_ids[idx],
            "idx": int(idx),
            "mean": torch.tensor(mean, dtype=torch.float32),
            "std": torch.tensor(std, dtype=torch.float32),
            "cell_size": torch.from_numpy(self._tiles.cell_size[i].copy()),
        }


def normalisation(lr: np.ndarray) -> tuple[float, float]:
    """Mean and std (floored at ``MIN_STD_M``) of a tile's valid LR cells, in metres.

    Only the LR is known at inference, so LR and HR are both normalised with these; a tile
    without a valid cell gets (0, ``MIN_STD_M``).
    """
    valid = np.isfinite(lr)
    if not valid.any():
        return 0.0, MIN_STD_M
    return float(lr[valid].mean()), max(float(lr[valid].std()), MIN_STD_M)


def load_split(folder: Path, data: DataSection, seed: int) -> tuple[TileDataset, TileDataset]:
    """Training and validation tiles of ``folder``.

    A folder with ``train/`` and ``val/`` subfolders is split already (the built-in sources
    hold out a spatially separate block); any other folder is split by ``train_val_split``.
    """
    train_dir, val_dir = Path(folder) / "train", Path(folder) / "val"
    if not (train_dir.is_dir() and val_dir.is_dir()):
        dataset = TileDataset.from_folder(folder, data.scale, strict=data.strict)
        return train_val_split(dataset, data.val_fraction, seed)
    train = TileDataset.from_folder(train_dir, data.scale, strict=data.strict)
    val = TileDataset.from_folder(val_dir, data.scale, strict=data.strict)
    train.skipped.extend(val.skipped)
    return train, val


def _geotiffs(folder: Path) -> list[Path]:
    """GeoTIFF files under ``folder``, recursively, in a stable order; a symbolic link that
    points nowhere is kept, so reading it reports it instead of dropping it silently."""
    suffixes = {".tif", ".tiff"}
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in suffixes and (p.is_file() or (p.is_symlink() and not p.exists()))
    )


def _load_pair(
    hr_path: Path, lr_path: Path | None, scale: int, strict: bool
) -> tuple[np.ndarray, np.ndarray, tuple[float, float], str]:
    """HR and LR in metres, the HR cell size and the terrain category of one tile."""
    dem = read_dem(hr_path, strict=strict)
    hr = dem.elevation
    if lr_path is None:
        height, width = (hr.shape[0] // scale) * scale, (hr.shape[1] // scale) * scale
        if height == 0 or width == 0:
            raise DataError(f"{hr_path}: {hr.shape} is smaller than one {scale}x{scale} block")
        hr = hr[:height, :width]
        lr = block_mean(hr, scale)
    else:
        if not lr_path.is_file():
            raise DataError(f"{hr_path}: no matching LR file {lr_path}")
        lr = read_dem(lr_path, strict=strict).elevation
        if (lr.shape[0] * scale, lr.shape[1] * scale) != hr.shape:
            raise DataError(
                f"{hr_path} is {hr.shape} but {lr_path} is {lr.shape}; "
                f"at scale {scale} the LR tile must be exactly HR / {scale}"
            )
    if not np.isfinite(lr).any():
        raise DataError(f"{hr_path}: no LR cell is valid (every block touches nodata)")
    cell_size = dem.cell_size_m()
    category, _ = label_tile(hr_path.stem, hr, cell_size)
    return hr, lr.astype(np.float32), cell_size, category


def block_mean(elevation: np.ndarray, scale: int) -> np.ndarray:
    """Mean of each ``scale`` x ``scale`` block; NaN if any cell of the block is NaN."""
    h, w = elevation.shape[0] // scale, elevation.shape[1] // scale
    blocks = elevation[: h * scale, : w * scale].reshape(h, scale, w, scale)
    return blocks.mean(axis=(1, 3), dtype=np.float64).astype(np.float32)
