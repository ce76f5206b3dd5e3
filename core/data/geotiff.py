"""Single-band elevation GeoTIFFs in and out, with nodata as NaN and cell sizes in metres.

Everything downstream (block means, normalisation, slope in degrees) needs two things a raw
raster read does not give: one uniform marker for missing data, and the true ground size of a
cell. ``read_dem`` turns every nodata convention (a nodata value, an internal mask, NaN, inf)
into NaN, and ``cell_size_m`` turns degrees or projected units into ground metres.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pyproj
import rasterio
from affine import Affine
from pyproj import CRS as PyprojCRS
from pyproj.aoi import AreaOfUse
from rasterio.crs import CRS
from rasterio.errors import CRSError, RasterBlockError, RasterioError
from rasterio.io import DatasetReader, DatasetWriter
from rasterio.transform import array_bounds
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from core.errors import DataError, StorageError
from core.safe_io import probe_refused_write, replaced_when_done

ELEVATION_RANGE_M = (-11_000.0, 9_000.0)
"""Every elevation on Earth lies inside (Challenger Deep -10,935 m, Everest 8,849 m)."""
CELL_SIZE_RANGE_M = (0.1, 5_000.0)
"""Cell sizes of real DEMs, lidar to global grids; outside: a CRS that does not fit."""
PROJECTED_MARGIN_DEG = 5.0
"""How far a projected raster may reach past its CRS's area of use before a warning:
rasters often overhang their UTM zone by a few degrees."""

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
    """Open a single-band, georeferenced GeoTIFF; every problem is a ``DataError`` naming it,
    doubtful georeferencing a warning (``warn_georeferencing``)."""
    require_file(path)
    with open_geotiff(path) as ds:
        if ds.count != 1:
            raise DataError(f"{path}: has {ds.count} bands; an elevation raster needs exactly 1")
        if ds.crs is None:
            raise DataError(
                f"{path}: has no CRS, so its cell size in metres is unknown; set one, "
                "e.g. `rio edit-info --crs EPSG:4326 FILE`"
            )
        warn_georeferencing(path, ds.transform, ds.crs, (ds.height, ds.width))
        yield ds


def read_dem(path: Path | str, *, strict: bool = False) -> Dem:
    """Read a single-band GeoTIFF; every failure is a ``DataError`` naming the file.

    Values no terrain has are voids (``mask_implausible``; an error with ``strict``), and
    doubtful georeferencing is warned about (``warn_georeferencing``).
    """
    path = Path(path)
    with open_dem(path) as ds:
        elevation = read_elevation(ds)
        transform, crs, nodata, tags = ds.transform, ds.crs, ds.nodata, dict(ds.tags())
    mask_implausible(elevation, path, strict=strict)
    if np.isnan(elevation).all():
        raise DataError(f"{path}: every pixel is nodata")
    return Dem(elevation, transform, crs, nodata, tags)


def read_elevation(ds: DatasetReader, window: Window | None = None) -> np.ndarray:
    """Band 1 (or one window of it) as float32, NaN where the file's nodata value, its
    internal mask or a non-finite value says void."""
    elevation = ds.read(1, window=window).astype(np.float32)
    void = ds.read_masks(1, window=window) == 0
    void |= ~np.isfinite(elevation)
    if ds.nodata is not None:
        void |= elevation == np.float32(ds.nodata)
    elevation[void] = np.nan
    return elevation


def implausible(elevation: np.ndarray) -> np.ndarray:
    """Where ``elevation`` holds values no terrain has (NaN is not implausible, only void)."""
    low, high = ELEVATION_RANGE_M
    return (elevation < low) | (elevation > high)


def require_file(path: Path) -> None:
    """A missing input is a ``DataError``; a symbolic link that points nowhere says so."""
    if path.is_file():
        return
    if path.is_symlink():
        raise DataError(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist")
    raise DataError(f"{path}: no such file")


def mask_implausible(elevation: np.ndarray, source: Path | str, *, strict: bool) -> None:
    """Turn values no terrain has into voids (NaN), in place, warning with the file and value.

    Such values are voids that no nodata tag marks (an int16 DEM's -32768, a uint16's
    65535); read as elevations they wreck training and prediction. ``strict``: a DataError.
    """
    low, high = ELEVATION_RANGE_M
    outside = implausible(elevation)
    if not outside.any():
        return
    values = np.unique(elevation[outside])
    shown = ", ".join(f"{value:g}" for value in values[:3])
    more = f" and {len(values) - 3} other values" if len(values) > 3 else ""
    problem = (
        f"{source}: {shown}{more} m lie outside [{low:g}, {high:g}] m, where all terrain "
        "lies: voids without a nodata tag"
    )
    if strict:
        raise DataError(f"{problem} (--strict-data); set the file's nodata value")
    warnings.warn(f"{problem}; treated as voids (--strict-data stops instead)", stacklevel=2)
    elevation[outside] = np.nan


def georeferencing_problems(transform: Affine, crs: CRS, shape: tuple[int, ...]) -> list[str]:
    """What makes the georeferencing doubtful: cell sizes no DEM has, or bounds outside the
    area where the CRS is used (e.g. UTM coordinates labelled EPSG:4326, latitudes past 90)."""
    problems = []
    dy, dx = (abs(size) for size in cell_size_m(transform, crs, shape))
    low, high = CELL_SIZE_RANGE_M
    if not (low <= min(dy, dx) and max(dy, dx) <= high):
        problems.append(
            f"cells of {dy:.4g} x {dx:.4g} m, outside the {low:g} m to {high / 1000:g} km of "
            "any DEM: is the CRS right?"
        )
    area = area_of_use(crs)
    if area is None:
        return problems
    west, south, east, north = lonlat_bounds(transform, crs, shape)
    margin = 0.01 if crs.is_geographic else PROJECTED_MARGIN_DEG
    inside_lat = area.south - margin <= south and north <= area.north + margin
    if crs.is_geographic:  # degrees: any longitude of a -180..180 or 0..360 grid
        inside_lon = -180.0 - margin <= west and east <= 360.0 + margin
    else:
        inside_lon = _within_lon(west, area, margin) and _within_lon(east, area, margin)
    if not (inside_lat and inside_lon):
        problems.append(
            f"bounds {west:.6g} to {east:.6g} E, {south:.6g} to {north:.6g} N lie outside the "
            f"area of use of {crs} ({area.west:g} to {area.east:g} E, {area.south:g} to "
            f"{area.north:g} N): is the CRS right?"
        )
    return problems


def warn_georeferencing(
    path: Path | str, transform: Affine, crs: CRS, shape: tuple[int, ...]
) -> None:
    for problem in georeferencing_problems(transform, crs, shape):
        warnings.warn(f"{path}: {problem}", stacklevel=3)


@functools.lru_cache(maxsize=64)
def area_of_use(crs: CRS) -> AreaOfUse | None:
    """Where the CRS is meant to be used (EPSG's record), if it has one."""
    epsg = crs.to_epsg()
    pyproj_crs = PyprojCRS.from_epsg(epsg) if epsg else PyprojCRS.from_wkt(crs.to_wkt())
    return pyproj_crs.area_of_use


def lonlat_bounds(
    transform: Affine, crs: CRS, shape: tuple[int, ...]
) -> tuple[float, float, float, float]:
    """(west, south, east, north) in degrees; infinite where the corners do not transform."""
    bounds = array_bounds(shape[-2], shape[-1], transform)
    west, south, east, north = bounds[0], bounds[1], bounds[2], bounds[3]
    if crs.is_geographic:  # degrees already
        return west, south, east, north
    try:
        result = transform_bounds(crs, "EPSG:4326", west, south, east, north)
    except (CRSError, RasterioError, ValueError):
        return -math.inf, -math.inf, math.inf, math.inf
    if not all(math.isfinite(value) for value in result):
        return -math.inf, -math.inf, math.inf, math.inf
    return result


def _within_lon(lon: float, area: AreaOfUse, margin: float) -> bool:
    """Whether ``lon`` lies in the area's longitudes, which may cross the antimeridian."""
    if area.west <= area.east:
        return area.west - margin <= lon <= area.east + margin
    return lon >= area.west - margin or lon <= area.east + margin


def geotiff_profile(
    height: int,
    width: int,
    count: int,
    dtype: str,
    crs: CRS | str | None,
    transform: Affine,
    nodata: float | None = None,
) -> dict[str, Any]:
    """The profile of every GeoTIFF terraplug writes: tiled in blocks of up to 256 pixels
    (a multiple of 16, as GeoTIFF requires), deflate with the predictor that suits the
    dtype, BigTIFF when a raster might pass 4 GB."""
    block = 16 * math.ceil(min(256, max(height, width)) / 16)
    floating = np.issubdtype(np.dtype(dtype), np.floating)
    return {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": count,
        "dtype": dtype,
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "compress": "deflate",
        "predictor": 3 if floating else 2,
        "BIGTIFF": "IF_SAFER",
    }


@contextlib.contextmanager
def write_geotiff(path: Path, profile: Mapping[str, Any]) -> Iterator[DatasetWriter]:
    """A GeoTIFF writer on a temporary file that replaces ``path`` only once it reads back
    whole (``replaced_when_done``).

    GDAL reports a write the disk refuses (full, over quota, ``ulimit -f``) to its error
    handler and carries on, closing a truncated file without raising, so the file is read
    back, every block of it, before the rename. A failure is a ``StorageError`` naming
    ``path`` and, when the disk refuses writes, its reason; ``path`` is left as it was. A
    ``RasterioError`` raised in the caller's block stays what it is unless the disk refuses
    writes.
    """
    with replaced_when_done(path) as tmp:
        try:
            with rasterio.open(tmp, "w", **profile) as dst:
                yield dst
            problem = unreadable_part(tmp, profile)
        except RasterioError:
            # raised in the caller's block: a write the disk refused is named by the probe,
            # anything else (one of the caller's own reads, say) is the caller's, as it is
            probe_refused_write(tmp)
            raise
        if problem is not None:
            probe_refused_write(tmp)  # the disk's OSError becomes a StorageError naming path
            raise StorageError(f"writing {path} failed: {problem} (left as it was)")


def unreadable_part(path: Path, profile: Mapping[str, Any]) -> str | None:
    """What keeps ``path`` from reading back as the GeoTIFF ``profile`` describes: not a
    GeoTIFF, other bands or size, a block never written (GDAL leaves its size 0) or one that
    cannot be read. None when every block reads."""
    wanted = (profile["count"], profile["height"], profile["width"], np.dtype(profile["dtype"]))
    try:
        with rasterio.Env(**GEOTIFF_ONLY), rasterio.open(path, driver="GTiff") as ds:
            found = (ds.count, ds.height, ds.width, np.dtype(ds.dtypes[0]))
            if found != wanted:
                return f"it reads back as {found} (bands, height, width, dtype), not {wanted}"
            for (row, col), window in ds.block_windows(1):
                try:
                    for band in ds.indexes:
                        ds.block_size(band, row, col)
                except RasterBlockError:
                    return f"block {row},{col} holds no data"
                ds.read(window=window)
    except RasterioError as error:
        return f"it does not read back ({error.__cause__ or error})"
    return None


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
    profile = geotiff_profile(*data.shape, 1, dtype, crs, transform, nodata)
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
    Projected CRS: transform units times the CRS's metres-per-unit factor, divided by the
    projection's meridional (dy) and parallel (dx) scale factors at the raster centre
    (``pyproj.Proj.get_factors``). A unit of Web Mercator is 1/cos(latitude) ground metres
    too long, a UTM metre within 0.1 % of one: only the ground size gives true slopes.
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
    meridional, parallel = _scale_factors(crs, transform @ (shape[-1] / 2, shape[-2] / 2))
    return dy * factor / meridional, dx * factor / parallel


def _scale_factors(crs: CRS, centre: tuple[float, float]) -> tuple[float, float]:
    """(meridional, parallel) scale of a projected CRS at ``centre``; (1, 1) where PROJ
    cannot tell (a local or engineering CRS)."""
    try:
        proj = _proj(crs.to_wkt())
        lon, lat = proj(*centre, inverse=True)
        factors = proj.get_factors(lon, lat)
    except (pyproj.exceptions.CRSError, pyproj.exceptions.ProjError):
        return 1.0, 1.0
    scales = (factors.meridional_scale, factors.parallel_scale)
    return scales if all(math.isfinite(s) and s > 0 for s in scales) else (1.0, 1.0)


@functools.lru_cache(maxsize=16)
def _proj(wkt: str) -> pyproj.Proj:
    """One ``Proj`` per CRS: building one costs far more than using it, and the window index
    asks for the cell size of every window."""
    return pyproj.Proj(wkt)
