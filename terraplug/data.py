"""Data helpers for third-party tasks: GeoTIFFs read with the built-in tasks' guards (the
GeoTIFF driver only, no sidecars, voids as NaN, errors naming the file), bookkeeping of
skipped files, the seeded per-domain train/validation split, the built-in DEM sources and
the terrain classifier."""

from core.data.datasets import SkippedFiles, train_val_split
from core.data.geotiff import Dem, read_dem, write_dem
from core.tasks.dem_sr.data.labels import TerrainStats, label_tile, terrain_stats
from core.tasks.dem_sr.data.sources import SOURCES, ensure_source_tiles
from core.tasks.dem_sr.terrain import TERRAINS

DEM_SOURCES: tuple[str, ...] = tuple(SOURCES)
"""The built-in DEM sources ``data.source`` names that are cut into tiles (``srtm90``, the
default, ``globe``, ``colorado10m``, ``tianshan``), each by :func:`ensure_source_tiles` on
first use; ``world`` is read as windows of its rasters instead."""

__all__ = [
    "DEM_SOURCES",
    "TERRAINS",
    "Dem",
    "SkippedFiles",
    "TerrainStats",
    "ensure_source_tiles",
    "label_tile",
    "read_dem",
    "terrain_stats",
    "train_val_split",
    "write_dem",
]
