"""Values no terrain has, doubtful georeferencing and dangling links, on real GeoTIFFs:
warned about naming the file, voids masked, ``--strict-data`` stops with exit 2."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from core.data.geotiff import open_dem, read_dem, write_dem
from core.errors import DataError
from core.run import main
from core.tasks.dem_sr.data.dataset import TileDataset
from tests.conftest import read_metrics
from tests.test_bad_input import fast_args as cli_args

UTM = "EPSG:32613"
UTM_ORIGIN = Affine(30.0, 0.0, 500_000.0, 0.0, -30.0, 4_400_000.0)


def hills(shape: tuple[int, int] = (48, 48)) -> np.ndarray:
    y, x = np.mgrid[: shape[0], : shape[1]]
    return 1500 + 200 * np.sin(x / 7) * np.cos(y / 11)


def unmarked_voids(path: Path) -> Path:
    """An int16 DEM whose voids are -32768 and which has no nodata tag (SRTM-style)."""
    z = hills()
    z[10:20, 5:15] = -32768
    return write_dem(path, z, UTM_ORIGIN, UTM, dtype="int16")


def open_input(path: Path) -> None:
    """Open a raster as ``core.predict`` opens its input."""
    with open_dem(path):
        pass


def messages(caught: list[warnings.WarningMessage]) -> str:
    return "\n".join(str(w.message) for w in caught)


def test_unmarked_voids_become_voids_with_a_warning_naming_file_and_value(tmp_path: Path):
    path = unmarked_voids(tmp_path / "srtm.tif")
    with pytest.warns(UserWarning, match=r"srtm.tif: -32768 m lie outside \[-11000, 9000\] m"):
        dem = read_dem(path)
    assert np.isnan(dem.elevation[10:20, 5:15]).all()
    assert np.isfinite(dem.elevation).sum() == 48 * 48 - 100
    assert np.nanmin(dem.elevation) > 1000
    with pytest.raises(DataError, match=r"srtm.tif: -32768 m .*--strict-data"):
        read_dem(path, strict=True)


def test_training_masks_unmarked_voids_and_reports_a_dangling_link(
    procedural_dir: Path, tmp_path: Path, capsys
):
    folder = tmp_path / "tiles"
    shutil.copytree(procedural_dir, folder)
    void = unmarked_voids(folder / "aa_unmarked.tif")
    link = folder / "zz_link.tif"
    link.symlink_to(tmp_path / "gone.tif")
    out = tmp_path / "run"
    with pytest.warns(UserWarning) as caught:
        assert main(cli_args(folder, out)) == 0
    warned = messages(caught)
    assert f"{void}: -32768 m lie outside" in warned
    assert f"{link}: a symbolic link to {tmp_path / 'gone.tif'}, which does not exist" in warned
    summary = json.loads((out / "summary.json").read_text())
    assert [entry["path"] for entry in summary["skipped_tiles"]] == [str(link)]
    row = read_metrics(out)[0]
    assert row["nonfinite_steps"] == 0
    assert row["val_rmse_m"] < 100, "a -32768 m 'elevation' would put the RMSE in kilometres"

    assert main(cli_args(folder, tmp_path / "strict", "--strict-data")) == 2
    assert f"{void}: -32768 m lie outside" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("crs", "transform", "problem"),
    [
        # UTM coordinates labelled as degrees: 30-degree cells, x = 500,000 degrees
        ("EPSG:4326", UTM_ORIGIN, "outside the area of use of EPSG:4326"),
        ("EPSG:4326", UTM_ORIGIN, "cells of 3.3"),
        # a geographic raster reaching 95 N
        ("EPSG:4326", Affine(0.01, 0, 10.0, 0, -0.01, 95.0), "94.52 to 95 N lie outside"),
        # UTM zone 13N coordinates on the other side of the globe
        (UTM, Affine(30.0, 0, -9_000_000.0, 0, -30.0, 4_400_000.0), "area of use of EPSG:32613"),
        (UTM, Affine(0.01, 0, 500_000.0, 0, -0.01, 4_400_000.0), "cells of 0.01 x 0.01 m"),
        # 9 km of grid is 8998 m of ground at the raster's centre, 216 km east of the meridian
        (UTM, Affine(9_000.0, 0, 500_000.0, 0, -9_000.0, 4_400_000.0), "cells of 8998 x 8998 m"),
    ],
)
def test_doubtful_georeferencing_is_warned_naming_the_file(tmp_path, crs, transform, problem):
    path = write_dem(tmp_path / "tile.tif", hills(), transform, crs)
    for read in (read_dem, open_input):  # training tiles, predict inputs
        with pytest.warns(UserWarning, match="is the CRS right") as caught:
            read(path)
        assert f"{path}: " in messages(caught) and problem in messages(caught)


@pytest.mark.parametrize(
    ("crs", "transform"),
    [
        (UTM, UTM_ORIGIN),
        ("EPSG:4326", Affine(1 / 1200, 0, 10.0, 0, -1 / 1200, 47.0)),  # 3 arc-seconds, Alps
        ("EPSG:4326", Affine(1 / 120, 0, 179.9, 0, -1 / 120, -89.6)),  # across the antimeridian
        ("EPSG:4326", Affine(1 / 1200, 0, 200.0, 0, -1 / 1200, 47.0)),  # a 0..360 grid
        (UTM, Affine(30.0, 0, 0.0, 0, -30.0, 4_400_000.0)),  # 3 degrees past the zone
        ("EPSG:3857", Affine(30.0, 0, 1_113_000.0, 0, -30.0, 5_900_000.0)),
    ],
)
def test_sound_georeferencing_is_quiet(tmp_path: Path, crs: str, transform: Affine):
    path = write_dem(tmp_path / "tile.tif", hills(), transform, crs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_dem(path)
        open_input(path)


def test_a_dangling_link_stops_a_strict_run(procedural_dir: Path, tmp_path: Path):
    folder = tmp_path / "tiles"
    folder.mkdir()
    shutil.copy(procedural_dir / "flat_tile_0.tif", folder)
    link = folder / "link.tif"
    link.symlink_to(tmp_path / "gone.tif")
    with pytest.raises(DataError, match=f"{link}: a symbolic link to .*gone.tif"):
        TileDataset.from_folder(folder, 3, strict=True)
