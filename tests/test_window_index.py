"""Rasters of any size as windows: the index, the windowed reads, and the spatial split."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from pyproj import Transformer
from torch.utils.data import DataLoader

from core.config import DataSection
from core.data import window_index
from core.data.geotiff import write_dem
from core.errors import DataError
from core.run import main
from core.tasks.dem_sr.data import dataset as dataset_module
from core.tasks.dem_sr.data.dataset import TileDataset, block_mean, load_split
from core.tasks.dem_sr.data.labels import terrain_stats
from core.tasks.dem_sr.terrain import TERRAINS
from tests.conftest import FAST, read_metrics

UTM = "EPSG:32613"
CELL = 30.0


def hills(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Smooth random relief of a few hundred metres, different everywhere."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    z = 1500 + 0.5 * rows + 0.3 * cols
    for _ in range(6):
        fy, fx, phase = rng.uniform(0.01, 0.08), rng.uniform(0.01, 0.08), rng.uniform(0, 6)
        z += rng.uniform(20, 120) * np.sin(fy * rows + phase) * np.cos(fx * cols)
    return z


def utm_raster(path: Path, shape: tuple[int, int], x0: float = 500_000.0, seed: int = 0) -> Path:
    transform = Affine.translation(x0, 4_400_000.0) @ Affine.scale(CELL, -CELL)
    return write_dem(path, hills(shape, seed), transform, UTM)


def test_a_large_raster_is_read_as_its_lattice_of_windows(tmp_path: Path) -> None:
    path = utm_raster(tmp_path / "big.tif", (500, 300))
    dataset = TileDataset.from_folder(path, 3)
    assert len(dataset) == (500 // 48) * (300 // 48)  # the remainder rows and columns left out
    with rasterio.open(path) as ds:
        whole = ds.read(1)
    for i in (0, 7, len(dataset) - 1):
        sample = dataset[i]
        row, col = dataset.index["row"][i], dataset.index["col"][i]
        hr = sample["hr"][0].double() * sample["std"].double() + sample["mean"].double()
        expected = whole[row : row + 48, col : col + 48]
        # float32 normalised values of ~1500 m back in metres: a few ulps (1.2e-4 m)
        np.testing.assert_allclose(hr.numpy(), expected, atol=1e-3)
        lr = sample["lr"][0].double() * sample["std"].double() + sample["mean"].double()
        np.testing.assert_allclose(lr.numpy(), block_mean(expected, 3), atol=1e-3)
        stats = terrain_stats(expected, (CELL, CELL))
        for name in ("relief_m", "roughness_m", "mean_slope_deg"):
            # stored as float32 (6e-8 relative); UTM's scale factor moves cell sizes by <0.1 %
            assert dataset.index[name][i] == pytest.approx(getattr(stats, name), rel=2e-3)
    assert dataset.tile_ids[0] == "big_r0_c0" and len(set(dataset.tile_ids)) == len(dataset)


def test_small_tiles_and_a_large_raster_mix_in_one_folder(tmp_path: Path) -> None:
    utm_raster(tmp_path / "large.tif", (200, 200))
    for n in range(3):
        utm_raster(tmp_path / "tiles" / f"tile_{n}.tif", (48, 48), 600_000.0 + n * 3000, n)
    dataset = TileDataset.from_folder(tmp_path, 3)
    assert len(dataset) == 16 + 3
    assert dataset.tile_ids[-3:] == ["tile_0", "tile_1", "tile_2"]


def test_the_index_is_built_once_and_rebuilt_when_a_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "indexes"
    monkeypatch.setattr(window_index, "index_folder", lambda: folder)
    path = utm_raster(tmp_path / "dem.tif", (150, 150))
    first_mean = TileDataset.from_folder(path, 3)[0]["mean"].item()
    assert len(list(folder.glob("*.npz"))) == 1
    write_dem(path, hills((150, 150)) + 100.0, Affine(CELL, 0, 5e5, 0, -CELL, 4.4e6), UTM)
    again = TileDataset.from_folder(path, 3)
    assert len(list(folder.glob("*.npz"))) == 2
    # rel 1e-6: float32 means of ~1500 m, each within a few ulps of the exact one
    assert again[0]["mean"].item() == pytest.approx(first_mean + 100.0, rel=1e-6)

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the index was built again")

    monkeypatch.setattr(dataset_module, "build_index", no_build)
    cached = TileDataset.from_folder(path, 3)  # read back
    assert cached.tile_ids == again.tile_ids and (cached.terrains == again.terrains).all()
    with pytest.raises(AssertionError, match="built again"):  # another setting: a new index
        TileDataset.from_folder(path, 3, tile_size=24)


def test_a_damaged_index_is_built_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "indexes"
    monkeypatch.setattr(window_index, "index_folder", lambda: folder)
    path = utm_raster(tmp_path / "dem.tif", (100, 100))
    first = TileDataset.from_folder(path, 3).tile_ids
    (stored,) = folder.glob("*.npz")
    stored.write_bytes(stored.read_bytes()[:100])  # truncated
    assert TileDataset.from_folder(path, 3).tile_ids == first
    assert not list(folder.glob("*.tmp"))


def test_dataloader_workers_read_the_same_windows(tmp_path: Path) -> None:
    dataset = TileDataset.from_folder(utm_raster(tmp_path / "dem.tif", (200, 200)), 3)
    alone = next(iter(DataLoader(dataset, batch_size=16)))
    forked = next(iter(DataLoader(dataset, batch_size=8, num_workers=2)))
    assert torch.equal(alone["hr"][:8], forked["hr"])


def mixed_crs_folder(folder: Path) -> Path:
    """Two UTM rasters side by side and a geographic raster that overlaps the first."""
    utm_raster(folder / "utm_a.tif", (480, 480), 500_000.0, seed=1)
    utm_raster(folder / "utm_b.tif", (240, 480), 500_000.0 + 480 * CELL, seed=2)
    to_lonlat = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    lon, lat = to_lonlat.transform(500_000.0 + 100 * CELL, 4_400_000.0 - 100 * CELL)
    step = 1 / 3600  # 1 arc-second, about 30 m
    transform = Affine.translation(lon, lat) @ Affine.scale(step, -step)
    write_dem(folder / "geographic.tif", hills((240, 240), 3), transform, "EPSG:4326")
    return folder


def lonlat_boxes(dataset: TileDataset) -> np.ndarray:
    boxes = dataset.bounds().copy()
    for crs in set(dataset.crs()):
        group = dataset.crs() == crs
        to_lonlat = Transformer.from_crs(str(crs), "EPSG:4326", always_xy=True)
        left, bottom, right, top = boxes[group].T
        lon, lat = to_lonlat.transform(
            np.stack([left, right, left, right]), np.stack([bottom, bottom, top, top])
        )
        boxes[group] = np.stack([lon.min(0), lat.min(0), lon.max(0), lat.max(0)], axis=1)
    return boxes


def touching_pairs(a: np.ndarray, b: np.ndarray, gap: np.ndarray | float = 0.0) -> int:
    """Pairs of boxes (left, bottom, right, top) that overlap, touch, or lie closer than
    ``gap``: every pair compared, independently of the split's own search."""
    count = 0
    for box_a, box_b in itertools.product(a, b):
        near_x = box_a[0] < box_b[2] + gap[0] and box_b[0] < box_a[2] + gap[0]
        near_y = box_a[1] < box_b[3] + gap[1] and box_b[1] < box_a[3] + gap[1]
        count += near_x and near_y
    return count


def test_the_spatial_split_keeps_a_window_between_training_and_validation(
    tmp_path: Path,
) -> None:
    data = DataSection(val_block=2)
    train, val = load_split(mixed_crs_folder(tmp_path), data, seed=0)
    assert len(train) > 0 and len(val) > 0
    assert set(train.tile_ids).isdisjoint(val.tile_ids)
    # in each CRS: no validation window comes within one window (48 cells) of a training one;
    # the bounds are exact multiples of the cell size, so the comparison is exact
    for crs in set(val.crs()):
        gap = np.array([48 * CELL, 48 * CELL]) - 1e-6 if crs == UTM else np.zeros(2)
        pairs = touching_pairs(
            val.bounds()[val.crs() == crs], train.bounds()[train.crs() == crs], gap
        )
        assert pairs == 0
    # across CRSs, in longitude and latitude: a window apart too (the smaller window, a
    # 1" window of 48 cells, less a hair)
    gap = np.full(2, 48 / 3600) - 1e-9
    val_boxes, train_boxes = lonlat_boxes(val), lonlat_boxes(train)
    for crs in set(val.crs()):
        others = train.crs() != crs
        assert touching_pairs(val_boxes[val.crs() == crs], train_boxes[others], gap) == 0


def test_the_spatial_split_is_seeded(tmp_path: Path) -> None:
    folder = mixed_crs_folder(tmp_path)
    data = DataSection(val_block=2)
    first = load_split(folder, data, seed=0)[1].tile_ids
    assert load_split(folder, data, seed=0)[1].tile_ids == first
    assert any(load_split(folder, data, seed=s)[1].tile_ids != first for s in (1, 2, 3))


def test_named_regions_validate_whole_landscapes(tmp_path: Path) -> None:
    folder = mixed_crs_folder(tmp_path)
    train, val = load_split(folder, DataSection(val_regions=["utm_b"]), seed=0)
    assert set(val.regions) == {"utm_b"} and "utm_b" not in set(train.regions)
    gap = np.full(2, 48 * CELL) - 1e-6  # the same buffer: a window between them
    utm = train.crs() == UTM
    assert touching_pairs(val.bounds(), train.bounds()[utm], gap) == 0
    with pytest.raises(DataError, match="left no training window"):
        load_split(folder, DataSection(val_regions=["utm_a", "utm_b", "geographic"]), seed=0)
    with pytest.raises(DataError, match=r"data\.val_regions: no window lies in atlantis"):
        load_split(folder, DataSection(val_regions=["atlantis"]), seed=0)


def test_excluded_regions_keep_a_window_from_training(tmp_path: Path) -> None:
    """utm_b borders utm_a: left out (data.exclude_regions), no utm_a window next to it
    trains either, as none would next to a validation region."""
    folder = mixed_crs_folder(tmp_path)
    excluded = load_split(folder, DataSection(val_regions=["utm_b"]), seed=0)[1].bounds()
    data = DataSection(val_regions=["geographic"], exclude_regions=["utm_b"])
    train, val = load_split(folder, data, seed=0)
    assert "utm_a" in set(train.regions) and "utm_b" not in {*train.regions, *val.regions}
    gap = np.full(2, 48 * CELL) - 1e-6  # one window between them, as around validation
    assert touching_pairs(excluded, train.bounds()[train.crs() == UTM], gap) == 0


def test_one_block_cannot_be_split_and_says_what_to_do(tmp_path: Path) -> None:
    utm_raster(tmp_path / "small.tif", (96, 96))
    with pytest.raises(DataError, match=r"left no validation window.*data\.val_block"):
        load_split(tmp_path, DataSection(), seed=0)


def test_a_window_smaller_than_the_raster_size_is_a_clear_error(tmp_path: Path) -> None:
    utm_raster(tmp_path / "tiny.tif", (40, 40))
    with (
        pytest.warns(UserWarning, match=r"tiny\.tif: 40 x 40 cells is smaller than one 48"),
        pytest.raises(DataError, match="none of the 1"),
    ):
        TileDataset.from_folder(tmp_path, 3)
    with pytest.raises(DataError, match=r"not a multiple of data\.scale 3"):
        TileDataset.from_folder(tmp_path, 3, tile_size=40)


def test_mostly_void_windows_are_left_out(tmp_path: Path) -> None:
    z = hills((96, 96))
    z[:48, :48] = np.nan  # one window all void
    z[48:, :40] = np.nan  # one window with 1/6 valid
    write_dem(tmp_path / "coast.tif", z, Affine(CELL, 0, 5e5, 0, -CELL, 4.4e6), UTM)
    dataset = TileDataset.from_folder(tmp_path, 3)
    assert dataset.tile_ids == ["coast_r0_c48", "coast_r48_c48"]
    assert dict(dataset.index.rejected) == {
        "every pixel is nodata": 1,
        "less than 50% of the cells are valid": 1,
    }


@pytest.mark.parametrize("data", ["one raster", "two CRSs"])
def test_core_run_trains_without_cutting(tmp_path: Path, data: str, capsys) -> None:
    if data == "one raster":
        path = utm_raster(tmp_path / "dem.tif", (480, 480))
    else:
        path = mixed_crs_folder(tmp_path / "rasters")
    args = ["--data", str(path), "--out", str(tmp_path / "run"), "--epochs", "1"]
    for assignment in (*FAST, "data.val_block=2"):
        args += ["--set", assignment]
    assert main(args) == 0
    row = read_metrics(tmp_path / "run")[-1]
    assert np.isfinite(row["val_rmse_m"]) and row["steps"] > 0
    assert re.search(
        r"spatial split: \d+ training and \d+ validation windows; \d+ training "
        r"windows within one window of validation left out",
        capsys.readouterr().out,
    )


def test_paired_lr_windows_are_the_matching_part_of_the_lr_raster(tmp_path: Path) -> None:
    hr = hills((96, 96))
    lr = block_mean(hr, 3) + 7.0  # not the block mean: proves the LR raster is read
    write_dem(tmp_path / "hr" / "a.tif", hr, Affine(CELL, 0, 5e5, 0, -CELL, 4.4e6), UTM)
    write_dem(tmp_path / "lr" / "a.tif", lr, Affine(3 * CELL, 0, 5e5, 0, -3 * CELL, 4.4e6), UTM)
    dataset = TileDataset.from_folder(tmp_path, 3)
    assert dataset.tile_ids == ["a_r0_c0", "a_r0_c48", "a_r48_c0", "a_r48_c48"]
    sample = dataset[3]
    lr_m = sample["lr"][0].double() * sample["std"].double() + sample["mean"].double()
    # float32 normalised values of ~1500 m back in metres: a few ulps (1.2e-4 m)
    np.testing.assert_allclose(lr_m.numpy(), lr[16:32, 16:32], atol=1e-3)


def test_an_unmarked_void_never_reaches_the_lr_input(tmp_path: Path) -> None:
    z = np.full((48, 48), 1500.0)
    z[0, 0] = -32768  # a void without a nodata tag
    write_dem(tmp_path / "flat.tif", z, Affine(CELL, 0, 5e5, 0, -CELL, 4.4e6), UTM)
    with pytest.warns(UserWarning, match="-32768 m lie outside"):
        sample = TileDataset.from_folder(tmp_path, 3)[0]
    assert sample["mean"].item() == 1500.0 and sample["std"].item() == 1.0  # exact
    assert not sample["mask"][0, 0, 0] and sample["mask"].sum() == 48 * 48 - 1


def test_a_rotated_grid_is_refused_naming_the_file(tmp_path: Path) -> None:
    rotated = Affine(0, CELL, 5e5, CELL, 0, 4.4e6)  # rows run east, columns north
    path = write_dem(tmp_path / "rotated.tif", hills((96, 96)), rotated, UTM)
    with pytest.raises(DataError, match=r"rotated\.tif: a rotated or sheared grid"):
        TileDataset.from_folder(path, 3, strict=True)


def test_a_raster_of_many_windows_takes_no_region_from_its_file_name(tmp_path: Path) -> None:
    x = np.arange(96) * CELL
    plane = 500 + np.tan(np.radians(12)) * x  # 12°: moderate by slope, and no clear contradiction
    transform = Affine(CELL, 0, 5e5, 0, -CELL, 4.4e6)
    write_dem(tmp_path / "alps_3.tif", np.broadcast_to(plane[:48], (48, 48)), transform, UTM)
    write_dem(tmp_path / "alps_mosaic.tif", np.broadcast_to(plane, (96, 96)), transform, UTM)
    tile = TileDataset.from_folder(tmp_path / "alps_3.tif", 3)
    mosaic = TileDataset.from_folder(tmp_path / "alps_mosaic.tif", 3)
    assert [TERRAINS[t] for t in tile.terrains] == ["alpine"]  # a tile named by its region
    assert {TERRAINS[t] for t in mosaic.terrains} == {"moderate"}  # measured
