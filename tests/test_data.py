"""The data layer on real GeoTIFFs: reading, nodata, LR/HR pairs, labels, splits, procedural."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.transform import array_bounds
from rasterio.warp import Resampling, calculate_default_transform, reproject
from rasterio.windows import Window
from torch.utils.data import DataLoader

from core.data.datasets import train_val_split
from core.data.distfiles import SRTM90, fetch
from core.data.geotiff import cell_size_m, read_dem, write_dem
from core.errors import DataError
from core.tasks.dem_sr.data.dataset import TileDataset, block_mean
from core.tasks.dem_sr.data.globe import GLOBE_REGIONS
from core.tasks.dem_sr.data.labels import (
    DEM_THRESHOLDS,
    REGIONS,
    SEED_REGIONS,
    label_from_dem,
    label_from_tile_id,
    label_tile,
    terrain_stats,
)
from core.tasks.dem_sr.data.procedural import write_procedural_tiles
from core.tasks.dem_sr.metrics import horn_slope_deg
from core.tasks.dem_sr.terrain import TERRAINS, terrain_index

UTM = "EPSG:32613"
CELL = 30.0


def utm(cell: float = CELL) -> Affine:
    return Affine(cell, 0.0, 500_000.0, 0.0, -cell, 4_400_000.0)


def rough_surface(shape: tuple[int, int] = (48, 48), seed: int = 0) -> np.ndarray:
    """Hilly terrain around 1000 m: a smooth wave plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]]
    return 1000 + 40 * np.sin(x / 7.0) * np.cos(y / 5.0) + rng.normal(0, 3, shape)


def plane(slope_deg: float, shape: tuple[int, int] = (48, 48), cell: float = CELL) -> np.ndarray:
    """Elevation rising eastwards at ``slope_deg``."""
    x = np.arange(shape[1]) * cell
    return np.broadcast_to(500 + math.tan(math.radians(slope_deg)) * x, shape).copy()


# --- GeoTIFF reading and writing -------------------------------------------------------------


def test_write_read_round_trip_keeps_georeferencing_nodata_and_tags(tmp_path: Path) -> None:
    z = rough_surface()
    z[3, 4] = np.nan
    path = write_dem(tmp_path / "a.tif", z, utm(), UTM, nodata=-9999, tags={"region": "x"})
    dem = read_dem(path)
    assert dem.elevation.dtype == np.float32 and dem.elevation.shape == (48, 48)
    assert np.isnan(dem.elevation[3, 4])
    # stored as float32: one rounding, 6e-8 relative
    np.testing.assert_allclose(dem.elevation[~np.isnan(z)], z[~np.isnan(z)], rtol=1e-6)
    assert dem.transform == utm() and dem.crs.to_epsg() == 32613
    assert dem.nodata == -9999 and dem.tags["region"] == "x"
    with rasterio.open(path) as ds:
        assert ds.profile["compress"] == "deflate" and ds.read(1)[3, 4] == -9999
    large = write_dem(tmp_path / "large.tif", np.zeros((300, 300)), utm(), UTM)
    with rasterio.open(large) as ds:
        assert ds.profile["tiled"] and ds.block_shapes == [(256, 256)]


@pytest.mark.parametrize("nodata", [-32768.0, -9999.0, float("nan")])
def test_nodata_is_masked_and_never_leaks_into_normalisation(tmp_path: Path, nodata: float):
    z = rough_surface()
    void = np.zeros_like(z, dtype=bool)
    void[10:14, 20:23] = True  # touches LR blocks (3,6), (3,7), (4,6), (4,7) at scale 3
    void[40, 1] = True
    raw = np.where(void, nodata, z)
    dtype = "int16" if nodata == -32768 else "float32"
    write_dem(tmp_path / "tile.tif", raw, utm(), UTM, nodata=nodata, dtype=dtype)
    dem = read_dem(tmp_path / "tile.tif")
    assert np.array_equal(np.isnan(dem.elevation), void)

    sample = TileDataset.from_folder(tmp_path, 3)[0]
    assert torch.equal(sample["mask"][0], torch.from_numpy(~void))
    for key in ("lr", "hr"):
        assert torch.isfinite(sample[key]).all()
    assert (sample["hr"][0][torch.from_numpy(void)] == 0).all()
    stored = dem.elevation
    lr = block_mean(stored, 3)
    assert np.isnan(lr[3:5, 6:8]).all() and np.isnan(lr[13, 0])
    valid_lr = lr[np.isfinite(lr)]
    # the dataset's own numpy reductions of the same float32 cells: rel 1e-6 covers their
    # float32 copies in the sample (6e-8); a leaked nodata value moves both by far more
    assert sample["mean"].item() == pytest.approx(valid_lr.mean(), rel=1e-6)
    assert sample["std"].item() == pytest.approx(valid_lr.std(), rel=1e-6)
    assert (sample["lr"][0][torch.from_numpy(np.isnan(lr))] == 0).all()
    hr_m = sample["hr"][0] * sample["std"] + sample["mean"]
    # float32 de-normalisation of ~1000 m: a few ulps of 6e-5 m
    np.testing.assert_allclose(hr_m.numpy()[~void], stored[~void], atol=1e-3)


def test_global_normalisation_divides_every_window_by_one_scale(tmp_path: Path) -> None:
    """``data.normalisation = "global"``: each window keeps its own LR mean but every one is
    divided by ``global_scale_m``, so a rugged window's normalised values spread wider than a
    gentle one's by the ratio of their reliefs, where per-window scales make both spread
    alike; metres come back either way."""
    gentle = 800 + 0.1 * rough_surface(seed=1)  # about 4 m of relief
    rugged = rough_surface(seed=2)  # about 40 m
    for name, z in (("gentle", gentle), ("rugged", rugged)):
        write_dem(tmp_path / f"{name}.tif", z, utm(), UTM)
    per_tile = TileDataset.from_folder(tmp_path, 3)
    shared = TileDataset.from_folder(tmp_path, 3, global_scale_m=25.0)
    assert [Path(p).stem for p in shared.paths] == ["gentle", "rugged"]
    spreads = {}
    for kind, dataset in (("per_tile", per_tile), ("global", shared)):
        samples = [dataset[i] for i in range(2)]
        spreads[kind] = [sample["hr"].std().item() for sample in samples]
        for sample, z in zip(samples, (gentle, rugged), strict=True):
            # de-normalised in float32 around 1000 m: a few ulps of 6e-5 m
            hr_m = (sample["hr"][0] * sample["std"] + sample["mean"]).numpy()
            np.testing.assert_allclose(hr_m, z, atol=1e-3)
            assert sample["mean"].item() == pytest.approx(block_mean(z, 3).mean(), rel=1e-6)
    assert [shared[i]["std"].item() for i in range(2)] == [25.0, 25.0]
    assert shared.subset([1])[0]["std"].item() == 25.0  # a view keeps the scale
    # per window both spread about 1 (the HR's std against its LR's, which block means smooth)
    assert spreads["per_tile"] == pytest.approx([1.0, 1.0], rel=0.2)
    ratio = spreads["global"][1] / spreads["global"][0]
    assert ratio == pytest.approx(rugged.std() / gentle.std(), rel=1e-3)  # float32 sums


def test_block_mean_lr_and_crop_to_a_multiple_of_scale(tmp_path: Path) -> None:
    z = np.arange(50 * 50, dtype=np.float64).reshape(50, 50)
    write_dem(tmp_path / "t.tif", z, utm(), UTM)
    ds = TileDataset.from_folder(tmp_path, 3)
    sample = ds[0]
    assert sample["hr"].shape == (1, 48, 48) and sample["lr"].shape == (1, 16, 16)
    lr_m = (sample["lr"][0] * sample["std"] + sample["mean"]).double().numpy()
    expected = z[:48, :48].reshape(16, 3, 16, 3).mean(axis=(1, 3))
    # float32 normalised values back in metres err by a few ulps of the mean (1.2e-4 m at
    # 1200 m); rtol 1e-5 of the smallest value (51 m) is 5e-4 m
    np.testing.assert_allclose(lr_m, expected, rtol=1e-5)
    # approx's rel 1e-6: a float32 mean of 256 positive cells, within ~1e-7 of float64's
    assert sample["mean"].item() == pytest.approx(expected.mean())


def test_std_is_floored_for_flat_tiles(tmp_path: Path) -> None:
    write_dem(tmp_path / "lake.tif", np.full((12, 12), 104.0), utm(), UTM)
    sample = TileDataset.from_folder(tmp_path, 2, tile_size=12)[0]
    assert sample["std"].item() == 1.0 and sample["mean"].item() == pytest.approx(104.0)  # exact
    assert torch.count_nonzero(sample["hr"]) == 0


def test_paired_hr_lr_folders_read_lr_from_disk(tmp_path: Path) -> None:
    hr = rough_surface((12, 12))
    lr = block_mean(hr, 2) + 7.0  # not the block mean: proves lr/ is read
    for name in ("a.tif", "b.tif"):
        write_dem(tmp_path / "hr" / name, hr, utm(), UTM)
        write_dem(tmp_path / "lr" / name, lr, utm(2 * CELL), UTM)
    ds = TileDataset.from_folder(tmp_path, 2, tile_size=12)
    assert ds.tile_ids == ["a", "b"]
    sample = ds[0]
    lr_m = sample["lr"][0] * sample["std"] + sample["mean"]
    np.testing.assert_allclose(lr_m.numpy(), lr, atol=1e-3)  # float32 metres: ulp 6e-5 at 1000
    assert sample["mean"].item() == pytest.approx(lr.mean(), rel=1e-6)  # the same numpy mean


def test_paired_shape_mismatch_names_both_files(tmp_path: Path) -> None:
    write_dem(tmp_path / "hr" / "a.tif", rough_surface((12, 12)), utm(), UTM)
    write_dem(tmp_path / "lr" / "a.tif", rough_surface((5, 5)), utm(2 * CELL), UTM)
    with pytest.raises(DataError) as info:
        TileDataset.from_folder(tmp_path, 2, tile_size=12, strict=True)
    assert str(tmp_path / "hr" / "a.tif") in str(info.value)
    assert str(tmp_path / "lr" / "a.tif") in str(info.value)


@pytest.mark.parametrize("lat", [0.0, 45.0, 60.0])
def test_cell_size_of_a_geographic_raster_at_known_latitudes(lat: float) -> None:
    step = 1 / 120  # 30 arc-seconds; 48 rows centred on ``lat``
    transform = Affine(step, 0, 10.0, 0, -step, lat + 24 * step)
    dy, dx = cell_size_m(transform, "EPSG:4326", (48, 48))
    # By hand, with the textbook WGS84 series for the length of one degree:
    phi = math.radians(lat)
    per_deg_lat = 111_132.92 - 559.82 * math.cos(2 * phi) + 1.175 * math.cos(4 * phi)
    per_deg_lon = 111_412.84 * math.cos(phi) - 93.5 * math.cos(3 * phi)
    # rel 1e-5: the series drops terms of ~1.5e-6 relative (float64 rounding is 1e-16)
    assert dy == pytest.approx(per_deg_lat * step, rel=1e-5)
    assert dx == pytest.approx(per_deg_lon * step, rel=1e-5)
    if lat == 45.0:  # values published to 0.1 m
        assert (dy, dx) == pytest.approx((926.1, 657.1), abs=0.1)


def test_cell_size_of_projected_rasters_uses_linear_units_and_scale() -> None:
    # UTM's scale factor is within 0.1 % of 1: a 30 m cell is 30 m on the ground, near enough.
    assert cell_size_m(utm(), UTM, (48, 48)) == pytest.approx((30.0, 30.0), rel=1e-3)
    dy, dx = cell_size_m(utm(100.0), "EPSG:2229", (10, 10))  # California, US survey feet
    # 100 ft = 30.48 m, within the Lambert zone's scale error (< 0.5 % this far from its centre)
    # dx == dy: a conformal projection scales both alike, up to float64 rounding (~1e-11)
    assert dy == pytest.approx(30.48006, rel=5e-3) and dx == pytest.approx(dy, rel=1e-6)
    # Web Mercator at 60°N: a 100-unit cell is 100 * cos(60°) = 50 ground metres (PROJ's
    # sphere; the WGS84 ellipsoid's scale there is 0.25 % off it, which 5e-3 admits).
    north = 8_399_737.9  # y of 60°N in EPSG:3857
    dy, dx = cell_size_m(Affine(100, 0, 0, 0, -100, north + 500), "EPSG:3857", (10, 10))
    assert (dy, dx) == pytest.approx((50.0, 50.0), rel=5e-3)


@pytest.mark.parametrize("crs", ["EPSG:3857", "EPSG:32611"])
def test_the_same_terrain_has_the_same_slope_in_any_crs(crs: str) -> None:
    """A real SRTM subset (EPSG:4326) reprojected to Web Mercator or its UTM zone keeps its
    mean slope within 1 %: slopes use ground metres, not projection units."""
    with rasterio.open(fetch(SRTM90)) as ds:
        window = Window(2400, 1400, 240, 240)  # Sierra crest near 37.5°N, 119°W: steep
        elevation = ds.read(1, window=window).astype(np.float32)
        transform, source_crs = ds.window_transform(window), ds.crs
    bounds = array_bounds(*elevation.shape, transform)
    target, width, height = calculate_default_transform(source_crs, crs, 240, 240, *bounds)
    projected = np.full((height, width), np.nan, dtype=np.float32)
    reproject(
        elevation, projected, src_transform=transform, src_crs=source_crs,
        dst_transform=target, dst_crs=crs, resampling=Resampling.cubic, dst_nodata=np.nan,
    )  # fmt: skip

    def central_mean_slope(z: np.ndarray, transform: Affine, crs: str) -> float:
        slope = horn_slope_deg(z[None, None], cell_size_m(transform, crs, z.shape))[0, 0]
        h, w = slope.shape
        return float(np.nanmean(slope[h // 6 : -h // 6, w // 6 : -w // 6]))

    geographic = central_mean_slope(elevation, transform, "EPSG:4326")
    assert geographic > 20
    assert central_mean_slope(projected, target, crs) == pytest.approx(geographic, rel=0.01)


# --- bad input -------------------------------------------------------------------------------


def write_raw(path: Path, bands: int = 1, crs: str | None = UTM) -> Path:
    """A GeoTIFF that ``write_dem`` would refuse to make: several bands or no CRS."""
    profile = {"driver": "GTiff", "width": 12, "height": 12, "dtype": "float32"}
    with rasterio.open(path, "w", count=bands, crs=crs, transform=utm(), **profile) as ds:
        ds.write(np.ones((bands, 12, 12), dtype=np.float32))
    return path


def truncated(path: Path) -> Path:
    write_dem(path, rough_surface(), utm(), UTM)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def text_file(path: Path) -> Path:
    path.write_text("elevation,1000\n")
    return path


def all_nodata(path: Path) -> Path:
    return write_dem(path, np.full((12, 12), -9999.0), utm(), UTM, nodata=-9999)


BAD_FILES = {
    "truncated": (truncated, "not a readable GeoTIFF"),
    "text named .tif": (text_file, "not a readable GeoTIFF"),
    "three bands": (lambda p: write_raw(p, bands=3), "has 3 bands"),
    "no CRS": (lambda p: write_raw(p, crs=None), "has no CRS"),
    "all nodata": (all_nodata, "every pixel is nodata"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_files_raise_data_error_naming_the_file(tmp_path: Path, kind: str) -> None:
    make, problem = BAD_FILES[kind]
    path = make(tmp_path / "bad.tif")
    with pytest.raises(DataError, match=problem) as info:
        read_dem(path)
    assert str(path) in str(info.value)
    with pytest.raises(DataError, match=problem) as info:
        TileDataset.from_folder(tmp_path, 2, tile_size=12, strict=True)
    assert str(path) in str(info.value)


def test_bad_tiles_are_skipped_with_a_warning_unless_strict(tmp_path: Path) -> None:
    for n in range(3):
        write_dem(tmp_path / f"good_{n}.tif", rough_surface((12, 12), n), utm(), UTM)
    (tmp_path / "sub").mkdir()
    bad = text_file(tmp_path / "sub" / "broken.tif")
    odd = write_dem(tmp_path / "too_small.tif", rough_surface((8, 8)), utm(), UTM)
    with pytest.warns(UserWarning) as caught:
        ds = TileDataset.from_folder(tmp_path, 2, tile_size=12)
    warned = [str(w.message) for w in caught]
    assert len(warned) == 2 and str(bad) in warned[0] and str(odd) in warned[1]
    assert ds.tile_ids == ["good_0", "good_1", "good_2"]
    assert [path for path, _ in ds.skipped] == [str(bad), str(odd)]
    with pytest.raises(DataError, match=r"broken\.tif"):
        TileDataset.from_folder(tmp_path, 2, tile_size=12, strict=True)


def test_empty_or_missing_folder_and_no_usable_tile(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no .tif or .tiff files") as info:
        TileDataset.from_folder(tmp_path, 2, tile_size=12)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(DataError, match="not a GeoTIFF or a folder of GeoTIFFs"):
        TileDataset.from_folder(tmp_path / "missing", 2, tile_size=12)
    text_file(tmp_path / "only.tif")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="none of the 1") as info:
        TileDataset.from_folder(tmp_path, 2, tile_size=12)
    assert str(tmp_path) in str(info.value)


# --- dataset behaviour -----------------------------------------------------------------------


def test_samples_collate_with_the_default_collate(procedural_dir: Path) -> None:
    ds = TileDataset.from_folder(procedural_dir, 3)
    batch = next(iter(DataLoader(ds, batch_size=5, shuffle=False)))
    assert batch["lr"].shape == (5, 1, 16, 16) and batch["lr"].dtype == torch.float32
    assert batch["hr"].shape == (5, 1, 48, 48) and batch["mask"].dtype == torch.bool
    assert batch["terrain"].dtype == torch.int64 and batch["terrain"].shape == (5,)
    assert batch["mean"].shape == (5,) and batch["std"].dtype == torch.float32
    assert batch["cell_size"].shape == (5, 2)
    # rtol 1e-3: UTM's scale factor is within 0.1 % of 1
    assert torch.allclose(batch["cell_size"], torch.tensor([CELL, CELL]), rtol=1e-3)
    assert batch["idx"].tolist() == [0, 1, 2, 3, 4] and len(batch["tile_id"]) == 5


def test_terrains_come_from_names_and_are_kept(procedural_dir: Path) -> None:
    ds = TileDataset.from_folder(procedural_dir, 4)
    assert len(ds) == 40 and ds.scale == 4
    for tile_id, terrain, path in zip(ds.tile_ids, ds.terrains, ds.paths, strict=True):
        assert TERRAINS[terrain] == tile_id.split("_")[0] and path.stem == tile_id
    assert ds.terrains.dtype == np.int64
    assert np.bincount(ds.terrains).tolist() == [8] * 5


def test_subset_is_a_renumbered_view(procedural_dir: Path) -> None:
    ds = TileDataset.from_folder(procedural_dir, 3)
    sub = ds.subset([7, 2, 30])
    assert len(sub) == 3 and sub.tile_ids == [ds.tile_ids[i] for i in (7, 2, 30)]
    assert sub.terrains.tolist() == [ds.terrains[i] for i in (7, 2, 30)]
    sample = sub[2]
    assert sample["idx"] == 2 and sample["tile_id"] == ds.tile_ids[30]
    assert torch.equal(sample["hr"], ds[30]["hr"])
    assert sub.subset([1])[0]["tile_id"] == ds.tile_ids[2]


def test_split_is_stratified_disjoint_and_deterministic(procedural_dir: Path) -> None:
    ds = TileDataset.from_folder(procedural_dir, 3)
    train, val = train_val_split(ds, 0.25, seed=1)
    assert sorted(train.tile_ids + val.tile_ids) == sorted(ds.tile_ids)
    assert not set(train.tile_ids) & set(val.tile_ids)
    assert np.bincount(val.terrains, minlength=5).tolist() == [2] * 5
    again_train, again_val = train_val_split(ds, 0.25, seed=1)
    assert again_val.tile_ids == val.tile_ids and again_train.tile_ids == train.tile_ids
    assert train_val_split(ds, 0.25, seed=2)[1].tile_ids != val.tile_ids
    with pytest.raises(DataError, match="val_fraction"):
        train_val_split(ds, 1.0, seed=0)


def test_split_gives_every_terrain_with_two_tiles_a_val_tile(procedural_dir: Path) -> None:
    ds = TileDataset.from_folder(procedural_dir, 3)
    flat = np.flatnonzero(ds.terrains == terrain_index("flat"))
    alpine = np.flatnonzero(ds.terrains == terrain_index("alpine"))
    rest = np.flatnonzero(~np.isin(ds.terrains, [terrain_index("flat"), terrain_index("alpine")]))
    small = ds.subset(np.concatenate([flat[:1], alpine[:2], rest]))
    train, val = train_val_split(small, 0.05, seed=0)
    assert len(train) + len(val) == len(small)
    per_terrain = np.bincount(val.terrains, minlength=5)
    assert per_terrain[terrain_index("flat")] == 0  # a single tile stays in training
    assert per_terrain[terrain_index("alpine")] == 1
    assert (per_terrain[[terrain_index(t) for t in ("moderate", "desert", "extreme")]] == 1).all()


# --- terrain labels --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tile_id", "category"),
    [
        ("death_valley_tile_00012", "desert"),
        ("Death-Valley 3", "desert"),
        ("kansas", "flat"),
        ("tile_7_zion", "extreme"),
        ("grand_canyon_utah_canyonlands_1", "desert"),  # the longer name wins
        ("alps_tile_0", "alpine"),
        ("FLAT_tile_3", "flat"),
        ("flatiron_tile_1", None),  # "flat" glued to letters is another word
        ("kansas2_tile", None),
        ("horizon_tile_4", None),  # contains "zion"
        ("glaciers_1", None),
        ("tile_123", None),
    ],
)
def test_label_from_tile_id(tile_id: str, category: str | None) -> None:
    assert label_from_tile_id(tile_id) == category


def test_region_table_covers_seed_globe_and_category_names() -> None:
    assert set(REGIONS.values()) == set(TERRAINS)
    assert SEED_REGIONS.items() <= REGIONS.items() and len(SEED_REGIONS) == 13
    for region in GLOBE_REGIONS:
        assert REGIONS[region.name] == region.category
    for category in TERRAINS:
        assert REGIONS[category] == category


@pytest.mark.parametrize(
    ("slope", "category"), [(1.0, "flat"), (5.0, "moderate"), (20.0, "alpine"), (35.0, "extreme")]
)
def test_label_from_dem_on_planes_of_known_slope(slope: float, category: str) -> None:
    z = plane(slope)
    stats = terrain_stats(z, (CELL, CELL))  # float64 on an exact plane: rounding ~1e-14
    assert stats.mean_slope_deg == pytest.approx(slope, abs=1e-6)
    assert stats.roughness_m == pytest.approx(0.0, abs=1e-6)
    assert label_from_dem(z, (CELL, CELL)) == category
    holes = z.copy()
    holes[5:9, 5:9] = np.nan
    assert terrain_stats(holes, (CELL, CELL)).mean_slope_deg == pytest.approx(slope, abs=1e-6)


def test_label_from_dem_uses_the_true_cell_size() -> None:
    z = plane(10.0)  # 10° at 30 m cells ...
    assert label_from_dem(z, (CELL, CELL)) == "moderate"
    squeezed = terrain_stats(z, (CELL, CELL / 3))  # ... is steeper where dx is a third as long
    steeper = math.degrees(math.atan(3 * math.tan(math.radians(10.0))))
    assert squeezed.mean_slope_deg == pytest.approx(steeper, abs=1e-6)  # float64: ~1e-14
    assert label_from_dem(z, (CELL, CELL / 3)) == "alpine"


def test_label_from_dem_ignores_regional_tilt_but_not_roughness() -> None:
    tilted = plane(2.0, cell=1000.0)  # 1.7 km of relief across 48 km, yet a plain
    stats = terrain_stats(tilted, (1000.0, 1000.0))
    assert stats.relief_m > 1500 and label_from_dem(tilted, (1000.0, 1000.0)) == "flat"
    y, x = np.mgrid[:48, :48]
    for amplitude, category in ((30, "moderate"), (500, "alpine"), (1100, "extreme")):
        hills = amplitude * np.sin(2 * np.pi * x / 48) * np.sin(2 * np.pi * y / 48)
        stats = terrain_stats(hills, (1000.0, 1000.0))
        assert stats.mean_slope_deg < DEM_THRESHOLDS["alpine"][1]  # roughness decides
        # whole periods: the std is amplitude / 2 exactly, up to float64 rounding (~1e-16)
        assert stats.roughness_m == pytest.approx(amplitude / 2, rel=1e-6)
        assert label_from_dem(hills, (1000.0, 1000.0)) == category


def test_label_tile_reports_its_source() -> None:
    z = plane(35.0)
    assert label_tile("flat_tile_1", z, (CELL, CELL)) == ("flat", "region")  # the user's word
    assert label_tile("kansas_tile_1", z, (CELL, CELL)) == ("extreme", "dem")  # a region, overruled
    assert label_tile("unnamed_1", z, (CELL, CELL)) == ("extreme", "dem")


# --- procedural tiles ------------------------------------------------------------------------


def test_procedural_tiles_are_deterministic_and_named(tmp_path: Path) -> None:
    out = write_procedural_tiles(tmp_path / "a", seed=5)
    write_procedural_tiles(tmp_path / "b", seed=5)
    names = sorted(p.name for p in out.glob("*.tif"))
    assert names == sorted(f"{t}_tile_{n}.tif" for t in TERRAINS for n in range(8))
    write_procedural_tiles(tmp_path / "c", seed=6)
    a, b, c = (read_dem(tmp_path / d / "desert_tile_3.tif") for d in "abc")
    assert np.array_equal(a.elevation, b.elevation) and not np.array_equal(a.elevation, c.elevation)
    # rel 1e-3: UTM's scale factor is within 0.1 % of 1
    assert a.crs.is_projected and a.cell_size_m() == pytest.approx((30.0, 30.0), rel=1e-3)


def test_procedural_categories_measure_as_their_names(procedural_dir: Path) -> None:
    for path in sorted(procedural_dir.glob("*.tif")):
        category = path.stem.split("_")[0]
        dem = read_dem(path)
        measured = label_from_dem(dem.elevation, dem.cell_size_m())
        assert measured == category or category == "desert", (path.name, measured)
