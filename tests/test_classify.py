"""``python -m core.classify``: per-file categories, counts, and exit codes for bad paths."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from core.classify import main
from core.data.distfiles import SRTM90, fetch
from core.data.geotiff import read_dem, write_dem
from core.tasks.dem_sr.terrain import TERRAINS


def output_rows(out: str) -> dict[str, list[str]]:
    """File name -> [category, source, measurements] from the tab-separated lines."""
    rows = [line.split("\t") for line in out.splitlines() if "\t" in line]
    return {Path(row[0]).name: row[1:] for row in rows}


def test_folder_prints_every_tile_and_the_counts(procedural_dir: Path, capsys) -> None:
    assert main([str(procedural_dir)]) == 0
    out = capsys.readouterr().out
    rows = output_rows(out)
    assert len(rows) == 40
    assert rows["desert_tile_3.tif"][:2] == ["desert", "region"]
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
    category, source, measured = output_rows(capsys.readouterr().out)["n36w118.tif"]
    assert (category, source) == ("extreme", "dem")
    parts = (re.match(r"([a-z -]+) (-?[\d.]+)", part) for part in measured.split(", "))
    stats = {match[1]: float(match[2]) for match in parts}
    assert stats["top-quarter area"] >= 0.3 and stats["elevation skewness"] < 0
    assert 0 < stats["hypsometric integral"] < 1 and 0 < stats["slope bimodality"] < 1
    assert stats["roughness"] < 500 and stats["slope"] < 30  # alpine, not extreme, by both
