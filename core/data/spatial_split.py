"""Training and validation windows that never touch: seeded spatial blocks with a buffer.

Neighbouring windows of one landscape are strongly correlated, so a random split of windows
measures how well a model fills in terrain it has half seen. Here validation takes whole
blocks of ``block`` x ``block`` windows (on a grid of the CRS's own coordinates, so small tiles
that lie side by side in separate files share blocks as windows of one raster do), chosen per
domain with a seeded permutation; then every training window closer than one window to a
validation window is dropped. What remains trains, at least one window's width away from
anything that validates.

Windows in different CRSs are compared in longitude and latitude, only where the CRSs'
windows overlap at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import numpy as np
from pyproj import Transformer
from scipy.spatial import cKDTree

from core.config import DataSection
from core.errors import DataError


@attrs.frozen
class SpatialSplit:
    """Positions into the windows the split was given."""

    train: np.ndarray
    val: np.ndarray
    buffer: np.ndarray
    """Training windows dropped because they lie within one window of a validation window."""


def spatial_split(
    bounds: np.ndarray,
    crs: np.ndarray,
    domains: np.ndarray,
    *,
    val_fraction: float,
    seed: int,
    block: int,
) -> SpatialSplit:
    """Split windows (``bounds`` ``[N, 4]`` left, bottom, right, top in each window's
    ``crs``) by blocks, so that each domain with at least two blocks validates on
    ``round(val_fraction * blocks)`` of them (at least one, never all)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if block < 1:
        raise DataError(f"data.val_block must be at least 1 window, got {block}")
    blocks = _block_ids(bounds, crs, block)
    per_block = np.zeros((blocks.max() + 1 if len(blocks) else 0, domains.max() + 1), np.int64)
    np.add.at(per_block, (blocks, domains), 1)
    majority = per_block.argmax(axis=1)
    rng = np.random.default_rng(seed)
    val_blocks: list[int] = []
    for domain in np.unique(domains):
        members = np.flatnonzero(majority == domain)
        if len(members) < 2:
            continue
        n_val = min(max(round(val_fraction * len(members)), 1), len(members) - 1)
        val_blocks.extend(rng.permutation(members)[:n_val].tolist())
    is_val = np.isin(blocks, val_blocks)
    near = near_validation(bounds, crs, is_val)
    return SpatialSplit(
        train=np.flatnonzero(~is_val & ~near),
        val=np.flatnonzero(is_val),
        buffer=np.flatnonzero(near),
    )


def split_folders(folder: Path, data: DataSection) -> tuple[Path, Path] | None:
    """``folder``'s ``train/`` and ``val/`` when it holds both (split already), else None.

    Such a folder splits by its subfolders alone, so ``data.val_regions`` and
    ``data.exclude_regions`` could not apply: either is a ``DataError`` naming the folder,
    never a run that validates on ``val/`` while the settings say otherwise."""
    train, val = folder / "train", folder / "val"
    if not (train.is_dir() and val.is_dir()):
        return None
    refuse_regions(
        data,
        f"{folder} is split into train/ and val/ already",
        "give a folder of rasters without those subfolders",
    )
    return train, val


def refuse_regions(data: DataSection, split: str, remedy: str) -> None:
    """A split made already (``split`` says how) ignores ``data.val_regions`` and
    ``data.exclude_regions``: either is a ``DataError`` naming the key and ``remedy``."""
    if keys := [key for key in ("val_regions", "exclude_regions") if getattr(data, key)]:
        named = " and ".join(f"data.{key}" for key in keys)
        raise DataError(f"{split}, which {named} cannot change; {remedy}")


def split_windows(dataset: Any, data: DataSection, seed: int) -> SpatialSplit:
    """A windowed dataset's split as ``data`` asks: by ``data.val_regions`` when given (the
    dataset's ``regions`` or ``landscapes``), else by seeded blocks per domain (its
    ``terrains``); a split that leaves either side empty is an error saying what to set.
    ``dataset`` has ``bounds()``, ``crs()``, ``regions``, ``landscapes``, ``terrains`` and a
    length."""
    bounds, crs = dataset.bounds(), dataset.crs()
    names = np.array([dataset.regions, dataset.landscapes])
    if data.val_regions:
        split = split_by_region(bounds, crs, names, tuple(data.val_regions))
    else:
        split = spatial_split(
            bounds,
            crs,
            dataset.terrains,
            val_fraction=data.val_fraction,
            seed=seed,
            block=data.val_block,
        )
    if data.exclude_regions:
        split = without_regions(split, bounds, crs, names, tuple(data.exclude_regions))
    if not len(split.val) or not len(split.train):
        missing = "validation" if not len(split.val) else "training"
        raise DataError(
            f"{data.dir}: the spatial split left no {missing} "
            f"window ({len(dataset)} windows in blocks of {data.val_block} x {data.val_block}); "
            "give train/ and val/ folders, data.val_regions, or a smaller data.val_block"
        )
    return split


def split_by_region(
    bounds: np.ndarray, crs: np.ndarray, names: np.ndarray, val_regions: tuple[str, ...]
) -> SpatialSplit:
    """Validation = the windows of the named regions (whole landscapes training never sees),
    with the same one-window buffer where a training window comes near one. ``names`` is
    ``[K, N]``: a window validates when any of its K names (its region, its raster's name)
    is in ``val_regions``."""
    known = set(np.unique(names).tolist())
    unknown = sorted(set(val_regions) - known)
    if unknown:
        raise DataError(
            f"data.val_regions: no window lies in {', '.join(unknown)}; the regions are "
            f"{', '.join(sorted(known))}"
        )
    is_val = np.isin(names, list(val_regions)).any(axis=0)
    near = near_validation(bounds, crs, is_val)
    return SpatialSplit(
        train=np.flatnonzero(~is_val & ~near),
        val=np.flatnonzero(is_val),
        buffer=np.flatnonzero(near),
    )


def without_regions(
    split: SpatialSplit,
    bounds: np.ndarray,
    crs: np.ndarray,
    names: np.ndarray,
    regions: tuple[str, ...],
) -> SpatialSplit:
    """``split`` without the windows of ``regions`` (``data.exclude_regions``), which then
    neither train nor validate, nor does any window within one window of them: a region
    named inside one raster borders windows that would otherwise train. ``names`` as in
    :func:`split_by_region`."""
    unknown = sorted(set(regions) - set(np.unique(names).tolist()))
    if unknown:
        raise DataError(f"data.exclude_regions: no window lies in {', '.join(unknown)}")
    inside = np.isin(names, list(regions)).any(axis=0)
    dropped = np.flatnonzero(inside | near_validation(bounds, crs, inside))
    return SpatialSplit(
        train=np.setdiff1d(split.train, dropped),
        val=np.setdiff1d(split.val, dropped),
        buffer=np.union1d(split.buffer, np.setdiff1d(dropped, np.flatnonzero(inside))),
    )


def _block_ids(bounds: np.ndarray, crs: np.ndarray, block: int) -> np.ndarray:
    """Consecutive ids of the (CRS, window size, block column, block row) each window's
    centre falls in: windows of other cell sizes in one CRS lie on grids of their own."""
    extent = np.stack([bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1]], axis=1)
    centre = (bounds[:, :2] + bounds[:, 2:]) / 2
    cell = np.floor(centre / (block * extent)).astype(np.int64)
    _, crs_ids = np.unique(crs.astype(str), return_inverse=True)
    _, size_ids = np.unique(np.round(extent, 6), axis=0, return_inverse=True)
    keys = np.column_stack([crs_ids, size_ids.reshape(-1), cell])
    _, ids = np.unique(keys, axis=0, return_inverse=True)
    return ids.reshape(-1)


def near_validation(bounds: np.ndarray, crs: np.ndarray, is_val: np.ndarray) -> np.ndarray:
    """Non-validation windows less than one window from a validation window.

    Two windows of width ``w`` are that close when their centres differ by less than ``2 w``
    in both directions (Chebyshev distance in window units). Where one CRS holds windows of
    several sizes, the largest of them sets the distance for all, which keeps at least a
    window (often more) between any two.
    """
    near = np.zeros(len(bounds), dtype=bool)
    crs = crs.astype(str)
    for name in np.unique(crs):
        group = crs == name
        near |= group & _near(bounds, group & is_val, group & ~is_val)
    if len(np.unique(crs)) > 1:
        lonlat = _lonlat_bounds(bounds, crs)
        for name in np.unique(crs):
            others = crs != name
            near |= others & ~is_val & _near(lonlat, (crs == name) & is_val, others & ~is_val)
    return near


def _near(bounds: np.ndarray, val: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    near = np.zeros(len(bounds), dtype=bool)
    if not val.any() or not candidates.any():
        return near
    extent = np.maximum(bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1])
    unit = extent[val | candidates].max()
    centre = (bounds[:, :2] + bounds[:, 2:]) / 2 / unit
    tree = cKDTree(centre[val])
    # just under 2: windows exactly one window apart are far enough
    counts = tree.query_ball_point(
        centre[candidates], r=2 * (1 - 1e-9), p=np.inf, return_length=True
    )
    near[np.flatnonzero(candidates)] = counts > 0
    return near


def _lonlat_bounds(bounds: np.ndarray, crs: np.ndarray) -> np.ndarray:
    """Each window's box in degrees (from its four corners), for comparing across CRSs."""
    out = np.empty_like(bounds)
    for name in np.unique(crs):
        group = crs == name
        left, bottom, right, top = bounds[group].T
        to_lonlat = Transformer.from_crs(str(name), "EPSG:4326", always_xy=True)
        xs = np.stack([left, right, left, right])
        ys = np.stack([bottom, bottom, top, top])
        lon, lat = to_lonlat.transform(xs, ys)
        out[group] = np.stack([lon.min(0), lat.min(0), lon.max(0), lat.max(0)], axis=1)
    return out
