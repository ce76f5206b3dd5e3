"""The ``world`` landscapes: real DEMs from eight places, each resampled to 90 m cells.

Each landscape is one or more elevation files inside pinned PyPI distributions
(``core.data.distfiles``), read by its own decoder (``core.tasks.dem_sr.data.decoders``: the
file quirks), mosaicked when it spans several tiles, and reprojected once into the local
metric CRS of the place (its UTM zone; NZTM2000 for New Zealand) on a grid of exactly
``CELL_SIZE_M`` cells, anchored at multiples of the cell size. ``ensure_world_rasters`` writes
one float32 GeoTIFF per landscape (NaN = void) and a ``manifest.json`` into a versioned cache
folder, once.

- **90 m** matches SRTM 90 m, the coarsest of the sources; the 3" (about 90 m) tiles cannot be
  made finer without inventing detail, and one cell size keeps a window the same ground size
  in every landscape. The finer sources (25 m, 1", 10 m) are averaged down.
- **Resampling**: ``Resampling.average``, each 90 m cell the area-weighted mean of the valid
  source cells under it.
- **Voids**: a 90 m cell is void when less than ``MIN_VALID_FRACTION`` of its area has valid
  source cells (void cells, sea, or the outside of the source's footprint); a cell that is
  mostly valid keeps the mean of its valid part.
- **Sea**: each landscape's ``sea_level`` (``decoders.mark_sea``) makes the cells at or below
  it void before averaging, only where the product marks the sea that way.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import numpy as np
from affine import Affine
from rasterio.warp import Resampling, reproject, transform_bounds
from tqdm.auto import tqdm

from core.data import distfiles
from core.data.cache import build_once, cache_root, read_manifest
from core.data.distfiles import Member, fetch
from core.data.geotiff import cell_size_m, write_dem
from core.errors import DataError
from core.tasks.dem_sr.data.decoders import mark_sea, read_grid
from core.tasks.dem_sr.data.tiling import Raster

CACHE_VERSION = "world-v1"
"""Bump when a landscape, the cell size or a rule changes, so old caches are not reused."""
CELL_SIZE_M = 90.0
MIN_VALID_FRACTION = 0.5
"""A 90 m cell needs at least this fraction of its area covered by valid source cells."""

SRTM_CITATION = (
    "Farr, T. G., Rosen, P. A., Caro, E., Crippen, R., Duren, R., Hensley, S., Kobrick, M., "
    "Paller, M., Rodriguez, E., Roth, L., Seal, D., Shaffer, S., Shimada, J., Umland, J., "
    "Werner, M., Oskin, M., Burbank, D., and Alsdorf, D., 2007. The Shuttle Radar Topography "
    "Mission. Reviews of Geophysics 45, RG2004, doi:10.1029/2005RG000183"
)
ALOS_CITATION = (
    "Tadono, T., Ishida, H., Oda, F., Naito, S., Minakawa, K., Iwamoto, H., 2014. Precise "
    "Global DEM Generation by ALOS PRISM. ISPRS Annals of the Photogrammetry, Remote Sensing "
    "and Spatial Information Sciences II-4, 71-76 (ALOS World 3D - 30m, AW3D30, (c) JAXA)"
)
ASTER_CITATION = (
    "NASA/METI/AIST/Japan Spacesystems and U.S./Japan ASTER Science Team, 2011. ASTER Global "
    "Digital Elevation Model Version 2 (ASTER GDEM is a product of METI and NASA)"
)
THREEDEP_CITATION = (
    "U.S. Geological Survey, 3D Elevation Program 1/3 arc-second (about 10 m) DEM, as shipped "
    "in the pywbt 0.3.0 sdist (docs/examples/data/dem_tx_10m.tif)"
)
NZ_CITATION = (
    "A 25 m DEM of the Southern Alps and Canterbury (NZTM2000), as shipped in the glabtop2-py "
    "2.1.1 sdist (GlabTop2/test/dem25m.map) as the test input of GlabTop2 (Frey et al. 2014); "
    "the package does not name the DEM's source"
)


@attrs.frozen
class Landscape:
    """One place of the world source: which files, how they are read, where they go."""

    name: str
    """snake_case; the ``landscape`` tag and the file name."""
    title: str
    product: str
    licence: str
    citation: str
    crs: str
    """The local metric CRS it is resampled into."""
    members: tuple[Member, ...]
    """One file, or tiles of one grid side by side, west to east."""
    read: Callable[[Path], Raster]
    """The decoder of one member (the file's quirks)."""
    sea_level: float | None = None
    """Cells at or below it are sea (void); None where the product marks no sea that way."""

    def load(self) -> Raster:
        """The source grid, mosaicked across its members, sea made void."""
        raster = mosaic([self.read(fetch(member)) for member in self.members])
        mark_sea(raster.elevation, self.sea_level)
        return raster


read_tiff = functools.partial(read_grid, driver="GTiff")
read_hgt = functools.partial(read_grid, driver="SRTMHGT")
read_alos = functools.partial(read_grid, driver="GTiff", void_value=-9999)
read_nztm_pcraster = functools.partial(read_grid, driver="PCRaster", assumed_crs="EPSG:2193")

LANDSCAPES: tuple[Landscape, ...] = (
    Landscape(
        "southern_alps_nz",
        "Southern Alps to the Canterbury Plains, New Zealand",
        "25 m DEM (source not named by the package)",
        "not stated for the data; the package is GPL-3.0-or-later",
        NZ_CITATION,
        "EPSG:2193",
        (distfiles.NZ_ALPS_25M,),
        read_nztm_pcraster,
        sea_level=0.0,
    ),
    Landscape(
        "hawaii_big_island",
        "Hawaiʻi's Big Island: Mauna Kea, Mauna Loa, Kīlauea, the Hilo coast",
        "SRTM 1 arc-second",
        "public domain (NASA/USGS)",
        SRTM_CITATION,
        "EPSG:32605",
        (distfiles.HAWAII_SRTM1,),
        read_hgt,
        sea_level=0.0,
    ),
    Landscape(
        "congo_plateau",
        "Eastern DR Congo: forest plateau and river valleys (a surface model)",
        "ALOS World 3D 30 m (AW3D30, average, ellipsoidal heights)",
        "free of charge with attribution to JAXA",
        ALOS_CITATION,
        "EPSG:32735",
        (distfiles.CONGO_ALOS_E026, distfiles.CONGO_ALOS_E027),
        read_alos,
    ),
    Landscape(
        "southern_england",
        "Southern England: chalk downs and the Thames valley",
        "ASTER GDEM v2",
        "METI/NASA ASTER GDEM terms: free use with attribution",
        ASTER_CITATION,
        "EPSG:32630",
        (distfiles.ENGLAND_ASTER,),
        read_tiff,
    ),
    Landscape(
        "french_prealps",
        "French Prealps: Mont Ventoux, the Dévoluy, the Durance valley",
        "SRTM 3 arc-second (not void-filled)",
        "public domain (NASA/USGS)",
        SRTM_CITATION,
        "EPSG:32631",
        (distfiles.PREALPS_SRTM3,),
        read_hgt,
    ),
    Landscape(
        "cote_divoire",
        "Central Côte d'Ivoire: savanna plateau, inselbergs, Lake Kossou",
        "SRTM 3 arc-second void-filled",
        "public domain (NASA/USGS)",
        SRTM_CITATION,
        "EPSG:32630",
        (distfiles.KOSSOU_SRTM3,),
        read_tiff,
    ),
    Landscape(
        "houston_coastal_plain",
        "Houston: the Gulf coastal plain",
        "USGS 3DEP 1/3 arc-second",
        "public domain (USGS)",
        THREEDEP_CITATION,
        "EPSG:32615",
        (distfiles.HOUSTON_3DEP,),
        read_tiff,
    ),
    Landscape(
        "sierra_nevada_basin_range",
        "Central California to western Nevada: Central Valley, Sierra Nevada, Basin and Range",
        "SRTM 3 arc-second",
        "public domain (NASA/USGS)",
        SRTM_CITATION,
        "EPSG:32611",
        (distfiles.SRTM90,),
        read_tiff,
    ),
)


VALIDATION: tuple[str, ...] = (
    "french_prealps",
    "southern_england",
    "hawaii_big_island",
    "high_sierra",
    "white_mountains",
    "kings_canyon",
    "sierra_escarpment",
    "inyo_escarpment",
    "tuolumne_canyon",
    "owens_valley",
    "saline_valley",
    "eureka_valley",
    "round_valley",
)
"""The landscapes ``world`` validates on, which training never sees (``data.val_regions``):
three whole rasters, and named regions of the Sierra Nevada raster (``regions.py``) for the
classes only it holds: alpine ranges, escarpments and canyons, desert basins. Chosen so that
every class validates on at least 3 landscapes; docs/data-format.md has the counts."""


def default_cache_dir() -> Path:
    """``<cache_root()>/world-v1``."""
    return cache_root() / CACHE_VERSION


def ensure_world_rasters(*, quiet: bool = False) -> Path:
    """The folder of world rasters (``<landscape>.tif`` and ``manifest.json``), built once.

    It is built in a temporary folder and renamed into place, so an interrupted or concurrent
    first build never leaves a partial folder; later calls only read the manifest.
    """
    folder = default_cache_dir()

    def read(folder: Path) -> dict | None:
        def complete(manifest: dict) -> bool:
            return all((folder / entry["file"]).is_file() for entry in manifest["landscapes"])

        return read_manifest(folder, CACHE_VERSION, complete)

    manifest = build_once(folder, lambda out: build(out, LANDSCAPES, quiet=quiet), read)
    if not quiet:
        print(f"world landscapes ({len(manifest['landscapes'])}, {CELL_SIZE_M:g} m): {folder}")
    return folder


def build(out: Path, landscapes: tuple[Landscape, ...], *, quiet: bool = False) -> dict:
    """Write every landscape's raster and the manifest into ``out``; return the manifest."""
    entries = []
    bar = tqdm(landscapes, desc="building world landscapes", unit="landscape", disable=quiet)
    for landscape in bar:
        bar.set_postfix_str(landscape.name)
        started = time.perf_counter()
        source = landscape.load()
        raster = resample(source, landscape.crs)
        tags = {
            "landscape": landscape.name,
            "title": landscape.title,
            "product": landscape.product,
            "licence": landscape.licence,
            "citation": landscape.citation,
        }
        file = f"{landscape.name}.tif"
        write_dem(out / file, raster.elevation, raster.transform, raster.crs, np.nan, tags)
        entries.append(
            {
                **tags,
                "file": file,
                "distributions": sorted({m.requirement for m in landscape.members}),
                "members": [m.inner or m.member for m in landscape.members],
                "source_crs": source.crs,
                "source_shape": list(source.elevation.shape),
                "crs": raster.crs,
                "shape": list(raster.elevation.shape),
                "valid_cells": int(np.isfinite(raster.elevation).sum()),
                "sea_level": landscape.sea_level,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    manifest = {
        "version": CACHE_VERSION,
        "cell_size_m": CELL_SIZE_M,
        "min_valid_fraction": MIN_VALID_FRACTION,
        "resampling": "average",
        "landscapes": entries,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def mosaic(rasters: list[Raster]) -> Raster:
    """Tiles of one grid side by side (west to east) as one raster; a single one as it is.

    Each tile must start where the one before it ends, on the same rows of cells (same CRS,
    cell size and north edge); anything else is refused rather than resampled twice.
    """
    for west, east in itertools.pairwise(rasters):
        expected = west.transform @ Affine.translation(west.elevation.shape[1], 0)
        if not (
            east.crs == west.crs
            and east.elevation.shape[0] == west.elevation.shape[0]
            and east.transform.almost_equals(expected, precision=1e-9)
        ):
            raise DataError(
                f"tiles of one landscape do not continue one grid row: {east.transform} "
                f"follows {west.transform}"
            )
    elevation = np.concatenate([raster.elevation for raster in rasters], axis=1)
    return Raster(elevation, rasters[0].transform, rasters[0].crs)


def resample(source: Raster, crs: str, cell: float = CELL_SIZE_M) -> Raster:
    """``source`` on a grid of ``cell`` metres in ``crs``, by area-weighted average.

    The grid covers the source's footprint, its corners anchored at multiples of ``cell``.
    A cell is void (NaN) when less than ``MIN_VALID_FRACTION`` of its area lies on valid
    source cells: the valid fraction is the average of a 1/0 validity grid padded with
    invalid cells, so the footprint's edge counts as void too.
    """
    height, width = source.elevation.shape
    west, north = source.transform @ (0, 0)
    east, south = source.transform @ (width, height)
    left, bottom, right, top = transform_bounds(
        source.crs, crs, min(west, east), min(south, north), max(west, east), max(south, north),
        densify_pts=101,
    )  # fmt: skip
    left, bottom = math.floor(left / cell) * cell, math.floor(bottom / cell) * cell
    right, top = math.ceil(right / cell) * cell, math.ceil(top / cell) * cell
    shape = (round((top - bottom) / cell), round((right - left) / cell))
    transform = Affine(cell, 0.0, left, 0.0, -cell, top)
    elevation = np.full(shape, np.nan, dtype=np.float32)
    warp = functools.partial(
        reproject, src_crs=source.crs, dst_transform=transform, dst_crs=crs,
        resampling=Resampling.average,
    )  # fmt: skip
    warp(
        source.elevation,
        elevation,
        src_transform=source.transform,
        src_nodata=np.nan,
        dst_nodata=np.nan,
    )
    pad = math.ceil(cell / min(cell_size_m(source.transform, source.crs, (height, width)))) + 1
    valid = np.zeros((height + 2 * pad, width + 2 * pad), dtype=np.float32)
    valid[pad:-pad, pad:-pad] = np.isfinite(source.elevation)
    fraction = np.zeros(shape, dtype=np.float32)
    warp(valid, fraction, src_transform=source.transform @ Affine.translation(-pad, -pad))
    elevation[fraction < MIN_VALID_FRACTION] = np.nan
    return Raster(elevation, transform, crs)
