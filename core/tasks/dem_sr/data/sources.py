"""The built-in DEM sources, selected with ``data.source``: ``srtm90`` (the default), ``globe``,
``colorado10m`` and ``tianshan``.

Each is a raster inside a pinned PyPI wheel (``core.data.distfiles``), cut into labelled tiles
by ``core.tasks.dem_sr.data.tiling``; docs/data-format.md describes their origin, licences
and regions.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from core.config import DataSection
from core.data.distfiles import COLORADO_10M, SRTM90, fetch
from core.data.geotiff import read_dem
from core.errors import ConfigError
from core.tasks.dem_sr.data.globe import GLOBE
from core.tasks.dem_sr.data.regions import COLORADO_REGIONS, SRTM_REGIONS
from core.tasks.dem_sr.data.tianshan import TIANSHAN
from core.tasks.dem_sr.data.tiling import Raster, RasterSource, ensure_tiles
from core.tasks.dem_sr.data.world import (
    SRTM_CITATION,
    VALIDATION,
    ensure_world_rasters,
)

COLORADO_CITATION = (
    "U.S. Geological Survey, 3D Elevation Program 1/3 arc-second (about 10 m) DEM, as shipped "
    "in the localtileserver 1.0.0 wheel (co_elevation_roi.tif)"
)
SRTM_VALIDATION_SOUTH_OF = 36.85
"""Tiles centred south of 36.85°N validate: a band across the whole raster, so it crosses the
Central Valley, the foothills, the High Sierra, Kings Canyon, the Sierra and Inyo escarpments,
Owens Valley and Saline Valley (all five categories)."""


def _read(path: Path) -> Raster:
    dem = read_dem(path)
    return Raster(dem.elevation, dem.transform, dem.crs.to_string())


SRTM = RasterSource(
    name="srtm90",
    title="SRTM 90 m, central California to western Nevada",
    cache_version="srtm90-v2",
    load=lambda: _read(fetch(SRTM90)),
    regions=SRTM_REGIONS,
    citation=SRTM_CITATION,
    licence="public domain (NASA/USGS)",
    credit="SRTM, NASA/USGS, public domain; Farr et al. (2007)",
    dtype="int16",
    checkerboard=True,
    validation_south_of=SRTM_VALIDATION_SOUTH_OF,
)

COLORADO = RasterSource(
    name="colorado10m",
    title="10 m elevation of the Elk Mountains, Colorado (nearly all alpine)",
    cache_version="colorado10m-v2",
    load=lambda: _read(fetch(COLORADO_10M)),
    regions=COLORADO_REGIONS,
    citation=COLORADO_CITATION,
    licence="public domain (USGS)",
    credit="USGS 3DEP 1/3 arc-second DEM, public domain",
    validation_south_of=38.95,
)

SOURCES: dict[str, RasterSource] = {
    source.name: source for source in (SRTM, GLOBE, COLORADO, TIANSHAN)
}


WORLD = "world"
"""The multi-region source: whole rasters of eight landscapes (``world.py``), read as windows
and validated on held-out landscapes, not cut into tiles."""


def source_named(name: str) -> RasterSource:
    """The source ``data.source`` names; an unknown name is a ``ConfigError`` listing them."""
    if name == WORLD:
        raise ConfigError(
            f"data.source {WORLD!r} is read as windows of its rasters, not cut into tiles: "
            "ensure_source(data) gives its folder and split"
        )
    try:
        return SOURCES[name]
    except KeyError:
        raise ConfigError(
            f"data.source: unknown source {name!r}; expected one of {', '.join([*SOURCES, WORLD])}"
        ) from None


def ensure_source(data: DataSection, *, quiet: bool = False) -> tuple[Path, DataSection]:
    """The data of ``data.source`` and the settings that split it: a tile source's cut
    folder (``train/`` and ``val/``) as it is; ``world``'s rasters with its held-out
    landscapes (``world.VALIDATION``), unless ``data.val_regions`` names others."""
    if data.source == WORLD:
        regions = data.val_regions or list(VALIDATION)
        return ensure_world_rasters(quiet=quiet), attrs.evolve(data, val_regions=regions)
    tile_size = data.tile_size or 48
    return ensure_tiles(source_named(data.source), tile_size=tile_size, quiet=quiet), data


def ensure_source_tiles(name: str, *, tile_size: int = 48, quiet: bool = False) -> Path:
    """The cached tile folder of the named source, cut on first use."""
    return ensure_tiles(source_named(name), tile_size=tile_size, quiet=quiet)
