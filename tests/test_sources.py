"""The built-in DEM sources: SRTM 90 m (the default), its named regions, the spatially separate
validation block, the 10 m Colorado source, and canyons told from mountains on real tiles."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from core.config import load_config
from core.data.distfiles import COLORADO_10M, SRTM90, fetch
from core.data.geotiff import cell_size_m, read_dem
from core.errors import ConfigError
from core.tasks.dem_sr.data.dataset import load_split
from core.tasks.dem_sr.data.labels import explain_label, label_from_dem
from core.tasks.dem_sr.data.regions import SRTM_REGIONS
from core.tasks.dem_sr.data.sources import COLORADO, SOURCES, SRTM, source_named
from core.tasks.dem_sr.data.tiling import ensure_tiles, region_corners
from core.tasks.dem_sr.terrain import TERRAINS
from tests.conftest import FAST, read_metrics


@pytest.fixture(scope="module")
def srtm_tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default dataset, cut once for this module (the raster comes from the user cache)."""
    return ensure_tiles(SRTM, tmp_path_factory.mktemp("cache"), quiet=True)


@pytest.fixture(scope="module")
def srtm_manifest(srtm_tiles: Path) -> dict:
    return json.loads((srtm_tiles / "manifest.json").read_text())


@pytest.fixture(scope="module")
def srtm_raster() -> tuple[np.ndarray, Affine]:
    dem = read_dem(fetch(SRTM90))
    return dem.elevation, dem.transform


def test_default_source_is_srtm_and_names_are_checked() -> None:
    assert load_config(None, []).data.source == "srtm90"
    assert set(SOURCES) == {"srtm90", "globe", "colorado10m", "tianshan"}
    with pytest.raises(
        ConfigError, match=r"data\.source.*'srtm30'.*srtm90, globe, colorado10m, tianshan"
    ):
        source_named("srtm30")


def test_every_category_trains_and_validates(srtm_manifest: dict) -> None:
    split = srtm_manifest["split"]
    for category in TERRAINS:
        assert split["train"][category] >= 20, (category, split["train"])
        assert split["val"][category] >= 10, (category, split["val"])
    assert sum(split["train"].values()) >= 1500 and sum(split["val"].values()) >= 150


def test_validation_block_is_a_tile_away_from_every_training_tile(
    srtm_tiles: Path, srtm_manifest: dict
) -> None:
    position = {name: tuple(where[1:]) for name, where in srtm_manifest["tiles"].items()}
    train = {position[p.stem] for p in (srtm_tiles / "train").glob("*.tif")}
    val = {position[p.stem] for p in (srtm_tiles / "val").glob("*.tif")}
    assert len(train) + len(val) == len(position) and not train & val
    # Chebyshev distance in tiles: 1 would be a neighbour; 2 leaves a whole tile between.
    gap = min(max(abs(a - c), abs(b - d)) for a, b in train for c, d in val)
    assert gap >= 2
    for path in sorted((srtm_tiles / "val").glob("*.tif"))[::10]:
        dem = read_dem(path)
        _, centre_lat = dem.transform @ (24, 24)
        assert centre_lat < 36.85


def test_split_folders_are_the_split_whatever_the_seed(
    tmp_path: Path, procedural_dir: Path
) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    for n, path in enumerate(sorted(procedural_dir.glob("*.tif"))):
        shutil.copy(path, tmp_path / ("val" if n % 4 == 0 else "train") / path.name)
    data = load_config(None, []).data
    train_a, val_a = load_split(tmp_path, data, seed=0)
    train_b, val_b = load_split(tmp_path, data, seed=7)
    assert val_a.tile_ids == val_b.tile_ids == sorted(p.stem for p in (tmp_path / "val").iterdir())
    assert train_a.tile_ids == train_b.tile_ids and len(train_a) == 30
    # Without the subfolders, the seed decides (train_val_split).
    _, val_c = load_split(procedural_dir, data, seed=0)
    assert val_c.tile_ids != load_split(procedural_dir, data, seed=7)[1].tile_ids


def test_tiles_in_a_named_region_carry_its_category_unless_clearly_not_that(
    srtm_tiles: Path, srtm_manifest: dict, srtm_raster: tuple[np.ndarray, Affine]
) -> None:
    elevation, _ = srtm_raster
    by_name = {region.name: region for region in SRTM_REGIONS}
    seen: Counter[str] = Counter()
    for path in sorted(srtm_tiles.rglob("*.tif"))[::4]:  # a quarter: reading is the cost
        dem = read_dem(path)
        region = by_name.get(dem.tags.get("region", ""))
        west, north = dem.transform.c, dem.transform.f
        east, south = dem.transform @ (48, 48)
        if region is None:
            assert dem.tags["label"] == "dem"
            assert not any(r.contains(south, north, west, east) for r in SRTM_REGIONS)
            continue
        assert path.stem.startswith(region.name + "_tile_")
        assert region.contains(south, north, west, east)
        label = explain_label(path.stem, dem.elevation, dem.cell_size_m())
        assert (dem.tags["category"], dem.tags["label"]) == (label.category, label.source)
        assert (label.category == region.category) != label.overruled, label.reason
        _, row, col = srtm_manifest["tiles"][path.stem]
        assert np.array_equal(
            dem.elevation, elevation[row * 48 : row * 48 + 48, col * 48 : col * 48 + 48]
        )
        seen[region.category] += 1
    assert set(seen) == set(TERRAINS)


def test_srtm_regions_do_not_overlap_and_each_holds_tiles(
    srtm_raster: tuple[np.ndarray, Affine],
) -> None:
    elevation, transform = srtm_raster
    owner: dict[tuple[int, int], str] = {}
    for region in SRTM_REGIONS:
        corners = region_corners(transform, elevation.shape, region, 48)
        assert corners, region.name
        for corner in corners:
            assert corner not in owner, (region.name, owner.get(corner))
            owner[corner] = region.name
        assert region.reason


def test_report_prints_the_cache_and_counts(srtm_tiles: Path, capsys) -> None:
    assert ensure_tiles(SRTM, srtm_tiles.parent) == srtm_tiles
    out = capsys.readouterr().out
    assert str(srtm_tiles) in out and "training tiles per category: flat" in out
    assert "validation tiles per category" in out and "Farr et al. (2007)" in out


def test_colorado_source_is_10m_alpine_with_its_own_block(tmp_path: Path) -> None:
    folder = ensure_tiles(COLORADO, tmp_path, quiet=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["crs"] == "EPSG:4269"
    assert {k for k, v in manifest["split"]["train"].items() if v} == {"alpine"}
    # Two validation tiles measure clearly below alpine (slopes 7.1° and 7.7° < 18° / 2).
    assert {k: v for k, v in manifest["split"]["val"].items() if v} == {"alpine": 58, "moderate": 2}
    dem = read_dem(next((folder / "train").glob("*.tif")))
    dy, dx = dem.cell_size_m()
    assert 9 < dy < 11 and 7 < dx < 9


def canyon_and_alpine_share(elevation: np.ndarray, transform: Affine, names: set[str]) -> float:
    """Share of the named regions' tiles that the classifier (not the name) calls extreme."""
    labels = []
    for region in SRTM_REGIONS:
        if region.name not in names:
            continue
        for r, c in region_corners(transform, elevation.shape, region, 48):
            tile = elevation[r : r + 48, c : c + 48]
            tile_transform = transform @ Affine.translation(c, r)
            cell = cell_size_m(tile_transform, "EPSG:4326", tile.shape)
            labels.append(label_from_dem(tile, cell))
    return sum(label == "extreme" for label in labels) / len(labels)


def test_canyons_are_extreme_and_ranges_alpine_on_real_tiles(
    srtm_raster: tuple[np.ndarray, Affine],
) -> None:
    elevation, transform = srtm_raster
    canyons = canyon_and_alpine_share(elevation, transform, {"kings_canyon", "tuolumne_canyon"})
    ranges = canyon_and_alpine_share(
        elevation, transform, {"high_sierra", "white_mountains", "yosemite_high_country"}
    )
    assert canyons >= 0.45 and ranges <= 0.25, (canyons, ranges)


def test_a_run_without_data_cuts_the_named_source_and_trains_on_its_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from core.run import main

    # A fresh cache that already holds the fetched raster: the run cuts tiles, not downloads.
    raster = fetch(COLORADO_10M)
    monkeypatch.setenv("TERRAPLUG_CACHE", str(tmp_path / "cache"))
    COLORADO_10M.folder.mkdir(parents=True)
    shutil.copy(raster, COLORADO_10M.path)
    args = ["--set", "data.source='colorado10m'", "--epochs", "1", "--out", str(tmp_path / "run")]
    assert main([*args, *(arg for setting in FAST for arg in ("--set", setting))]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "cache" / "colorado10m-v2" / "tiles48"
    assert str(folder) in out and "validation tiles per category" in out
    (row,) = read_metrics(tmp_path / "run")
    assert row["terrain_counts"] == {"alpine": 180}
    assert row["val_rmse_m"] > 0 and row["val_rmse_m_bicubic"] > 0
