"""``python -m core.predict`` on real GeoTIFFs with a really trained run: georeferencing,
dtypes and voids, seamless blending, bounded memory, bad input."""

from __future__ import annotations

import math
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine

from core.data.geotiff import write_dem
from core.data.windows import window_starts
from core.inference import TrainedRun
from core.predict import main
from core.run import main as train_main
from core.tasks.dem_sr.predict import Predictor, guess_terrain
from tests.conftest import FAST

SCALE = 3  # data.scale of the trained run (the default)
UTM = "EPSG:32613"
UTM_TRANSFORM = Affine(90.0, 0.0, 500_000.0, 0.0, -90.0, 4_400_000.0)
GEO_TRANSFORM = Affine(1 / 1200, 0.0, 10.0, 0.0, -1 / 1200, 47.0)  # 3 arc-seconds


@pytest.fixture(scope="module")
def trained_run(procedural_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run folder: one fast epoch on procedural tiles (16 x 16 LR tiles, scale 3).

    With ``domain_bn``, so prediction goes through a plugin's model surgery and its
    ``route_batch`` hook with a terrain guessed from the input raster.
    """
    out = tmp_path_factory.mktemp("predict") / "run"
    args = ["--data", str(procedural_dir), "--out", str(out), "--epochs", "1"]
    args += ["--plugins", "domain_bn", "--set", "model.norm='batch'"]
    assert train_main([*args, *(arg for a in FAST for arg in ("--set", a))]) == 0
    return out


def terrain(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Hills between roughly 1100 and 1900 m with detail at several wavelengths."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]]
    z = 1500 + 300 * np.sin(x / 9) * np.cos(y / 13) + 50 * np.sin(x / 3.1 + y / 2.3)
    return z + rng.normal(0, 5, shape)


def predictor(run: Path, window: int, overlap: int) -> Predictor:
    trained = TrainedRun.restore(run, cpu=True)
    assert trained.config.data.scale == SCALE
    return Predictor(trained, window, overlap, "moderate")


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1).astype(np.float64)


def upsampled(mask: np.ndarray) -> np.ndarray:
    return np.kron(mask, np.ones((SCALE, SCALE), dtype=bool)).astype(bool)


@pytest.mark.parametrize(
    ("dtype", "nodata", "crs", "transform"),
    [
        ("int16", -32768.0, UTM, UTM_TRANSFORM),
        ("uint16", 65535.0, "EPSG:4326", GEO_TRANSFORM),
        ("float32", -9999.0, UTM, UTM_TRANSFORM),
        ("float32", float("nan"), "EPSG:4326", GEO_TRANSFORM),
    ],
)
def test_georeferencing_dtypes_and_voids(trained_run, tmp_path, dtype, nodata, crs, transform):
    shape = (45, 53)  # several 16-pixel windows each way, neither a multiple of the stride
    z = terrain(shape)
    void = np.zeros(shape, dtype=bool)
    void[18:20] = True  # whole rows
    void[2:22, 30:50] = True  # an area larger than a window: some windows are all void
    void |= np.random.default_rng(1).random(shape) < 0.03  # scattered cells
    src = write_dem(
        tmp_path / "in.tif", np.where(void, np.nan, z), transform, crs, nodata, dtype=dtype
    )
    if dtype == "float32":  # infinities are voids too (write_dem would store them as nodata)
        with rasterio.open(src, "r+") as ds:
            raw = ds.read(1)
            raw[40, :5], raw[41, 7] = np.inf, -np.inf
            ds.write(raw, 1)
        void[40, :5] = void[41, 7] = True
    dst = tmp_path / "out.tif"
    assert main(["--checkpoint", str(trained_run), str(src), str(dst), "--quiet"]) == 0

    with rasterio.open(src) as a, rasterio.open(dst) as b:
        assert b.crs == a.crs and b.bounds == pytest.approx(a.bounds, abs=1e-9)
        assert b.res == pytest.approx((a.res[0] / SCALE, a.res[1] / SCALE), rel=1e-12)
        assert b.shape == (a.height * SCALE, a.width * SCALE)
        out_nodata = b.nodata
        out = b.read(1)
    assert out_nodata == nodata or (math.isnan(nodata) and math.isnan(out_nodata))
    is_nodata = np.isnan(out) if math.isnan(out_nodata) else out == np.float32(out_nodata)
    assert np.array_equal(is_nodata, upsampled(void))
    valid = out[~is_nodata]
    assert np.isfinite(valid).all()
    # The output is this DEM at the finer cell size: its block means track the input.
    means = out.reshape(shape[0], SCALE, shape[1], SCALE).mean(axis=(1, 3))
    error = np.abs(means - z)[~void]
    assert error.mean() < 0.05 * (z.max() - z.min())


def seam_ratio(tiled: np.ndarray, reference: np.ndarray, shape: tuple, window: int, overlap: int):
    """Largest step of ``tiled - reference`` across a window border, per typical step.

    ``reference`` is one pass over the whole raster, which has no window borders. Steps are
    mean absolute differences between adjacent output rows (columns); the typical one is
    the median over rows at the same position within the ``SCALE``-pixel output cell, since
    pixel shuffle gives each of those positions its own statistics.
    """
    diff = tiled - reference
    ratios = []
    for axis, length in enumerate(shape):
        starts = window_starts(length, window, window - 2 * overlap)
        borders = {s * SCALE for s in starts[1:]} | {(s + window) * SCALE for s in starts[:-1]}
        steps = np.abs(np.diff(diff, axis=axis)).mean(axis=1 - axis)
        typical = np.median(steps[SCALE - 1 :: SCALE])
        ratios.append(max(steps[border - 1] for border in borders) / typical)
    return max(ratios)


def test_tiled_prediction_has_no_seams(trained_run: Path, tmp_path: Path) -> None:
    shape = (100, 137)
    src = write_dem(tmp_path / "in.tif", terrain(shape), UTM_TRANSFORM, UTM)
    outputs = {}
    for name, window, overlap in (("single", 137, 0), ("blended", 16, 4), ("hard", 16, 0)):
        predictor(trained_run, window, overlap).run(src, tmp_path / f"{name}.tif", False)
        outputs[name] = read(tmp_path / f"{name}.tif")
    blended = seam_ratio(outputs["blended"], outputs["single"], shape, 16, 4)
    hard = seam_ratio(outputs["hard"], outputs["single"], shape, 16, 0)
    assert hard > 8, "abutting windows must show their borders, or this test proves nothing"
    assert blended < 4


def test_raster_smaller_than_the_window(trained_run: Path, tmp_path: Path) -> None:
    src = write_dem(tmp_path / "small.tif", terrain((7, 11)), UTM_TRANSFORM, UTM)
    assert main(["--checkpoint", str(trained_run), str(src), str(tmp_path / "out.tif")]) == 0
    out = read(tmp_path / "out.tif")
    assert out.shape == (21, 33) and np.isfinite(out).all()


def test_progress_bar_counts_every_window(trained_run: Path, tmp_path: Path, capsys) -> None:
    src = write_dem(tmp_path / "in.tif", terrain((30, 40)), UTM_TRANSFORM, UTM)
    predictor(trained_run, 16, 4).run(src, tmp_path / "out.tif", progress=True)
    windows = len(window_starts(30, 16, 8)) * len(window_starts(40, 16, 8))
    assert f"{windows}/{windows}" in capsys.readouterr().err


def test_memory_depends_on_width_not_height(trained_run: Path, tmp_path: Path) -> None:
    """The numpy buffers (band buffer, windowed reads, written rows) stay the same size when
    the raster gets 8 times taller, and far below the size of the output."""
    peaks = {}
    for height in (100, 1600):
        src = write_dem(tmp_path / f"{height}.tif", terrain((height, 64)), UTM_TRANSFORM, UTM)
        run = predictor(trained_run, 48, 4)
        tracemalloc.start()
        run.run(src, tmp_path / f"out{height}.tif", progress=False)
        peaks[height] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    output_bytes = 1600 * SCALE * 64 * SCALE * 4
    assert peaks[1600] < 1.3 * peaks[100]
    assert peaks[1600] < 0.3 * output_bytes


def test_terrain_guess_from_name_else_from_the_dem(tmp_path: Path) -> None:
    x = np.arange(64) * 90.0
    steep = np.broadcast_to(500 + np.tan(np.radians(40)) * x, (48, 64))
    gentle = np.broadcast_to(500 + np.tan(np.radians(4)) * x, (48, 64))  # moderate by slope
    level = np.full((48, 64), 200.0) + np.random.default_rng(0).normal(0, 0.1, (48, 64))
    cases = {
        "scan_1": (steep, "extreme"),
        "scan_2": (level, "flat"),
        "kansas_3": (gentle, "flat"),  # the region's flat holds: 4° is not 2 x 3°
        "kansas_4": (steep, "extreme"),  # 40° clearly contradicts it
        "alpine_5": (level, "alpine"),  # a category word always wins
    }
    for name, (z, expected) in cases.items():
        path = write_dem(tmp_path / f"{name}.tif", z, UTM_TRANSFORM, UTM, -32768, dtype="int16")
        assert guess_terrain(path) == expected, name


def three_bands(path: Path) -> Path:
    profile = {"driver": "GTiff", "width": 8, "height": 8, "count": 3, "dtype": "float32"}
    with rasterio.open(path, "w", crs=UTM, transform=UTM_TRANSFORM, **profile) as ds:
        ds.write(np.ones((3, 8, 8), dtype=np.float32))
    return path


def no_crs(path: Path) -> Path:
    profile = {"driver": "GTiff", "width": 8, "height": 8, "count": 1, "dtype": "float32"}
    with rasterio.open(path, "w", transform=UTM_TRANSFORM, **profile) as ds:
        ds.write(np.ones((1, 8, 8), dtype=np.float32))
    return path


def truncated(path: Path) -> Path:
    """Readable header, missing tiles: the error comes while streaming, not at open."""
    write_dem(path, terrain((300, 300)), UTM_TRANSFORM, UTM)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 10])
    return path


def text_file(path: Path) -> Path:
    path.write_text("elevation,1000\n")
    return path


BAD_INPUTS = {
    "missing": (lambda p: p, "no such file"),
    "text named .tif": (text_file, "not a readable GeoTIFF"),
    "three bands": (three_bands, "has 3 bands"),
    "no CRS": (no_crs, "has no CRS"),
    "truncated": (truncated, "unreadable"),
}


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_exits_2_naming_the_file(trained_run, tmp_path, capsys, kind) -> None:
    make, problem = BAD_INPUTS[kind]
    src = make(tmp_path / "in.tif")
    dst = tmp_path / "out.tif"
    assert main(["--checkpoint", str(trained_run), str(src), str(dst), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(src) in err and problem in err
    assert list(tmp_path.iterdir()) == ([src] if src.exists() else [])  # no (partial) output


def test_bad_run_folder_or_options_exit_2(trained_run: Path, tmp_path: Path, capsys) -> None:
    src = write_dem(tmp_path / "in.tif", terrain((20, 20)), UTM_TRANSFORM, UTM)
    dst = str(tmp_path / "out.tif")
    no_checkpoint = tmp_path / "half_run"
    no_checkpoint.mkdir()
    (no_checkpoint / "config.toml").write_text((trained_run / "config.toml").read_text())
    assert main(["--checkpoint", str(no_checkpoint), str(src), dst]) == 2
    assert str(no_checkpoint) in capsys.readouterr().err
    assert main(["--checkpoint", str(trained_run), str(src), dst, "--overlap", "8"]) == 2
    assert "--overlap 8" in capsys.readouterr().err
    missing_dir = tmp_path / "no" / "such" / "dir" / "out.tif"
    assert main(["--checkpoint", str(trained_run), str(src), str(missing_dir)]) == 2
    assert str(missing_dir) in capsys.readouterr().err


@pytest.mark.parametrize(
    ("window", "problem"),
    [("0", "must be at least 1"), ("-16", "must be at least 1"), ("100000", "at most 2048")],
)
def test_a_window_out_of_bounds_exits_2_naming_it(
    trained_run: Path, tmp_path: Path, capsys, window: str, problem: str
) -> None:
    """``--window 0`` is not taken for the default, and a window whose blending weights alone
    would take 671 GiB (100000 input pixels at scale 3) is refused before anything is
    allocated; both before the run is loaded, for every task."""
    src = write_dem(tmp_path / "in.tif", terrain((20, 20)), UTM_TRANSFORM, UTM)
    dst = tmp_path / "out.tif"
    assert main(["--checkpoint", str(trained_run), str(src), str(dst), "--window", window]) == 2
    assert f"--window {window}: {problem}" in capsys.readouterr().err
    assert not dst.exists()


@pytest.mark.parametrize(
    ("original", "edited", "message", "named"),
    [
        # [model] holds RCAN's keys, which sar2opt's TerraMind section does not have
        ('task = "dem_sr"', 'task = "sar2opt"', "extra fields found (n_feats", "run"),
        ("n_feats = 8", "n_feats = 12", "does not match the model its config.toml", "run"),
        ('task = "dem_sr"', 'task = "other"', "unknown task 'other'", "run"),
    ],
)
def test_run_of_another_task_or_edited_model_exits_2(
    trained_run: Path, tmp_path: Path, capsys, original: str, edited: str, message: str, named: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = run / "config.toml"
    assert original in config.read_text()
    config.write_text(config.read_text().replace(original, edited))
    src = write_dem(tmp_path / "in.tif", terrain((20, 20)), UTM_TRANSFORM, UTM)
    assert main(["--checkpoint", str(run), str(src), str(tmp_path / "out.tif")]) == 2
    err = capsys.readouterr().err
    assert message in err and str({"input": src, "run": run}[named]) in err
    assert not (tmp_path / "out.tif").exists()


def test_unmarked_voids_in_the_input_stay_voids(trained_run: Path, tmp_path: Path, capsys) -> None:
    """An int16 DEM with -32768 voids and no nodata tag: warned about, masked, never
    super-resolved into kilometres below sea level; ``--strict-data`` stops with exit 2."""
    z = terrain((40, 40))
    z[5:12, 20:30] = -32768
    src = write_dem(tmp_path / "srtm.tif", z, UTM_TRANSFORM, UTM, dtype="int16")
    dst = tmp_path / "out.tif"
    with pytest.warns(UserWarning, match=r"srtm.tif: -32768 m lie outside"):
        assert main(["--checkpoint", str(trained_run), str(src), str(dst), "--quiet"]) == 0
    out = read(dst)
    void = upsampled(z == -32768)
    assert np.isnan(out[void]).all()
    assert np.nanmin(out) > 900, "no elevation invented from the void value"
    strict = tmp_path / "strict.tif"
    args = ["--checkpoint", str(trained_run), str(src), str(strict), "--strict-data", "--quiet"]
    assert main(args) == 2
    assert f"{src}: -32768 m lie outside" in capsys.readouterr().err
    assert not strict.exists()


def test_prediction_normalises_as_the_run_trained(procedural_dir: Path, tmp_path: Path) -> None:
    """A run trained with ``data.normalisation = "global"`` predicts through the same scale:
    a window the predictor super-resolves equals the model's output on the window as the
    training data presented it, de-normalised with that scale."""
    out = tmp_path / "run"
    args = ["--data", str(procedural_dir), "--out", str(out), "--epochs", "1"]
    args += ["--set", "data.normalisation='global'", "--set", "data.global_scale_m=40.0"]
    assert train_main([*args, *(arg for a in FAST for arg in ("--set", a))]) == 0
    trained = TrainedRun.restore(out, cpu=True)
    lr_m = terrain((16, 16))
    [predicted] = Predictor(trained, 16, 0, "moderate").predict_windows([lr_m])
    normalised = torch.from_numpy(((lr_m - lr_m.mean()) / 40.0).astype(np.float32))
    with torch.no_grad():
        expected = trained.model(normalised[None, None])[0, 0].numpy() * 40.0 + lr_m.mean()
    # the same float32 forward on the same input; the de-normalisation of ~1500 m in float32
    # against float64 differs by a few ulps of 1e-4 m
    np.testing.assert_allclose(predicted, expected, atol=1e-3)
