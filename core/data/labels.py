"""Terrain categories for tiles: from a region name in the tile id, else from the DEM itself.

Names come first because they carry what elevation cannot: a Saharan erg and the Ganges plain
are both nearly level, so "desert" is only ever assigned from a name. Unnamed tiles are
classified by two tilt-independent measures in physical units:

- **roughness**: standard deviation (m) of the elevation about its best-fit plane, so a uniform
  regional tilt (which inflates plain relief) does not make a plain rugged;
- **mean slope**: Horn's method on the true (latitude-corrected) cell size, in degrees.

A tile gets the highest category that either measure reaches (``DEM_THRESHOLDS``). Roughness
does the work on coarse tiles (30" GLOBE: slopes are smoothed to a few degrees), slope on fine
ones (30 m tiles are too small to reach the roughness thresholds). Relief (99th minus 1st
percentile) is reported alongside but not used, for the tilt reason above.
"""

from __future__ import annotations

import functools
import re

import attrs
import numpy as np

from core.data.globe import GLOBE_REGIONS
from core.metrics import horn_slope_deg
from core.terrain import TERRAINS

SEED_REGIONS: dict[str, str] = {
    "kansas": "flat",
    "appalachian": "moderate",
    "oregon": "moderate",
    "colorado": "alpine",
    "glacier": "alpine",
    "arizona": "desert",
    "death_valley": "desert",
    "utah_canyonlands": "desert",
    "grand_canyon": "extreme",
    "zion": "extreme",
    "bryce_canyon": "extreme",
    "monument_valley": "extreme",
    "sedona": "extreme",
}
"""The seed's terrain metadata table (§5.1)."""

REGIONS: dict[str, str] = {
    **SEED_REGIONS,
    **{region.name: region.category for region in GLOBE_REGIONS},
    **{category: category for category in TERRAINS},
}
"""Region name (lower case, words joined by ``_``) -> category; categories name themselves."""

DEM_THRESHOLDS: dict[str, tuple[float, float]] = {
    "moderate": (12.0, 3.0),
    "alpine": (200.0, 18.0),
    "extreme": (500.0, 30.0),
}
"""Category -> (roughness in m, mean slope in degrees); reaching either one is enough."""


@attrs.frozen
class TerrainStats:
    """Physical summary of a DEM tile, from its valid cells."""

    relief_m: float
    roughness_m: float
    mean_slope_deg: float


def label_from_tile_id(tile_id: str) -> str | None:
    """Category of the longest region name in ``tile_id`` as a whole word, else None.

    Words are separated by ``_``, ``-``, spaces or dots (all treated alike, so
    ``death-valley_3`` names ``death_valley``); letters and digits glued to a name hide it,
    so ``flatiron`` does not say ``flat``.
    """
    key = re.sub(r"[-\s.]+", "_", tile_id.lower())
    for name, pattern in _region_patterns():
        if pattern.search(key):
            return REGIONS[name]
    return None


@functools.cache
def _region_patterns() -> tuple[tuple[str, re.Pattern[str]], ...]:
    names = sorted(REGIONS, key=lambda name: (-len(name), name))
    return tuple((name, re.compile(rf"(?:^|(?<=_)){re.escape(name)}(?=_|$)")) for name in names)


def terrain_stats(elevation_m: np.ndarray, cell_size: tuple[float, float]) -> TerrainStats:
    """Relief, roughness and mean Horn slope of the finite cells of a 2-D DEM in metres."""
    z = np.asarray(elevation_m, dtype=np.float64)
    valid = np.isfinite(z)
    if not valid.any():
        raise ValueError("terrain statistics need at least one valid cell")
    values = z[valid]
    relief = float(np.percentile(values, 99) - np.percentile(values, 1))
    dy, dx = cell_size
    rows, cols = np.nonzero(valid)
    plane = np.column_stack([rows * dy, cols * dx, np.ones(len(values))])
    coef, *_ = np.linalg.lstsq(plane, values, rcond=None)
    roughness = float(np.std(values - plane @ coef))
    slope = horn_slope_deg(z[None, None], (dy, dx))[0, 0]
    finite = np.isfinite(slope)
    mean_slope = float(slope[finite].mean()) if finite.any() else 0.0
    return TerrainStats(relief, roughness, mean_slope)


def label_from_dem(elevation_m: np.ndarray, cell_size: tuple[float, float]) -> str:
    """flat / moderate / alpine / extreme from ``terrain_stats`` and ``DEM_THRESHOLDS``.

    Never "desert": that needs a name (see the module docstring).
    """
    return category_from_stats(terrain_stats(elevation_m, cell_size))


def category_from_stats(stats: TerrainStats) -> str:
    """The highest category whose roughness or slope threshold ``stats`` reaches."""
    category = "flat"
    for name, (roughness, slope) in DEM_THRESHOLDS.items():
        if stats.roughness_m >= roughness or stats.mean_slope_deg >= slope:
            category = name
    return category


def label_tile(
    tile_id: str, elevation_m: np.ndarray, cell_size: tuple[float, float]
) -> tuple[str, str]:
    """(category, source): source is ``"region"`` when named, ``"dem"`` when measured."""
    category = label_from_tile_id(tile_id)
    if category is not None:
        return category, "region"
    return label_from_dem(elevation_m, cell_size), "dem"
