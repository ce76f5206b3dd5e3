"""SAR->optical pairs on real GeoTIFFs: the default data, checks of bad pairs, standardisation."""

from __future__ import annotations

import ast
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from torch.utils.data import DataLoader

from core.data.datasets import train_val_split
from core.errors import DataError
from core.tasks.sar2opt.data import (
    LAND_COVER,
    OPTICAL_BANDS,
    SAR_BANDS,
    TERRAMIND_V1,
    PairDataset,
    Standardisation,
    ensure_default_pairs,
)

UTM = "EPSG:32632"


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default pairs, built once for this module in a cache of its own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TERRAPLUG_CACHE", str(tmp_path_factory.mktemp("cache")))
        return ensure_default_pairs(quiet=True)


@pytest.fixture(scope="module")
def default_ds(default_dir: Path) -> PairDataset:
    return PairDataset.from_folder(default_dir, TERRAMIND_V1, size=64, strict=True)


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


def stack(folder: Path, sub: str) -> np.ndarray:
    return np.stack([read(path) for path in sorted((folder / sub).glob("*.tif"))])


# --- the default pairs -----------------------------------------------------------------------


def test_default_pairs_are_deterministic_and_replace_a_partial_cache(
    default_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TERRAPLUG_CACHE", str(tmp_path))
    partial = tmp_path / "sar2opt-64-v1"
    (partial / "S1GRD").mkdir(parents=True)
    (partial / "S1GRD" / "pair_000.tif").write_text("interrupted")
    folder = ensure_default_pairs(quiet=True)
    assert folder == partial and folder != default_dir
    assert not list(tmp_path.glob(".sar2opt-*"))  # no staging folder left behind
    for sub in ("S1GRD", "S2L2A", "LULC"):
        names = sorted(p.name for p in (folder / sub).iterdir())
        assert names == sorted(p.name for p in (default_dir / sub).iterdir()), sub
        for name in names:
            np.testing.assert_array_equal(read(folder / sub / name), read(default_dir / sub / name))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest == json.loads((default_dir / "manifest.json").read_text())


def test_a_second_call_reuses_the_cache_and_reports(
    default_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TERRAPLUG_CACHE", str(default_dir.parent))
    before = (default_dir / "manifest.json").stat().st_mtime_ns
    assert ensure_default_pairs() == default_dir
    assert (default_dir / "manifest.json").stat().st_mtime_ns == before
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and str(default_dir) in out and "40" in out
    with pytest.raises(DataError, match="multiple of 32"):
        ensure_default_pairs(48)


def test_default_pairs_are_co_registered_geotiffs(default_dir: Path) -> None:
    names = sorted(p.name for p in (default_dir / "S1GRD").glob("*.tif"))
    assert len(names) == 40
    transforms = set()
    for name in names:
        with (
            rasterio.open(default_dir / "S1GRD" / name) as sar,
            rasterio.open(default_dir / "S2L2A" / name) as optical,
            rasterio.open(default_dir / "LULC" / name) as cover,
        ):
            assert sar.count == 2 and sar.descriptions == SAR_BANDS
            assert optical.count == 12 and optical.descriptions == OPTICAL_BANDS
            assert set(sar.dtypes) == {"float32"} and set(optical.dtypes) == {"uint16"}
            assert sar.shape == optical.shape == cover.shape == (64, 64)
            assert sar.crs.to_epsg() == optical.crs.to_epsg() == cover.crs.to_epsg() == 32632
            assert sar.transform == optical.transform == cover.transform
            assert sar.res == (10.0, 10.0)
            transforms.add(tuple(sar.transform))
    assert len(transforms) == 40


def test_default_optical_and_sar_see_the_same_land_cover(default_dir: Path) -> None:
    cover = stack(default_dir, "LULC")[:, 0]
    sar, optical = stack(default_dir, "S1GRD"), stack(default_dir, "S2L2A").astype(np.float64)
    band = {name: i for i, name in enumerate(OPTICAL_BANDS)}
    vv, vh, red, nir = sar[:, 0], sar[:, 1], optical[:, band["B04"]], optical[:, band["B08"]]
    where = {name: cover == k for k, name in enumerate(LAND_COVER)}
    assert all(where[name].mean() > 0.05 for name in LAND_COVER)
    nir_of = {name: nir[mask].mean() for name, mask in where.items()}
    vv_of = {name: vv[mask].mean() for name, mask in where.items()}
    assert nir_of["water"] < 0.1 * nir_of["vegetation"]
    assert nir[where["vegetation"]].mean() > 4 * red[where["vegetation"]].mean()  # red edge
    swir = optical[:, band["B11"]]
    assert swir[where["bare"]].mean() > nir_of["bare"] > red[where["bare"]].mean()
    assert vv_of["water"] < vv_of["bare"] < vv_of["vegetation"] < vv_of["urban"]
    assert vv_of["urban"] - vv_of["water"] > 15  # dB
    assert all(vh[mask].mean() < vv_of[name] - 4 for name, mask in where.items())
    # Speckle: single pixels of one class spread by a few dB, as ~4-look data does.
    assert 1.5 < np.std(vv[where["water"]]) < 5


def test_default_pairs_lie_in_terramind_pretraining_ranges(default_ds: PairDataset) -> None:
    batch = next(iter(DataLoader(default_ds, batch_size=40)))
    for key in ("sar", "optical"):
        z = batch[key].transpose(0, 1).flatten(1)  # [bands, pixels]
        assert z.mean(dim=1).abs().max() < 1.0, key
        assert (z.std(dim=1) > 0.15).all() and (z.std(dim=1) < 1.5).all(), key
        assert z.abs().quantile(0.999, dim=1).max() < 5.0, key


# --- the dataset -----------------------------------------------------------------------------


def test_samples_collate_and_destandardise_to_the_files(
    default_dir: Path, default_ds: PairDataset
) -> None:
    batch = next(iter(DataLoader(default_ds, batch_size=4)))
    assert batch["sar"].shape == (4, 2, 64, 64) and batch["sar"].dtype == torch.float32
    assert batch["optical"].shape == (4, 12, 64, 64) and batch["optical"].dtype == torch.float32
    assert batch["terrain"].dtype == torch.int64 and batch["terrain"].tolist() == [0] * 4
    assert batch["idx"].tolist() == [0, 1, 2, 3]
    files = [default_dir / "S2L2A" / f"{name}.tif" for name in default_ds.names[:4]]
    dn = torch.from_numpy(np.stack([read(path) for path in files]).astype(np.float32))
    back = default_ds.destandardise_optical(batch["optical"])
    # float32 DN up to ~6000 (ulp 5e-4) through standardising and back: 0.01 is 20 ulps
    torch.testing.assert_close(back, dn, rtol=0, atol=0.01)
    assert torch.equal(back.round(), dn)
    one = default_ds.destandardise_optical(batch["optical"][2])
    torch.testing.assert_close(one, dn[2], rtol=0, atol=0.01)
    sar_db = read(default_dir / "S1GRD" / f"{default_ds.names[1]}.tif")
    expected = (sar_db - TERRAMIND_V1.sar_mean[:, None, None]) / TERRAMIND_V1.sar_std[:, None, None]
    # float32 standardisation of dB values: ~1e-7 on z up to ~4; atol 1e-5 leaves 100x
    np.testing.assert_allclose(batch["sar"][1].numpy(), expected, atol=1e-5)
    with pytest.raises(ValueError, match="12"):
        default_ds.destandardise_optical(batch["sar"])


def test_a_sample_is_a_copy(default_ds: PairDataset) -> None:
    sample = default_ds[5]
    sample["optical"].zero_()
    assert default_ds[5]["optical"].abs().sum() > 0


def test_split_is_disjoint_deterministic_and_keeps_samples(default_ds: PairDataset) -> None:
    train, val = train_val_split(default_ds, 0.25, seed=3)
    assert len(val) == 10 and len(train) == 30
    assert not set(train.names) & set(val.names)
    assert sorted(train.names + val.names) == default_ds.names
    assert train_val_split(default_ds, 0.25, seed=3)[1].names == val.names
    assert train_val_split(default_ds, 0.25, seed=4)[1].names != val.names
    assert val.terrains.dtype == np.int64 and not val.terrains.any()
    sample = val[3]
    position = default_ds.names.index(val.names[3])
    assert sample["idx"] == 3
    assert torch.equal(sample["optical"], default_ds[position]["optical"])
    assert torch.equal(sample["sar"], default_ds[position]["sar"])
    assert val.subset([1]).names == [val.names[1]] and val.skipped is default_ds.skipped


def test_standardisation_checks_its_statistics() -> None:
    args = {
        "sar_mean": [0.0, 0.0],
        "sar_std": [1.0, 1.0],
        "optical_mean": [0.0] * 12,
        "optical_std": [1.0] * 12,
    }
    assert Standardisation(**args).optical_std.dtype == np.float64
    with pytest.raises(ValueError, match="sar_mean needs 2"):
        Standardisation(**{**args, "sar_mean": [0.0] * 3})
    with pytest.raises(ValueError, match="optical_std must be positive"):
        Standardisation(**{**args, "optical_std": [1.0] * 11 + [0.0]})
    with pytest.raises(ValueError, match="read-only"):
        TERRAMIND_V1.sar_mean[0] = 0.0


def test_terramind_v1_matches_terratorch_register() -> None:
    spec = importlib.util.find_spec("terratorch")  # the test extra installs it
    assert spec is not None and spec.origin is not None, "install the sar2opt or test extra"
    register = Path(spec.origin).parent / "models/backbones/terramind/model/terramind_register.py"
    tables = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse(register.read_text()).body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id in ("v1_pretraining_mean", "v1_pretraining_std")
    }
    mean, std = tables["v1_pretraining_mean"], tables["v1_pretraining_std"]
    assert TERRAMIND_V1.sar_mean.tolist() == mean["untok_sen1grd@224"]
    assert TERRAMIND_V1.sar_std.tolist() == std["untok_sen1grd@224"]
    assert TERRAMIND_V1.optical_mean.tolist() == mean["untok_sen2l2a@224"]
    assert TERRAMIND_V1.optical_std.tolist() == std["untok_sen2l2a@224"]


# --- bad input -------------------------------------------------------------------------------


def grid(x: float = 0.0) -> Affine:
    return Affine(10.0, 0.0, 600_000.0 + x, 0.0, -10.0, 5_100_000.0)


def write(
    path: Path,
    data: np.ndarray,
    *,
    crs: str | None = UTM,
    transform: Affine | None = None,
    nodata: float | None = None,
) -> Path:
    count, height, width = data.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "width": width, "height": height, "dtype": data.dtype.name}
    with rasterio.open(
        path, "w", count=count, crs=crs, transform=transform or grid(), nodata=nodata, **profile
    ) as ds:
        ds.write(data)
    return path


def sar_array(size: int = 32, bands: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(-12, 4, (bands, size, size)).astype(np.float32)


def optical_array(size: int = 32, bands: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(200, 4000, (bands, size, size)).astype(np.uint16)


def write_sar(folder: Path, name: str, data: np.ndarray | None = None, **kwargs) -> Path:
    return write(folder / "S1GRD" / f"{name}.tif", sar_array() if data is None else data, **kwargs)


def write_optical(folder: Path, name: str, data: np.ndarray | None = None, **kwargs) -> Path:
    data = optical_array() if data is None else data
    return write(folder / "S2L2A" / f"{name}.tif", data, **kwargs)


def write_good_pairs(folder: Path, n: int = 3) -> None:
    for k in range(n):
        write_sar(folder, f"good_{k}", sar_array(seed=k), transform=grid(1000 * k))
        write_optical(folder, f"good_{k}", optical_array(seed=k), transform=grid(1000 * k))


def sar_only(folder: Path) -> Path:
    return write_sar(folder, "bad")


def optical_only(folder: Path) -> Path:
    return write_optical(folder, "bad")


def sar_with_3_bands(folder: Path) -> Path:
    write_optical(folder, "bad")
    return write_sar(folder, "bad", sar_array(bands=3))


def optical_with_4_bands(folder: Path) -> Path:
    write_sar(folder, "bad")
    return write_optical(folder, "bad", optical_array(bands=4))


def shapes_differ(folder: Path) -> Path:
    write_sar(folder, "bad")
    return write_optical(folder, "bad", optical_array(64))


def crs_differs(folder: Path) -> Path:
    write_sar(folder, "bad")
    return write_optical(folder, "bad", crs="EPSG:32633")


def transforms_differ(folder: Path) -> Path:
    write_sar(folder, "bad")
    return write_optical(folder, "bad", transform=grid(10.0))


def no_square_window(folder: Path) -> Path:
    write_optical(folder, "bad", optical_array(48)[:, :16])
    return write_sar(folder, "bad", sar_array(48)[:, :16])


def no_crs(folder: Path) -> Path:
    write_optical(folder, "bad", crs=None)
    return write_sar(folder, "bad", crs=None)


def all_nodata(folder: Path) -> Path:
    write_optical(folder, "bad", np.zeros((12, 32, 32), np.uint16), nodata=0)
    return write_sar(folder, "bad")


def truncated_optical(folder: Path) -> Path:
    write_sar(folder, "bad")
    path = write_optical(folder, "bad")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def dangling_optical_link(folder: Path) -> Path:
    write_sar(folder, "bad")
    link = folder / "S2L2A" / "bad.tif"
    link.symlink_to(folder / "gone.tif")
    return link


# Each case writes the pair "bad" into a folder and returns the file its error must name.
BAD_PAIRS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "SAR without optical": (sar_only, r"no S2L2A/bad\.tif to pair with"),
    "optical without SAR": (optical_only, r"no S1GRD/bad\.tif to pair with"),
    "SAR with 3 bands": (sar_with_3_bands, r"has 3 bands; an S1GRD file needs 2 \(VV, VH\)"),
    "optical with 4 bands": (optical_with_4_bands, r"has 4 bands; an S2L2A file needs 12"),
    "shapes differ": (shapes_differ, r"is 32x32 pixels but .* is 64x64; .* co-registered"),
    "CRS differs": (crs_differs, r"has CRS EPSG:32632 but .* has EPSG:32633"),
    "transforms differ": (transforms_differ, r"different geotransforms"),
    "no square window": (
        no_square_window,
        r"16x48 pixels cannot hold one square 32x32 window \(data.tile_size, a multiple of 32\)",
    ),
    "no CRS": (no_crs, r"has no CRS \(neither has .*\); the spatial split needs one"),
    "every pixel nodata": (all_nodata, r"every pixel is nodata or not finite"),
    "truncated optical": (truncated_optical, r"not a readable GeoTIFF"),
    "dangling optical link": (dangling_optical_link, r"a symbolic link to .*, which does not"),
}


@pytest.mark.parametrize("kind", BAD_PAIRS)
def test_a_bad_pair_is_named_when_strict_and_skipped_otherwise(tmp_path: Path, kind: str) -> None:
    make, problem = BAD_PAIRS[kind]
    write_good_pairs(tmp_path)
    culprit = make(tmp_path)
    with pytest.raises(DataError, match=problem) as info:
        PairDataset.from_folder(tmp_path, TERRAMIND_V1, size=32, strict=True)
    assert str(culprit) in str(info.value)
    with pytest.warns(UserWarning, match=problem) as caught:
        ds = PairDataset.from_folder(tmp_path, TERRAMIND_V1, size=32)
    assert len(caught) == 1 and str(culprit) in str(caught[0].message)
    assert ds.names == ["good_0", "good_1", "good_2"] and len(ds) == 3
    sar_path = tmp_path / "S1GRD" / "bad.tif"
    [(path, reason)] = [entry for entry in ds.skipped if entry[0] != str(tmp_path)]
    assert path == str(sar_path if sar_path.exists() else culprit) and str(culprit) in reason


def test_pairs_of_any_shape_mix_as_windows(tmp_path: Path) -> None:
    """A pair larger than one window is no longer another tile shape: it gives windows."""
    write_good_pairs(tmp_path)
    write_sar(tmp_path, "big", sar_array(64), transform=grid(5000))
    write_optical(tmp_path, "big", optical_array(64), transform=grid(5000))
    ds = PairDataset.from_folder(tmp_path, TERRAMIND_V1, size=32, strict=True)
    windows = [f"big_r{row}_c{col}" for row in (0, 32) for col in (0, 32)]
    assert ds.names == [*windows, "good_0", "good_1", "good_2"] and not ds.skipped
    assert {tuple(ds[i]["sar"].shape) for i in range(len(ds))} == {(2, 32, 32)}


def test_folder_layout_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a folder") as info:
        PairDataset.from_folder(tmp_path / "missing", TERRAMIND_V1, size=32)
    assert str(tmp_path / "missing") in str(info.value)
    write_optical(tmp_path, "a")
    with pytest.raises(DataError, match=r"no S1GRD/ subfolder; expected S1GRD/<name>\.tif") as info:
        PairDataset.from_folder(tmp_path, TERRAMIND_V1, size=32)
    assert str(tmp_path) in str(info.value) and "S2L2A/<name>.tif (12 bands" in str(info.value)
    (tmp_path / "S2L2A" / "a.tif").unlink()
    (tmp_path / "S1GRD").mkdir()
    with pytest.raises(DataError, match=r"no \.tif or \.tiff files in S1GRD/ or S2L2A/") as info:
        PairDataset.from_folder(tmp_path, TERRAMIND_V1, size=32)
    assert str(tmp_path) in str(info.value)
    write_sar(tmp_path, "lonely")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="none of the 1 pairs") as info:
        PairDataset.from_folder(tmp_path, TERRAMIND_V1, size=32)
    assert str(tmp_path) in str(info.value)
