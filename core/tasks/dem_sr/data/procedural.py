"""Small synthetic DEM tiles, one recognisable character per terrain category, for fast tests.

Real tiles need the GLOBE cut (seconds) and carry its artefacts; tests of samplers, losses and
the training loop only need five categories that look and measure different. Every surface
is built from seeded spectral noise plus a category-specific shape, in metres on a UTM grid
(EPSG:32613), so cell sizes are exact and ``label_from_dem`` agrees with the file names
(except desert, which only a name can say).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from affine import Affine

from core.config import DataSection
from core.data.geotiff import write_dem
from core.data.noise import power_law_noise
from core.tasks.dem_sr.terrain import TERRAINS, terrain_index

CRS = "EPSG:32613"
"""UTM zone 13N (Colorado), a projected CRS in metres."""
SPACING = DataSection().val_block
"""Tiles lie this many tile widths apart (the default ``data.val_block``): they are
independent surfaces, not neighbours, so each is a validation block of its own and none is
lost to the buffer of the spatial split."""


def write_procedural_tiles(
    out_dir: Path, *, per_terrain: int = 8, size: int = 48, seed: int = 0, cell_size_m: float = 30.0
) -> Path:
    """Write ``<category>_tile_<n>.tif`` for every category; the same seed gives the same files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for category in TERRAINS:
        k = terrain_index(category)
        for n in range(per_terrain):
            rng = np.random.default_rng([seed, k, n])
            z = _SURFACES[category](rng, size, cell_size_m)
            spacing = SPACING * size * cell_size_m  # one row of tiles per category
            origin = Affine.translation(500_000 + n * spacing, 4_400_000 - k * spacing)
            write_dem(
                out_dir / f"{category}_tile_{n}.tif",
                z,
                origin @ Affine.scale(cell_size_m, -cell_size_m),
                CRS,
                tags={"category": category, "source": "terraplug procedural", "seed": seed},
            )
    return out_dir


def _grid(size: int, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """Northing-like (rows) and easting-like (cols) coordinates in metres."""
    return np.meshgrid(np.arange(size) * cell, np.arange(size) * cell, indexing="ij")


def _flat(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """A plain: a 0.1-0.3° regional tilt and half a metre of texture."""
    y, x = _grid(size, cell)
    tilt = np.tan(np.radians(rng.uniform(0.1, 0.3)))
    angle = rng.uniform(0, 2 * np.pi)
    plane = tilt * (x * np.cos(angle) + y * np.sin(angle))
    return 300 + plane + 0.5 * power_law_noise(rng, size, 3.0)


def _moderate(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """Rolling hills: smooth noise of ~25 m amplitude (slopes of a few to ~12°)."""
    hills = rng.uniform(20, 30) * power_law_noise(rng, size, 4.0)
    return 500 + hills + 0.3 * power_law_noise(rng, size, 2.0)


def _alpine(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """A glacial trough: a U-shaped valley between smooth ridges, high relief, no sharp edges."""
    y, x = _grid(size, cell)
    extent = size * cell
    angle = rng.uniform(0, np.pi)
    across = (x - extent / 2) * np.cos(angle) - (y - extent / 2) * np.sin(angle)
    across = across + 0.05 * extent * power_law_noise(rng, size, 4.0)  # a winding valley axis
    half_width = extent * rng.uniform(0.36, 0.42)
    depth = rng.uniform(200, 230)
    u = np.clip(np.abs(across) / half_width, 0, 1.25)
    trough = depth * u**2  # parabolic U profile, steepening towards the ridges
    return 2500 + trough + 10 * power_law_noise(rng, size, 4.0)


def _desert(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """Mesas and terraces: smooth noise quantised into flat benches with one-cell cliffs."""
    step = rng.uniform(40, 60)
    field = 1.5 * step * power_law_noise(rng, size, 5.0)
    benches = step * np.floor(field / step)
    return 1200 + benches + 0.5 * power_law_noise(rng, size, 3.0)


def _extreme(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """A plateau cut by a deep, narrow canyon with near-vertical walls."""
    y, x = _grid(size, cell)
    extent = size * cell
    angle = rng.uniform(0, np.pi)
    across = (x - extent / 2) * np.cos(angle) - (y - extent / 2) * np.sin(angle)
    across = across + 0.1 * extent * power_law_noise(rng, size, 4.0)
    depth = rng.uniform(700, 900)
    floor_half, rim_half = 2 * cell, 0.3 * extent
    wall = np.clip((np.abs(across) - floor_half) / (rim_half - floor_half), 0, 1)
    return 2000 - depth * (1 - wall**0.5) + 15 * power_law_noise(rng, size, 3.0)


_SURFACES = {
    "flat": _flat,
    "moderate": _moderate,
    "alpine": _alpine,
    "desert": _desert,
    "extreme": _extreme,
}
