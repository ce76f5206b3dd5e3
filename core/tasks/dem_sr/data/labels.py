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

Roughness and slope cannot tell a canyon from a mountain range: an incised plateau is as rough
and as steep. Its shape can: most of its area stays near the top, cut by a narrow gorge, while
a range is peaks over wide valleys. A tile that reaches ``alpine`` becomes ``extreme`` when at
least ``CANYON_TOP_QUARTER_AREA`` of its cells lie in the top quarter of its relief and its
elevation is skewed towards the top (``CANYON_SKEWNESS``); docs/data-format.md has the
measurements on named SRTM and GLOBE tiles behind both values. The hypsometric integral and
the slope bimodality coefficient are reported alongside.
"""

from __future__ import annotations

import functools
import re

import attrs
import numpy as np

from core.tasks.dem_sr.data.regions import COLORADO_REGIONS, GLOBE_REGIONS, SRTM_REGIONS
from core.tasks.dem_sr.metrics import horn_slope_deg
from core.tasks.dem_sr.terrain import TERRAINS

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
    **{
        region.name: region.category
        for region in (*GLOBE_REGIONS, *SRTM_REGIONS, *COLORADO_REGIONS)
    },
    **{category: category for category in TERRAINS},
}
"""Region name (lower case, words joined by ``_``) -> category; categories name themselves."""

DEM_THRESHOLDS: dict[str, tuple[float, float]] = {
    "moderate": (12.0, 3.0),
    "alpine": (200.0, 18.0),
    "extreme": (500.0, 30.0),
}
"""Category -> (roughness in m, mean slope in degrees); reaching either one is enough."""

CANYON_TOP_QUARTER_AREA = 0.22
"""Share of an alpine-rough tile's area in the top quarter of its relief that, with
``CANYON_SKEWNESS``, makes it a canyon (extreme): named canyon tiles have a median of 0.26,
named alpine tiles 0.15."""
CANYON_SKEWNESS = -0.05
"""Most of a plateau's area lies above its mean (negative skewness); a plane or a ramp, whose
top quarter also holds a quarter of the area, has none."""


@attrs.frozen
class TerrainStats:
    """Physical summary of a DEM tile, from its valid cells."""

    relief_m: float
    roughness_m: float
    mean_slope_deg: float
    hypsometric_integral: float
    """(mean - min) / (max - min) of the elevation: near 1 for a plateau, 0 for a basin."""
    top_quarter_area: float
    """Share of cells above the 1st percentile plus 3/4 of the relief."""
    elevation_skewness: float
    """Negative when most of the area lies high (a plateau), positive for peaks over valleys."""
    slope_bimodality: float
    """Sarle's coefficient (skewness² + 1) / kurtosis of the slopes (> 5/9 hints at two
    modes); reported, not used: at 90 m and coarser, canyon and range tiles measure alike."""


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
    """Relief, roughness, mean Horn slope and shape of the finite cells of a 2-D DEM (m)."""
    z = np.asarray(elevation_m, dtype=np.float64)
    valid = np.isfinite(z)
    if not valid.any():
        raise ValueError("terrain statistics need at least one valid cell")
    values = z[valid]
    low, high = np.percentile(values, [1, 99])
    relief = float(high - low)
    dy, dx = cell_size
    rows, cols = np.nonzero(valid)
    plane = np.column_stack([rows * dy, cols * dx, np.ones(len(values))])
    coef, *_ = np.linalg.lstsq(plane, values, rcond=None)
    roughness = float(np.std(values - plane @ coef))
    slope = horn_slope_deg(z[None, None], (dy, dx))[0, 0]
    slopes = slope[np.isfinite(slope)]
    mean_slope = float(slopes.mean()) if slopes.size else 0.0
    span = float(values.max() - values.min())
    return TerrainStats(
        relief,
        roughness,
        mean_slope,
        hypsometric_integral=float(values.mean() - values.min()) / span if span else 0.0,
        top_quarter_area=float((values >= low + 0.75 * relief).mean()) if relief else 0.0,
        elevation_skewness=_standard_moment(values, 3),
        slope_bimodality=(_standard_moment(slopes, 3) ** 2 + 1) / _standard_moment(slopes, 4)
        if _standard_moment(slopes, 4)
        else 0.0,
    )


def _standard_moment(x: np.ndarray, order: int) -> float:
    """E[((x - mean) / std) ** order]; 0 without spread (skewness 3, kurtosis 4)."""
    std = x.std() if x.size else 0.0
    return float((((x - x.mean()) / std) ** order).mean()) if std > 1e-9 else 0.0


def label_from_dem(elevation_m: np.ndarray, cell_size: tuple[float, float]) -> str:
    """flat / moderate / alpine / extreme from ``terrain_stats`` and ``DEM_THRESHOLDS``.

    Never "desert": that needs a name (see the module docstring).
    """
    return category_from_stats(terrain_stats(elevation_m, cell_size))


def category_from_stats(stats: TerrainStats) -> str:
    """The highest category whose roughness or slope threshold ``stats`` reaches; alpine
    becomes extreme when the shape is an incised plateau's (``CANYON_TOP_QUARTER_AREA``)."""
    category = "flat"
    for name, (roughness, slope) in DEM_THRESHOLDS.items():
        if stats.roughness_m >= roughness or stats.mean_slope_deg >= slope:
            category = name
    incised = (
        stats.top_quarter_area >= CANYON_TOP_QUARTER_AREA
        and stats.elevation_skewness <= CANYON_SKEWNESS
    )
    if category == "alpine" and incised:
        return "extreme"
    return category


def label_tile(
    tile_id: str, elevation_m: np.ndarray, cell_size: tuple[float, float]
) -> tuple[str, str]:
    """(category, source): source is ``"region"`` when named, ``"dem"`` when measured."""
    category = label_from_tile_id(tile_id)
    if category is not None:
        return category, "region"
    return label_from_dem(elevation_m, cell_size), "dem"
