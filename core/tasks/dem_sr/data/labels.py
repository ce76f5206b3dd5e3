"""Terrain categories for tiles: from the name in the tile id and the DEM itself.

Names carry what elevation cannot: a Saharan erg and the Ganges plain are both nearly level,
so "desert" is only ever assigned from a name. Which wins (``explain_label``):

1. a category word in the tile id (``desert_tile_3``): the user said so, it always wins;
2. measurements that clearly contradict a region named in the tile id (``contradiction``): a
   region box holds the odd ridge or basin its name does not describe;
3. the region's category;
4. the measurements alone, for a tile that names nothing.

Tiles are measured by two tilt-independent measures in physical units:

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

LADDER: tuple[str, ...] = ("flat", "moderate", "alpine", "extreme")
"""The categories elevation can tell, in order of relief (``DEM_THRESHOLDS`` between them)."""

HINT_SPANS: dict[str, tuple[str, str]] = {
    **{category: (category, category) for category in LADDER},
    "desert": ("flat", "moderate"),
}
"""The measured categories (lowest, highest) that agree with a region's category. Deserts are
basins, ergs and plains that measure flat or moderate, so only alpine or extreme relief can
contradict a desert region."""

OVERRULE_FACTOR = 2.0
"""Measurements clearly contradict a region's category when the roughness or the slope reaches
this many times the threshold above the category's span, or both stay below the threshold at
its foot divided by it (or when they reach a category two steps outside the span). San Joaquin
Valley tile 88 (roughness 32 m, slope 6.5°) needs at most 2.7; 2 leaves a flat tile up to
24 m and 6° flat."""

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


@attrs.frozen
class Label:
    """A tile's category, its ``label_tile`` source and why, in one line."""

    category: str
    source: str
    """``"region"`` when the name decided, ``"dem"`` when the measurements did."""
    reason: str
    overruled: bool = False
    """A region named in the tile id was clearly contradicted by the measurements."""


def name_in_tile_id(tile_id: str) -> str | None:
    """The category word in ``tile_id``, else its longest region name (``REGIONS``), else None.

    Names count as whole words. Words are separated by ``_``, ``-``, spaces or dots (all
    treated alike, so ``death-valley_3`` names ``death_valley``); letters and digits glued to a
    name hide it, so ``flatiron`` does not say ``flat``.
    """
    key = re.sub(r"[-\s.]+", "_", tile_id.lower())
    for name, pattern in _region_patterns():
        if pattern.search(key):
            return name
    return None


def label_from_tile_id(tile_id: str) -> str | None:
    """The category ``tile_id`` names (``name_in_tile_id``), else None."""
    name = name_in_tile_id(tile_id)
    return None if name is None else REGIONS[name]


@functools.cache
def _region_patterns() -> tuple[tuple[str, re.Pattern[str]], ...]:
    names = sorted(REGIONS, key=lambda name: (name not in TERRAINS, -len(name), name))
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


def contradiction(hint: str, stats: TerrainStats) -> str | None:
    """Why ``stats`` clearly contradict a region of category ``hint``, or None.

    Clearly: the roughness or slope reaches ``OVERRULE_FACTOR`` times the threshold above the
    hint's span (``HINT_SPANS``), or reaches the category two steps above it; or both stay
    below the thresholds at the span's foot divided by the factor, or below the category two
    steps down.
    """
    low, high = (LADDER.index(category) for category in HINT_SPANS[hint])
    top = len(LADDER) - 1
    if high < top and (why := _reaches(stats, DEM_THRESHOLDS[LADDER[high + 1]], OVERRULE_FACTOR)):
        return why
    if high < top - 1 and (why := _reaches(stats, DEM_THRESHOLDS[LADDER[high + 2]], 1.0)):
        return f"{why}: {LADDER[high + 2]}, two steps above {LADDER[high]}"
    if low >= 1 and (why := _stays_below(stats, DEM_THRESHOLDS[LADDER[low]], OVERRULE_FACTOR)):
        return why
    if low >= 2 and (why := _stays_below(stats, DEM_THRESHOLDS[LADDER[low - 1]], 1.0)):
        return f"{why}: {LADDER[low - 2]}, two steps below {LADDER[low]}"
    return None


def _reaches(stats: TerrainStats, thresholds: tuple[float, float], factor: float) -> str | None:
    """``roughness 56.0 m ≥ 2 × 12 m`` (or the slope's) when either reaches factor x its
    threshold, else None."""
    limit_m, limit_deg = thresholds
    times = "" if factor == 1 else f"{factor:g} × "
    if stats.roughness_m >= factor * limit_m:
        return f"roughness {stats.roughness_m:.1f} m ≥ {times}{limit_m:g} m"
    if stats.mean_slope_deg >= factor * limit_deg:
        return f"slope {stats.mean_slope_deg:.1f}° ≥ {times}{limit_deg:g}°"
    return None


def _stays_below(stats: TerrainStats, thresholds: tuple[float, float], factor: float) -> str | None:
    """``roughness 4.9 m < 12 m / 2 and slope ...`` when both stay below their threshold
    divided by ``factor``, else None."""
    limit_m, limit_deg = thresholds
    per = "" if factor == 1 else f" / {factor:g}"
    if stats.roughness_m < limit_m / factor and stats.mean_slope_deg < limit_deg / factor:
        return (
            f"roughness {stats.roughness_m:.1f} m < {limit_m:g} m{per} and "
            f"slope {stats.mean_slope_deg:.1f}° < {limit_deg:g}°{per}"
        )
    return None


def explain_label(
    tile_id: str,
    elevation_m: np.ndarray,
    cell_size: tuple[float, float],
    stats: TerrainStats | None = None,
) -> Label:
    """The tile's category and why: a category word in the name, else the measurements where
    they clearly contradict a named region, else the region, else the measurements
    (``stats``, when the caller has them already)."""
    name = name_in_tile_id(tile_id)
    if name in TERRAINS:
        return Label(name, "region", f"the name says {name}")
    stats = stats or terrain_stats(elevation_m, cell_size)
    measured = category_from_stats(stats)
    if name is None:
        return Label(measured, "dem", "measured: the name holds no region or category")
    hint = REGIONS[name]
    said = f"region {name} says {hint}"
    if measured == hint:
        return Label(hint, "region", f"{said}; the measurements agree")
    why = contradiction(hint, stats)
    if why is None:
        return Label(hint, "region", f"{said}; measured {measured}, not clearly otherwise")
    return Label(measured, "dem", f"{said}; {why}", overruled=True)


def label_tile(
    tile_id: str, elevation_m: np.ndarray, cell_size: tuple[float, float]
) -> tuple[str, str]:
    """(category, source): source is ``"region"`` when the name decided (a category word, or a
    region the measurements do not clearly contradict), ``"dem"`` when they did
    (``explain_label`` says why)."""
    label = explain_label(tile_id, elevation_m, cell_size)
    return label.category, label.source
