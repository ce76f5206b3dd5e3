"""``python -m core.classify``: per-file categories, counts, and exit codes for bad paths; region
names as hints that clearly contradicting measurements overrule, and category names that always
win."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from core.classify import main
from core.config import load_config
from core.data.distfiles import SRTM90, fetch
from core.data.geotiff import read_dem, write_dem
from core.tasks.dem_sr.data.dataset import load_split
from core.tasks.dem_sr.data.labels import (
    REGIONS,
    Label,
    explain_label,
    label_tile,
    name_in_tile_id,
)
from core.tasks.dem_sr.data.sources import ensure_source_tiles
from core.tasks.dem_sr.terrain import TERRAINS
from tests.test_data import CELL, plane


def output_rows(out: str) -> dict[str, list[str]]:
    """File name -> [category, source, measurements, reason] from the tab-separated lines."""
    rows = [line.split("\t") for line in out.splitlines() if "\t" in line]
    return {Path(row[0]).name: row[1:] for row in rows}


def test_folder_prints_every_tile_and_the_counts(procedural_dir: Path, capsys) -> None:
    assert main([str(procedural_dir)]) == 0
    out = capsys.readouterr().out
    rows = output_rows(out)
    assert len(rows) == 40
    assert rows["desert_tile_3.tif"][:2] == ["desert", "region"]
    assert rows["desert_tile_3.tif"][3] == "the name says desert"
    assert "relief" in rows["flat_tile_0.tif"][2] and "slope" in rows["flat_tile_0.tif"][2]
    assert "40 tiles: " + ", ".join(f"{t} 8" for t in TERRAINS) in out


def test_unnamed_tiles_are_measured(procedural_dir: Path, tmp_path: Path, capsys) -> None:
    shutil.copy(procedural_dir / "extreme_tile_2.tif", tmp_path / "n36w112.tif")
    shutil.copy(procedural_dir / "flat_tile_1.tif", tmp_path / "n38w099.tif")
    assert main([str(tmp_path / "n36w112.tif"), str(tmp_path / "n38w099.tif")]) == 0
    rows = output_rows(capsys.readouterr().out)
    assert rows["n36w112.tif"][:2] == ["extreme", "dem"]
    assert rows["n38w099.tif"][:2] == ["flat", "dem"]


def test_bad_files_are_reported_and_the_rest_still_classified(tmp_path: Path, capsys) -> None:
    transform = Affine(30.0, 0, 500_000.0, 0, -30.0, 4_400_000.0)
    write_dem(tmp_path / "kansas_1.tif", np.full((8, 8), 400.0), transform, "EPSG:32613")
    (tmp_path / "broken.tif").write_text("not a raster")
    assert main([str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert str(tmp_path / "broken.tif") in captured.err
    assert output_rows(captured.out)["kansas_1.tif"][:2] == ["flat", "region"]
    assert "1 tiles: flat 1" in captured.out


@pytest.mark.parametrize("make", ["missing", "empty folder"])
def test_missing_path_or_empty_folder_exits_2(tmp_path: Path, capsys, make: str) -> None:
    path = tmp_path / "nothing_here"
    if make == "empty folder":
        path.mkdir()
    assert main([str(path)]) == 2
    assert str(path) in capsys.readouterr().err


def test_runs_as_a_module(procedural_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "core.classify", str(procedural_dir / "alpine_tile_0.tif")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "\talpine\tregion\t" in result.stdout


def test_a_real_canyon_is_extreme_and_its_shape_is_printed(tmp_path: Path, capsys) -> None:
    """A Kings Canyon tile (SRTM 90 m) is as rough and steep as the High Sierra: only its shape,
    most of the area near the top, makes it extreme."""
    dem = read_dem(fetch(SRTM90))
    row, col = 2064, 2448
    tile = dem.elevation[row : row + 48, col : col + 48]
    transform = dem.transform @ Affine.translation(col, row)
    write_dem(tmp_path / "n36w118.tif", tile, transform, "EPSG:4326")
    assert main([str(tmp_path / "n36w118.tif")]) == 0
    category, source, measured, _ = output_rows(capsys.readouterr().out)["n36w118.tif"]
    assert (category, source) == ("extreme", "dem")
    parts = (re.match(r"([a-z -]+) (-?[\d.]+)", part) for part in measured.split(", "))
    stats = {match[1]: float(match[2]) for match in parts}
    assert stats["top-quarter area"] >= 0.3 and stats["elevation skewness"] < 0
    assert 0 < stats["hypsometric integral"] < 1 and 0 < stats["slope bimodality"] < 1
    assert stats["roughness"] < 500 and stats["slope"] < 30  # alpine, not extreme, by both


# --- region names are hints; a category in the name is the user's word ----------------------

KM = (1000.0, 1000.0)


def hills(roughness_m: float) -> np.ndarray:
    """Sine hills of exactly ``roughness_m`` (whole periods: the std of A sin sin is A / 2);
    on 1 km cells their mean slope stays under 4° even at 410 m."""
    y, x = np.mgrid[:48, :48]
    return 2 * roughness_m * np.sin(2 * np.pi * x / 48) * np.sin(2 * np.pi * y / 48)


@pytest.mark.parametrize(
    ("tile_id", "surface", "cell", "expected"),
    [
        # flat: the moderate thresholds are 12 m and 3°, so 2 x 12 m or 2 x 3° overrule it
        ("kansas_tile_1", hills(23.0), KM, ("flat", "region")),
        ("kansas_tile_1", hills(25.0), KM, ("moderate", "dem")),
        ("kansas_tile_1", plane(5.9), (CELL, CELL), ("flat", "region")),
        ("kansas_tile_1", plane(6.1), (CELL, CELL), ("moderate", "dem")),
        # alpine: only below 200 m / 2 and 18° / 2 together; extreme is one step, never clear
        ("alps_tile_1", plane(9.1), (CELL, CELL), ("alpine", "region")),
        ("alps_tile_1", plane(8.9), (CELL, CELL), ("moderate", "dem")),
        ("alps_tile_1", plane(45.0), (CELL, CELL), ("alpine", "region")),
        # extreme: alpine is one step down (kept), moderate two (overruled)
        ("zion_1", plane(19.0), (CELL, CELL), ("extreme", "region")),
        ("zion_1", plane(17.0), (CELL, CELL), ("moderate", "dem")),
        # moderate: alpine is kept up to 2 x 200 m and 2 x 18°, extreme (two steps) is not
        ("oregon_1", plane(29.0), (CELL, CELL), ("moderate", "region")),
        ("oregon_1", plane(31.0), (CELL, CELL), ("extreme", "dem")),
        ("oregon_1", plane(0.5), (CELL, CELL), ("flat", "dem")),  # < 12 m / 2 and 3° / 2
        # desert spans flat and moderate: only 2 x 200 m, 2 x 18° or extreme relief overrule it
        ("death_valley_1", plane(0.5), (CELL, CELL), ("desert", "region")),
        ("death_valley_1", plane(29.0), (CELL, CELL), ("desert", "region")),
        ("death_valley_1", plane(31.0), (CELL, CELL), ("extreme", "dem")),
        ("death_valley_1", hills(390.0), KM, ("desert", "region")),
        ("death_valley_1", hills(410.0), KM, ("alpine", "dem")),
    ],
)
def test_measurements_overrule_a_region_only_beyond_the_margin(
    tile_id: str, surface: np.ndarray, cell: tuple[float, float], expected: tuple[str, str]
) -> None:
    """Each pair sits on both sides of one margin (``OVERRULE_FACTOR`` = 2): plane slopes are
    exact to 1e-6°, the hills' roughness to 1e-6 m, far inside the 0.1-1 unit gaps."""
    assert label_tile(tile_id, surface, cell) == expected
    label = explain_label(tile_id, surface, cell)
    assert label.overruled == (expected[1] == "dem")
    assert label.reason.startswith(f"region {name_in_tile_id(tile_id)} says ")


def test_the_reason_names_the_region_the_measure_and_the_margin() -> None:
    assert explain_label("kansas_tile_1", hills(25.0), KM).reason == (
        "region kansas says flat; roughness 25.0 m ≥ 2 × 12 m"
    )
    assert explain_label("zion_1", plane(17.0), (CELL, CELL)).reason == (
        "region zion says extreme; roughness 0.0 m < 200 m and slope 17.0° < 18°: "
        "moderate, two steps below extreme"
    )
    assert explain_label("kansas_tile_1", hills(23.0), KM).reason == (
        "region kansas says flat; measured moderate, not clearly otherwise"
    )


@pytest.mark.parametrize(
    ("tile_id", "category"),
    [
        ("flat_tile_3", "flat"),
        ("desert_tile_3", "desert"),
        ("kansas_alpine_tile_2", "alpine"),  # a category word beats the region beside it
        ("san_joaquin_valley_extreme_7", "extreme"),  # ... even a longer one
    ],
)
def test_a_category_in_the_name_always_wins(tile_id: str, category: str) -> None:
    for surface in (plane(0.0), plane(35.0), hills(450.0)):
        label = explain_label(tile_id, surface, (CELL, CELL))
        assert label == Label(category, "region", f"the name says {category}")


def test_region_names_hold_no_category_word() -> None:
    """So a category word in a tile id is always the user's, never part of a region name."""
    for name in REGIONS:
        assert name_in_tile_id(f"{name}_tile_0") == name


# --- the SRTM default: the San Joaquin Valley's validation tiles ------------------------------


@pytest.fixture(scope="module")
def srtm_tiles() -> Path:
    """The default dataset in the user cache (cut on first use)."""
    return ensure_source_tiles("srtm90", quiet=True)


def test_san_joaquin_valley_relief_is_not_flat(srtm_tiles: Path, capsys) -> None:
    """The region box holds two validation tiles with about 390 m of relief, more than any flat
    training tile: their measurements overrule the box, and classify says why."""
    flat_std = max(
        dem.elevation.std()
        for dem in map(read_dem, sorted((srtm_tiles / "train").glob("*.tif")))
        if dem.tags["category"] == "flat"
    )
    valley = {p.stem: read_dem(p) for p in (srtm_tiles / "val").glob("san_joaquin_valley_*")}
    rough = sorted(stem for stem, dem in valley.items() if dem.elevation.std() > flat_std)
    assert rough == ["san_joaquin_valley_tile_88", "san_joaquin_valley_tile_99"]
    for stem, dem in valley.items():
        expected = ("moderate", "dem") if stem in rough else ("flat", "region")
        assert (dem.tags["category"], dem.tags["label"]) == expected, stem
    assert main([str(srtm_tiles / "val" / f"{stem}.tif") for stem in rough]) == 0
    out = capsys.readouterr().out
    assert "2 region name(s) overruled by the measurements:" in out
    says = "region san_joaquin_valley says flat"
    assert f"san_joaquin_valley_tile_88: moderate ({says}; roughness 32.3 m ≥ 2 × 12 m)" in out
    assert f"san_joaquin_valley_tile_99: moderate ({says}; roughness 56.0 m ≥ 2 × 12 m)" in out


def test_srtm_counts_are_the_documented_ones(srtm_tiles: Path) -> None:
    """docs/data-format.md (names and measurements) gives these per category."""
    split = json.loads((srtm_tiles / "manifest.json").read_text())["split"]
    assert list(split["train"].values()) == [273, 1254, 234, 146, 73]
    assert list(split["val"].values()) == [86, 68, 14, 22, 30]
    assert list(split["train"]) == list(TERRAINS)


def test_cached_tiles_agree_with_the_dataset(srtm_tiles: Path) -> None:
    """The category tag and manifest counts written when cutting are what training sees."""
    manifest = json.loads((srtm_tiles / "manifest.json").read_text())
    train, val = load_split(srtm_tiles, load_config(None, []).data, seed=0)
    for split, dataset in (("train", train), ("val", val)):
        seen = [TERRAINS[terrain] for terrain in dataset.terrains]
        assert Counter(seen) == {k: v for k, v in manifest["split"][split].items() if v}
        pairs = list(zip(dataset.tile_ids, seen, strict=True))
        for tile_id, category in pairs[::4]:  # a quarter: reading is the cost
            assert read_dem(srtm_tiles / split / f"{tile_id}.tif").tags["category"] == category
