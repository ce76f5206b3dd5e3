"""A folder of DEM GeoTIFFs as (noisy, clean) pairs, read once and kept in memory.

The trainer needs little from a dataset: ``len``, indexing to a dict of tensors, and a
``terrains`` array (one domain label per sample, which samplers group by). A ``subset``
method lets ``terraplug.data.train_val_split`` cut the training and validation parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from terraplug import DataError
from terraplug.data import SkippedFiles, read_dem


@attrs.frozen(eq=False)
class Tiles:
    """Every usable tile of a folder, shared by a dataset and all its subsets."""

    clean: np.ndarray
    """[N, H, W] float32 metres, voids filled with the tile mean."""
    noisy: np.ndarray
    """[N, H, W] float32 metres: ``clean`` plus the tile's seeded noise."""
    paths: list[Path]
    noise_m: float
    """The noise's standard deviation in metres, the unit of the normalised tiles."""


def geotiffs(folder: Path) -> list[Path]:
    """The ``.tif``/``.tiff`` files under ``folder``, recursively, in a stable order (the
    order gives each tile its noise seed)."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".tif", ".tiff"})


def read_tile(path: Path, strict: bool) -> np.ndarray:
    """One DEM in metres with its voids (NaN) filled by the tile mean: the noise and the
    losses need a value in every cell."""
    elevation = read_dem(path, strict=strict).elevation
    return np.where(np.isnan(elevation), np.nanmean(elevation), elevation).astype(np.float32)


def load_tiles(
    folder: Path, noise_m: float, seed: int, strict: bool
) -> tuple[Tiles, list[tuple[str, str]]]:
    """The tiles of ``folder`` with their noise, and the ``(file, reason)`` of those left
    out. Bad files are skipped with a warning (``strict``: the first raises), as are tiles
    of a shape other than the most common one (one dataset stacks one shape).

    The ``i``-th usable tile gets its noise from ``default_rng([seed, i])``: the same in
    every epoch and in every run with the same ``data.split_seed``, so validation scores
    are comparable and a resumed run sees what it saw before. Training tiles keep their
    noise too; a fresh draw per epoch would augment the data, at the cost of a generator
    whose state each data-loader worker and each resume must carry.
    """
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of GeoTIFF DEMs")
    files = geotiffs(folder)
    if not files:
        raise DataError(f"{folder}: no .tif or .tiff files found")
    skipped = SkippedFiles(strict)
    loaded: list[tuple[Path, np.ndarray]] = []
    for path in files:
        try:
            loaded.append((path, read_tile(path, strict)))
        except DataError as error:
            skipped.add(path, error)
    if not loaded:
        raise DataError(f"{folder}: none of the {len(files)} GeoTIFF files is usable")
    kept = skipped.keep_common_shape(loaded, lambda item: item[1].shape)
    clean = np.stack([tile for _, tile in kept])
    noise = np.stack(
        [
            np.random.default_rng([seed, i]).normal(0.0, noise_m, clean.shape[1:])
            for i in range(len(clean))
        ]
    )
    tiles = Tiles(clean, (clean + noise).astype(np.float32), [path for path, _ in kept], noise_m)
    return tiles, skipped.entries


class NoisyDemDataset(torch.utils.data.Dataset):
    """Noisy and clean tiles minus the noisy tile's mean (at inference only the noisy tile
    is known), in units of the noise's standard deviation.

    Why not per-tile standard deviations, as for super-resolution? The noise is
    ``noise_m`` metres in every tile, so after dividing by each tile's std it would be
    strong on plains and a hundred times weaker on mountains: a loss in those units trains
    for plains only, and the model smooths mountain ridges away (measured: the validation
    RMSE in metres rose above the noisy input's). In units of the noise, every tile has
    the same noise level, and the loss weighs tiles the way the RMSE in metres does.
    """

    def __init__(self, tiles: Tiles, indices: Sequence[int] | np.ndarray) -> None:
        self.tiles = tiles
        self.indices = np.asarray(indices, dtype=np.int64)
        self.terrains = np.zeros(len(self.indices), dtype=np.int64)
        """One domain (``tile``) for every sample; a task with land-cover or terrain
        classes labels them here, and per-domain samplers and losses use the labels."""

    def subset(self, indices: Sequence[int] | np.ndarray) -> NoisyDemDataset:
        """A view on some samples (positions in this dataset), renumbered from 0."""
        return NoisyDemDataset(self.tiles, self.indices[np.asarray(indices, dtype=np.int64)])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        i = self.indices[idx]
        noisy, clean = self.tiles.noisy[i], self.tiles.clean[i]
        mean, scale = float(noisy.mean()), self.tiles.noise_m
        return {
            "noisy": torch.from_numpy((noisy - mean) / scale)[None].float(),
            "clean": torch.from_numpy((clean - mean) / scale)[None].float(),
            "mean": torch.tensor(mean, dtype=torch.float32),
            # metres per normalised unit: value * scale + mean is the elevation
            "scale": torch.tensor(scale, dtype=torch.float32),
            "terrain": torch.tensor(self.terrains[idx], dtype=torch.int64),
            "idx": int(idx),
        }
