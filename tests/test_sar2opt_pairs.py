"""Scene pairs of any size: windows read on demand, seeded crops, square windows, masked
nodata, the L2A offset; on real multi-hundred-pixel GeoTIFF pairs written with rasterio."""

from __future__ import annotations

import json
import pickle
import re
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine

from core.config import load_config
from core.errors import DataError
from core.run import main
from core.tasks.sar2opt import data as pairs_module
from core.tasks.sar2opt import metrics
from core.tasks.sar2opt.data import (
    OPTICAL_BANDS,
    SAR_BANDS,
    TERRAMIND_V1,
    PairDataset,
    load_pairs,
    write_bands,
)
from plugins.generators.refiner import RefinementNet, Refiner, RefinerConfig
from tests.conftest import read_metrics

ORIGIN = Affine(10.0, 0.0, 600_000.0, 0.0, -10.0, 5_100_000.0)


def scene(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """SAR dB and optical DN of a procedural scene (one land cover seen by both sensors)."""
    _, sar, optical = pairs_module._default_pair(seed, max(height, width))
    return sar[:, :height, :width], optical[:, :height, :width]


def write_pair(
    folder: Path,
    name: str,
    sar: np.ndarray,
    optical: np.ndarray,
    *,
    transform: Affine = ORIGIN,
    optical_transform: Affine | None = None,
    optical_crs: str = "EPSG:32632",
    optical_tags: dict[str, str] | None = None,
) -> tuple[Path, Path]:
    sar_path, optical_path = folder / "S1GRD" / f"{name}.tif", folder / "S2L2A" / f"{name}.tif"
    write_bands(sar_path, sar, transform, SAR_BANDS, {})
    write_bands(
        optical_path,
        optical,
        optical_transform or transform,
        OPTICAL_BANDS,
        optical_tags or {},
        crs=optical_crs,
    )
    return sar_path, optical_path


def standardised(values: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return (values - mean[:, None, None]) / std[:, None, None]


def window_of(name: str) -> tuple[int, int]:
    row, col = re.search(r"_r(\d+)_c(\d+)", name).groups()
    return int(row), int(col)


# --- windows of a scene pair -----------------------------------------------------------------


def test_a_scene_pair_is_read_window_by_window_from_a_cached_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sar, optical = scene(320, 448)
    write_pair(tmp_path, "scene", sar, optical)
    ds = PairDataset.from_folder(tmp_path, TERRAMIND_V1, size=64, strict=True)
    assert len(ds) == 5 * 7 and ds.names[0] == "scene_r0_c0" and ds.names[-1] == "scene_r256_c384"
    stats = TERRAMIND_V1
    for i in (0, 12, len(ds) - 1):
        row, col = window_of(ds.names[i])
        sample = ds[i]
        window = sar[:, row : row + 64, col : col + 64]
        expected = standardised(window, stats.sar_mean, stats.sar_std)
        # float32 standardisation of dB values: ~1e-7 on z up to ~4; atol 1e-5 leaves 100x
        np.testing.assert_allclose(sample["sar"].numpy(), expected, atol=1e-5)
        back = ds.destandardise_optical(sample["optical"]).round().numpy()
        np.testing.assert_array_equal(back, optical[:, row : row + 64, col : col + 64])
        assert sample["mask"].shape == (1, 64, 64) and bool(sample["mask"].all())
    # what a DataLoader worker receives: the index, no pixels (the scene is 8 MB as float32)
    assert len(pickle.dumps(ds)) < 64 * 2**10

    def no_reading(*args: object) -> None:
        raise AssertionError("the index was built again instead of read from the cache")

    monkeypatch.setattr(pairs_module._Indexer, "read_strip", no_reading)
    again = PairDataset.from_folder(tmp_path, TERRAMIND_V1, size=64, strict=True)
    assert again.names == ds.names and torch.equal(again[7]["optical"], ds[7]["optical"])


def test_indexing_a_scene_never_holds_the_scene(tmp_path: Path) -> None:
    """Memory stays flat in the scene's size: the index reads a strip of 64 rows at a time."""
    sar, optical = scene(1024, 1024, seed=1)
    write_pair(tmp_path, "big", sar, optical)
    scene_bytes = (len(SAR_BANDS) + len(OPTICAL_BANDS)) * 1024 * 1024 * 4  # 58.7 MB as float32
    del sar, optical
    tracemalloc.start()
    try:
        ds = PairDataset.from_folder(tmp_path, TERRAMIND_V1, size=64, strict=True)
        _ = [ds[i] for i in (0, len(ds) - 1)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ds) == 16 * 16
    # a strip of both files with its masks is about 8 MB; the whole scene would be 58.7 MB
    assert peak < scene_bytes / 4, f"peak {peak / 2**20:.1f} MB"


@pytest.mark.parametrize("mismatch", ["size", "CRS", "transform"])
def test_a_pair_on_two_grids_is_refused_naming_both_files(tmp_path: Path, mismatch: str) -> None:
    sar, optical = scene(256, 320)
    kwargs = {
        "size": {},
        "CRS": {"optical_crs": "EPSG:32633"},
        "transform": {"optical_transform": ORIGIN @ Affine.translation(1, 0)},
    }[mismatch]
    optical = optical[:, :, :288] if mismatch == "size" else optical
    paths = write_pair(tmp_path, "scene", sar, optical, **kwargs)
    with pytest.raises(DataError, match="must be co-registered on one grid") as raised:
        PairDataset.from_folder(tmp_path, TERRAMIND_V1, size=64, strict=True)
    assert all(str(path) in str(raised.value) for path in paths)


# --- crops, flips and the split ----------------------------------------------------------------


def test_training_crops_are_seeded_near_their_window_and_flip_north_south(tmp_path: Path) -> None:
    sar, optical = scene(256, 320)
    write_pair(tmp_path, "scene", sar, optical)
    far = ORIGIN @ Affine.translation(0, 900)
    write_pair(tmp_path, "one", *scene(64, 64, seed=2), transform=far)
    ds = PairDataset.from_folder(tmp_path, TERRAMIND_V1, size=64, strict=True)
    windows = 1 + 4 * 5
    crops = ds.with_crops(3, seed=7, flips=True)
    assert len(ds) == windows and len(crops) == windows + 3 * 20  # "one" has no room to move
    assert crops.names[:windows] == ds.names
    assert crops.names == ds.with_crops(3, seed=7, flips=True).names  # seeded, every process
    assert crops.names != ds.with_crops(3, seed=8, flips=True).names
    assert ds.with_crops(0, seed=7, flips=True) is ds
    lattice = ds.bounds()
    moved = crops.bounds()[windows:]
    scene_windows = [f"scene_r{r}_c{c}" for r in range(0, 256, 64) for c in range(0, 320, 64)]
    origin = np.repeat(lattice[[ds.names.index(name) for name in scene_windows]], 3, axis=0)
    shift = np.abs(moved - origin) / 10.0  # pixels
    assert (shift <= 32).all() and shift.max() > 16  # within half a window, and they do move
    assert (moved[:, :2] >= lattice[1:, :2].min(0)).all()  # never past the scene's edges
    assert (moved[:, 2:] <= lattice[1:, 2:].max(0)).all()
    flipped = [i for i, name in enumerate(crops.names) if name.endswith("_flipped")]
    assert 0.3 < len(flipped) / 60 < 0.7  # half of the crops, seeded (60 draws)
    assert not any(n.endswith("_flipped") for n in ds.with_crops(3, 7, flips=False).names)
    i = flipped[0]
    row, col = window_of(crops.names[i])
    stats = TERRAMIND_V1
    expected = standardised(sar[:, row : row + 64, col : col + 64], stats.sar_mean, stats.sar_std)
    # north-south: the rows reversed, east stays east (the radar's look direction is kept)
    np.testing.assert_allclose(crops[i]["sar"].numpy(), expected[:, ::-1], atol=1e-5)


def test_without_train_and_val_folders_the_split_is_spatial_and_crops_stay_clear(
    tmp_path: Path,
) -> None:
    sar, optical = scene(512, 512, seed=3)
    write_pair(tmp_path, "scene", sar, optical)
    config = load_config(None, ["run.task='sar2opt'", f"data.dir='{tmp_path}'", "data.val_block=2"])
    train, val = load_pairs(tmp_path, config.data, config.task_sections["pairs"])
    assert len(val) and not any(name.endswith("_flipped") for name in val.names)
    assert len(train) % 4 == 0 and len(train) // 4 + len(val) < 8 * 8  # 3 crops; a buffer
    t, v = train.bounds(), val.bounds()
    gap_x = np.maximum(t[:, None, 0] - v[None, :, 2], v[None, :, 0] - t[:, None, 2])
    gap_y = np.maximum(t[:, None, 1] - v[None, :, 3], v[None, :, 1] - t[:, None, 3])
    # no training sample, crops included, overlaps or touches a validation window
    assert (np.maximum(gap_x, gap_y) > 0).all()
    again = load_pairs(tmp_path, config.data, config.task_sections["pairs"])
    assert again[0].names == train.names and again[1].names == val.names


# --- square windows ----------------------------------------------------------------------------


def test_a_non_square_pair_gives_square_windows_and_one_too_small_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    write_pair(tmp_path, "wide", *scene(96, 160))
    ds = PairDataset.from_folder(tmp_path, TERRAMIND_V1, size=64, strict=True)
    assert ds.names == ["wide_r0_c0", "wide_r0_c64"]
    assert {tuple(ds[i]["optical"].shape) for i in range(len(ds))} == {(12, 64, 64)}
    narrow = write_pair(tmp_path, "narrow", *scene(48, 200))[0]
    with pytest.raises(DataError, match=r"48x200 pixels cannot hold one square 64x64") as raised:
        PairDataset.from_folder(tmp_path, TERRAMIND_V1, size=64, strict=True)
    assert str(narrow) in str(raised.value) and "set data.tile_size to 32 or less" in str(
        raised.value
    )
    with pytest.raises(DataError, match=r"tile_size must be a positive multiple of 32 .*, got 48"):
        PairDataset.from_folder(tmp_path, TERRAMIND_V1, size=48)


# --- invalid pixels ------------------------------------------------------------------------------


def test_nan_pixels_are_masked_windows_too_empty_are_left_out_and_both_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sar, optical = scene(128, 192)
    sar[1, 5, 70] = np.nan  # one NaN pixel, in window r0_c64
    optical[:, 64:128, 128:150] = 0  # L2A's no data: a third of window r64_c128
    write_pair(tmp_path, "scene", sar, optical)
    ds = PairDataset.from_folder(tmp_path, TERRAMIND_V1, size=64, strict=True, quiet=False)
    assert "scene_r0_c64" in ds.names and "scene_r64_c128" not in ds.names
    sample = ds[ds.names.index("scene_r0_c64")]
    assert (~sample["mask"]).sum() == 1 and not sample["mask"][0, 5, 6]
    assert sample["sar"][:, 5, 6].tolist() == [0.0, 0.0]  # filled with the band mean
    assert torch.isfinite(sample["sar"]).all() and torch.isfinite(sample["optical"]).all()
    report = "1 of 6 windows left out (1 fewer than 90% of the pixels are valid): 4,096 pixels"
    masked = "1 invalid pixels masked in 1 of the 5 windows kept (filled, and left out of the"
    assert ds.skipped == [(str(tmp_path), f"{report}; {masked} metrics)")]
    assert report in capsys.readouterr().out
    kept = PairDataset.from_folder(tmp_path, TERRAMIND_V1, size=64, min_valid=0.5)
    hole = kept[kept.names.index("scene_r64_c128")]["mask"]
    assert (~hole).sum() == 64 * 22  # the nodata block, masked in a window kept at 50 %


def test_a_crop_reaching_into_voids_is_read_as_its_window(tmp_path: Path) -> None:
    sar, optical = scene(64, 128)
    sar[:, :, 70:] = np.nan  # window r0_c64 is left out; crops of r0_c0 may reach in
    write_pair(tmp_path, "scene", sar, optical)
    ds = PairDataset.from_folder(tmp_path, TERRAMIND_V1, size=64)
    crops = ds.with_crops(12, seed=0, flips=False)
    assert ds.names == ["scene_r0_c0"] and len(crops) == 13
    shifts = {i: window_of(crops.names[i])[1] for i in range(1, 13)}
    # a crop from column c holds c - 6 void columns: more than 10 % from column 13 on
    into_voids = [i for i, col in shifts.items() if col >= 13]
    clear = [i for i, col in shifts.items() if col <= 6]
    assert into_voids and clear
    for i in into_voids:
        assert torch.equal(crops[i]["sar"], ds[0]["sar"])
    for i in clear:
        window = sar[:, :, shifts[i] : shifts[i] + 64]
        expected = standardised(window, TERRAMIND_V1.sar_mean, TERRAMIND_V1.sar_std)
        np.testing.assert_allclose(crops[i]["sar"].numpy(), expected, atol=1e-5)  # as above
        assert bool(crops[i]["mask"].all())


def test_metrics_ignore_masked_pixels() -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(2, 12, 32, 32, generator=generator)
    generated = torch.rand(2, 12, 32, 32, generator=generator)
    mask = torch.ones(2, 1, 32, 32, dtype=torch.bool)
    mask[:, :, :8] = False
    garbage = generated.clone()
    garbage[:, :, :8] = 1e3  # whatever the model makes of filled pixels
    for score in (metrics.psnr, metrics.band_l1, metrics.spectral_angle, metrics.ndvi_error):
        torch.testing.assert_close(
            score(garbage, target, mask),
            score(generated[:, :, 8:], target[:, :, 8:], mask[:, :, 8:]),
        )
    full = torch.ones_like(mask)
    torch.testing.assert_close(  # every pixel valid: the plain mean
        metrics.masked_mean((generated - target).abs(), full),
        (generated - target).abs().mean((1, 2, 3)),
    )


def test_the_refiner_learns_from_valid_pixels_only() -> None:
    """The refiner's L1 (a pixel objective) leaves filled pixels out, like the metrics."""
    refiner = Refiner(RefinerConfig())
    generator = torch.Generator().manual_seed(0)
    refiner.generated = torch.randn(2, 12, 32, 32, generator=generator).numpy()
    model = RefinementNet(channels=4, blocks=1)
    optical = torch.randn(2, 12, 32, 32, generator=generator)
    mask = torch.ones(2, 1, 32, 32, dtype=torch.bool)
    mask[1, :, 20:] = False
    batch = {"sar": torch.zeros(2, 2, 32, 32), "optical": optical, "mask": mask}
    batch["idx"] = torch.tensor([0, 1])
    loss = refiner.training_forward(model, batch, ctx=None)
    batch["optical"] = torch.where(mask, optical, 1e3)  # anything in the filled pixels
    torch.testing.assert_close(refiner.training_forward(model, batch, ctx=None), loss)
    expected = (torch.from_numpy(refiner.generated[1]) - optical[1]).abs()[:, :20].mean()
    torch.testing.assert_close(loss[1, 0], expected)  # the refiner starts as identity


def test_per_sample_caches_are_keyed_by_what_the_samples_are_made_of(tmp_path: Path) -> None:
    """The fingerprint of a dataset's samples reads no pixel but changes with every file,
    window, crop and setting that changes them."""
    sar, optical = scene(128, 192)
    paths = write_pair(tmp_path, "scene", sar, optical)

    def key(modality: str = "optical", crops: int = 2, **settings: float) -> str:
        ds = PairDataset.from_folder(tmp_path, TERRAMIND_V1, size=64, **settings)
        return ds.with_crops(crops, seed=0, flips=True).fingerprint(modality)

    first = key()
    assert key() == first and key("sar") != first
    assert key(crops=1) != first and key(l2a_offset=1000) != first
    assert key(min_valid=0.5) != first
    assert key("sar", l2a_offset=1000) == key("sar")  # the offset changes optical only
    with rasterio.open(paths[1], "r+") as ds:
        ds.update_tags(touched="yes")
    assert key() != first


# --- the L2A offset ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "shift", "warned"),
    [
        ({"PROCESSING_BASELINE": "04.00"}, 1000, True),
        ({"BOA_ADD_OFFSET_B2": "-1000"}, 1000, True),
        ({"PROCESSING_BASELINE": "04.00"}, 0, False),  # the offset was removed already
        ({"PROCESSING_BASELINE": "03.01"}, 1000, False),  # the metadata does not say so
        ({}, 1000, False),
    ],
)
def test_values_that_look_offset_in_an_offset_product_are_warned_about(
    tmp_path: Path, tags: dict[str, str], shift: int, warned: bool
) -> None:
    sar, optical = scene(128, 128)
    _, optical_path = write_pair(tmp_path, "s2", sar, optical + shift, optical_tags=tags)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PairDataset.from_folder(tmp_path, TERRAMIND_V1, size=64, strict=True)
    # only the offset's warning: another library may warn once per process, whichever test
    # of a worker's random order reaches it first
    offset = [w for w in caught if "pairs.l2a_offset" in str(w.message)]
    assert len(offset) == warned, [str(w.message) for w in caught]
    if warned:
        message = str(offset[0].message)
        assert str(optical_path) in message and next(iter(tags)) in message
        assert "set --set pairs.l2a_offset=1000" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the setting given: no warning
        ds = PairDataset.from_folder(tmp_path, TERRAMIND_V1, size=64, l2a_offset=shift or 1000)
    back = ds.destandardise_optical(ds[0]["optical"]).round().numpy()
    # reflectance DN: the offset undone (a product without one, read with 1000, is 1000 darker)
    expected = optical[:, :64, :64].astype(np.float64) - (1000 if shift == 0 else 0)
    np.testing.assert_array_equal(back, expected)


# --- training on a scene pair ------------------------------------------------------------------


@pytest.mark.slow
def test_a_scene_pair_trains_with_crops_masks_and_a_spatial_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m core.run --task sar2opt --data`` on one non-square scene pair with NaN
    pixels: windows, crops and a spatial split, no cutting; a pair on two grids is exit 2."""
    data = tmp_path / "pairs"
    sar, optical = scene(192, 256, seed=4)
    sar[0, 10:12, 200] = np.nan
    write_pair(data, "scene", sar, optical)
    out = tmp_path / "run"
    args = ["--task", "sar2opt", "--plugins", "teacher_forcing", "--data", str(data)]
    args += ["--out", str(out), "--epochs", "1", "--set", "model.diffusion_steps=1"]
    args += ["--set", "train.max_steps_per_epoch=2", "--set", "train.progress='never'"]
    args += ["--set", "data.val_block=2", "--set", "data.tile_size=64"]
    assert main(args) == 0
    console = capsys.readouterr().out
    windows = 3 * 4
    counts = re.search(r"(\d+) training / (\d+) validation", console)
    train_tiles, val_tiles = int(counts[1]), int(counts[2])
    assert train_tiles % 4 == 0 and train_tiles // 4 + val_tiles <= windows  # 3 crops each
    assert "2 invalid pixels masked in 1 of the 12 windows kept" in console
    [row] = read_metrics(out)
    assert np.isfinite(row["val_l1"]) and np.isfinite(row["train_loss"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_tiles"][0]["path"] == str(data)
    assert "2 invalid pixels masked" in summary["skipped_tiles"][0]["reason"]

    bad = tmp_path / "bad"
    paths = write_pair(bad, "scene", sar, optical, optical_crs="EPSG:32633")
    args = ["--task", "sar2opt", "--plugins", "teacher_forcing", "--data", str(bad)]
    assert main([*args, "--out", str(tmp_path / "bad-run"), "--strict-data"]) == 2
    error = capsys.readouterr().err
    assert all(str(path) in error for path in paths)
