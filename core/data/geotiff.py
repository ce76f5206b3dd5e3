"""Single-band elevation GeoTIFFs in and out, with nodata as NaN and cell sizes in metres.

Everything downstream (block means, normalisation, slope in degrees) needs two things a raw
raster read does not give: one uniform marker for missing data, and the true ground size of a
cell. ``read_dem`` turns every nodata convention (a nodata value, an internal mask, NaN, inf)
into NaN, and ``cell_size_m`` turns degrees into metres at the raster's latitude.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import CRSError, RasterioError
from rasterio.io import DatasetReader

from core.errors import DataError

# WGS84 ellipsoid: semi-major axis (m) and first eccentricity squared.
_WGS84_A = 6_378_137.0
_WGS84_E2 = 6.694_379_990_14e-3


@attrs.frozen(eq=False)
class Dem:
    """One elevation raster: ``elevation`` is float32 metres (or CRS units), NaN where void."""

    elevation: np.ndarray
    transform: Affine
    crs: CRS | None
    nodata: float | None
    """The file's own nodata value, kept so a writer can reuse it."""
    tags: dict[str, str]

    def cell_size_m(self) -> tuple[float, float]:
        """(dy, dx) of one cell in metres; see ``cell_size_m``."""
        return cell_size_m(self.transform, self.crs, self.elevation.shape)


# GDAL reads any of its 200 formats whatever the extension, and follows sidecar files: a VRT
# named x.tif (or a VRT planted as x.tif.ovr) reads pixels from any path or URL. Inputs are
# opened with the GeoTIFF driver only, and the folder is taken as empty, so no sidecar
# (.ovr, .aux.xml, .msk, world file) is looked for: only what is inside the GeoTIFF counts.
GEOTIFF_ONLY = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}


@contextlib.contextmanager
def open_geotiff(path: Path) -> Iterator[DatasetReader]:
    """Open a GeoTIFF for reading, and nothing else; a file the GeoTIFF driver cannot read
    (another format renamed .tif, truncated, not a raster) is a ``DataError`` naming it."""
    try:
        with rasterio.Env(**GEOTIFF_ONLY), rasterio.open(path, driver="GTiff") as ds:
            yield ds
    except RasterioError as err:
        detail = err.__cause__ or err  # GDAL's own message, when rasterio wraps it
        raise DataError(
            f"{path}: not a readable GeoTIFF (another format, truncated, or not a raster; "
            f"only GeoTIFFs are read): {detail}"
        ) from None


def gdal_cache(megabytes: int) -> rasterio.Env:
    """An environment capping GDAL's raster block cache (default: 5 % of RAM), which
    otherwise grows with the size of the rasters read and written."""
    return rasterio.Env(GDAL_CACHEMAX=megabytes * 2**20)  # rasterio takes it in bytes


@contextlib.contextmanager
def open_dem(path: Path) -> Iterator[DatasetReader]:
    """Open a single-band, georeferenced GeoTIFF; every problem is a ``DataError`` naming it."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open_geotiff(path) as ds:
        if ds.count != 1:
            raise DataError(f"{path}: has {ds.count} bands; an elevation raster needs exactly 1")
        if ds.crs is None:
            raise DataError(
                f"{path}: has no CRS, so its cell size in metres is unknown; set one, "
                "e.g. `rio edit-info --crs EPSG:4326 FILE`"
            )
        yield ds


def read_dem(path: Path | str) -> Dem:
    """Read a single-band GeoTIFF; every failure is a ``DataError`` naming the file."""
    path = Path(path)
    with open_dem(path) as ds:
        elevation = ds.read(1).astype(np.float32)
        void = ds.read_masks(1) == 0
        transform, crs, nodata, tags = ds.transform, ds.crs, ds.nodata, dict(ds.tags())
    void |= ~np.isfinite(elevation)
    if nodata is not None:
        void |= elevation == np.float32(nodata)
    if void.all():
        raise DataError(f"{path}: every pixel is nodata")
    elevation[void] = np.nan
    return Dem(elevation, transform, crs, nodata, tags)


def write_dem(
    path: Path | str,
    elevation: np.ndarray,
    transform: Affine,
    crs: CRS | str | None,
    nodata: float | None = None,
    tags: dict[str, Any] | None = None,
    dtype: str = "float32",
) -> Path:
    """Write a tiled, deflate-compressed single-band GeoTIFF; NaN becomes ``nodata`` if given."""
    path = Path(path)
    data = np.asarray(elevation, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError(f"elevation must be 2-D, got shape {data.shape}")
    void = ~np.isfinite(data)
    if nodata is not None:
        data = np.where(void, nodata, data)
    elif void.any() and np.issubdtype(np.dtype(dtype), np.integer):
        raise ValueError(f"{path}: NaN pixels need a nodata value to be stored as {dtype}")
    if np.issubdtype(np.dtype(dtype), np.integer):
        data = np.rint(data)
    height, width = data.shape
    block = 16 * math.ceil(min(256, max(height, width)) / 16)
    profile = {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": 1,
        "dtype": dtype,
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "compress": "deflate",
        "predictor": 3 if np.issubdtype(np.dtype(dtype), np.floating) else 2,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data.astype(dtype), 1)
        if tags:
            ds.update_tags(**{key: str(value) for key, value in tags.items()})
    return path


def cell_size_m(
    transform: Affine, crs: CRS | str | None, shape: tuple[int, ...]
) -> tuple[float, float]:
    """(dy, dx) of one cell in metres.

    Geographic CRS: degrees are converted at the latitude of the raster centre with the WGS84
    ellipsoid's radii of curvature, so east-west spacing shrinks with cos(latitude).
    Projected CRS: transform units times the CRS's metres-per-unit factor.
    """
    if crs is None:
        raise DataError("a raster without a CRS has no known cell size in metres")
    crs = CRS.from_user_input(crs)
    dx = math.hypot(transform.a, transform.d)
    dy = math.hypot(transform.b, transform.e)
    if crs.is_geographic:
        height, width = shape[-2], shape[-1]
        _, lat = transform @ (width / 2, height / 2)
        phi = math.radians(lat)
        w = math.sqrt(1.0 - _WGS84_E2 * math.sin(phi) ** 2)
        meridian = _WGS84_A * (1.0 - _WGS84_E2) / w**3  # metres per radian of latitude
        parallel = _WGS84_A / w * math.cos(phi)  # metres per radian of longitude
        return dy * math.radians(1) * meridian, dx * math.radians(1) * parallel
    try:
        factor = float(crs.linear_units_factor[1])
    except CRSError:
        factor = 1.0
    return dy * factor, dx * factor
