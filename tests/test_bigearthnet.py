"""The six real BigEarthNet S1/S2 pairs: safe unpacking, band order, resampling, S1 units, and
their place as the sar2opt task's default validation set."""

from __future__ import annotations

import ast
import importlib.util
import io
import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.shutil import copy as copy_raster

from core.config import load_config
from core.data.distfiles import BIGEARTHNET_S1, BIGEARTHNET_S2, fetch
from core.data.geotiff import open_geotiff
from core.errors import DataError
from core.plugins import PluginManager
from core.tasks.sar2opt.bigearthnet import (
    TILE_SIZE,
    RealPairs,
    ensure_bigearthnet_pairs,
    extract_archive,
    read_patch_pair,
)
from core.tasks.sar2opt.data import OPTICAL_BANDS, SAR_BANDS, TERRAMIND_V1, PairDataset
from core.train import Trainer
from tests.test_sar2opt_data import write_good_pairs

COUNTRIES = {"Austria": 1, "Ireland": 2, "Finland": 2, "Portugal": 1}
"""Where the six example patches lie, as the BigEarthNet documentation lists them."""
COARSE = {"B05": 20, "B06": 20, "B07": 20, "B8A": 20, "B11": 20, "B12": 20, "B01": 60, "B09": 60}
COMMON_NAMES = {
    "B01": "COASTAL_AEROSOL",
    "B02": "BLUE",
    "B03": "GREEN",
    "B04": "RED",
    "B05": "RED_EDGE_1",
    "B06": "RED_EDGE_2",
    "B07": "RED_EDGE_3",
    "B08": "NIR_BROAD",
    "B8A": "NIR_NARROW",
    "B09": "WATER_VAPOR",
    "B11": "SWIR_1",
    "B12": "SWIR_2",
}
"""Sentinel-2 band designations and the names terratorch gives them."""


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A cache of this module's own, so the pairs are built here from the archives."""
    with pytest.MonkeyPatch.context() as patch:
        root = tmp_path_factory.mktemp("cache")
        patch.setenv("TERRAPLUG_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def real(cache: Path) -> RealPairs:
    return ensure_bigearthnet_pairs(quiet=True)


@pytest.fixture(scope="module")
def raw(real: RealPairs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two example archives as BigEarthNet ships them, per-band files at 10/20/60 m."""
    folder = tmp_path_factory.mktemp("raw")
    for item in (BIGEARTHNET_S1, BIGEARTHNET_S2):
        extract_archive(fetch(item), folder)
    return folder


def read(path: Path) -> np.ndarray:
    with open_geotiff(path) as ds:
        return ds.read().astype(np.float64)


def raw_band(raw: Path, patch: str, band: str) -> tuple[np.ndarray, Affine]:
    kind = "S2" if band.startswith("B") else "S1"
    path = raw / f"BigEarthNet-{kind}-Example" / patch / f"{patch}_{band}.tif"
    with open_geotiff(path) as ds:
        return ds.read(1).astype(np.float64), ds.transform


# --- the pairs -------------------------------------------------------------------------------


def test_six_georeferenced_pairs_named_with_their_countries(
    real: RealPairs, capsys: pytest.CaptureFixture[str]
) -> None:
    assert Counter(p.country for p in real.patches) == COUNTRIES
    manifest = json.loads((real.folder / "manifest.json").read_text())
    assert manifest["licence"] == "CDLA-Permissive-1.0" and "Sumbul" in manifest["citation"]
    for patch in real.patches:
        assert patch.labels and patch.s1_name.endswith(patch.name.split("_", 3)[-1])
        with (
            rasterio.open(real.folder / "S1GRD" / f"{patch.name}.tif") as sar,
            rasterio.open(real.folder / "S2L2A" / f"{patch.name}.tif") as optical,
            rasterio.open(real.full / "S1GRD" / f"{patch.name}.tif") as full,
        ):
            assert sar.descriptions == SAR_BANDS and optical.descriptions == OPTICAL_BANDS
            assert sar.shape == optical.shape == (TILE_SIZE, TILE_SIZE) and full.shape == (120, 120)
            assert sar.crs == optical.crs == full.crs and sar.crs.to_epsg() in range(32601, 32661)
            assert sar.res == (10.0, 10.0)
            offset = (120 - TILE_SIZE) // 2  # the centre crop, 120 m in from each edge
            assert (
                sar.transform
                == optical.transform
                == full.transform @ Affine.translation(offset, offset)
            )
    dataset = PairDataset.from_folder(real.folder, TERRAMIND_V1, size=TILE_SIZE, strict=True)
    assert sorted(dataset.names) == sorted(p.name for p in real.patches)

    assert ensure_bigearthnet_pairs() == real  # read from the cache
    out = capsys.readouterr().out
    assert all(p.name in out and p.s1_name in out for p in real.patches)
    assert all(country in out for country in COUNTRIES)


def test_s1_and_10m_bands_come_through_unchanged_in_terramind_band_order(
    real: RealPairs, raw: Path
) -> None:
    for patch in real.patches:
        sar = read(real.full / "S1GRD" / f"{patch.name}.tif")
        optical = read(real.full / "S2L2A" / f"{patch.name}.tif")
        for k, band in enumerate(SAR_BANDS):
            np.testing.assert_array_equal(sar[k], raw_band(raw, patch.s1_name, band)[0])
        for k, band in enumerate(OPTICAL_BANDS):
            if band not in COARSE:
                np.testing.assert_array_equal(optical[k], raw_band(raw, patch.name, band)[0])
    spec = importlib.util.find_spec("terratorch")
    assert spec is not None and spec.origin is not None, "install the sar2opt or test extra"
    register = Path(spec.origin).parent / "models/backbones/terramind/model/terramind_register.py"
    [pretrained_bands] = [
        ast.literal_eval(node.value)
        for node in ast.parse(register.read_text()).body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PRETRAINED_BANDS"
    ]
    assert [COMMON_NAMES[b] for b in OPTICAL_BANDS] == pretrained_bands["untok_sen2l2a@224"]
    assert list(SAR_BANDS) == pretrained_bands["untok_sen1grd@224"]


@pytest.mark.parametrize("band", ["B05", "B11", "B01", "B09"])
def test_coarse_bands_are_resampled_bilinearly_keeping_their_mean(
    real: RealPairs, raw: Path, band: str
) -> None:
    """Each tile's band equals, in the mean over its footprint, the band's own coarse pixels
    (so it is that band, at its place in the order); values stay within the source's range
    and are interpolated, not 2 x 2 or 6 x 6 blocks."""
    k = OPTICAL_BANDS.index(band)
    factor = COARSE[band] // 10
    offset, size = (120 - TILE_SIZE) // 2 // factor, TILE_SIZE // factor
    for patch in real.patches:
        source, transform = raw_band(raw, patch.name, band)
        assert transform.a == COARSE[band]
        full = read(real.full / "S2L2A" / f"{patch.name}.tif")[k]
        tile = read(real.folder / "S2L2A" / f"{patch.name}.tif")[k]
        footprint = source[offset : offset + size, offset : offset + size]
        # 5e-3: bilinear weights at the footprint's edge reach coarse pixels outside it (the six
        # patches differ by up to 0.25 %); 1e-3 for the whole patch, where only the clipped
        # kernel at the border can move the mean (by 4e-10 on these patches)
        assert tile.mean() == pytest.approx(footprint.mean(), rel=5e-3)
        assert full.mean() == pytest.approx(source.mean(), rel=1e-3)
        assert source.min() <= full.min() and full.max() <= source.max()
        assert np.isin(tile, source).mean() < 0.5  # nearest neighbour would copy every value


def test_sar_is_in_db_on_terramind_s1grd_scale(real: RealPairs) -> None:
    """TerraMind's S1GRD statistics (mean -12.6 / -20.3, std 5.2 / 5.9) are in dB; the pairs
    are dB too, so standardised they sit near zero with unit-order spread. The same values as
    linear power would sit 2.5-3.5 std above the mean."""
    sar = np.stack([read(real.folder / "S1GRD" / f"{p.name}.tif") for p in real.patches])
    vv, vh = sar[:, 0], sar[:, 1]
    assert np.percentile(sar, 1) > -35 and np.percentile(sar, 99) < 5
    assert 3 < np.median(vv) - np.median(vh) < 10  # co-polarised returns are stronger
    mean, std = TERRAMIND_V1.sar_mean[:, None, None], TERRAMIND_V1.sar_std[:, None, None]
    z = (sar - mean) / std
    assert np.abs(z.mean(axis=(0, 2, 3))).max() < 1
    assert ((z.std(axis=(0, 2, 3)) > 0.3) & (z.std(axis=(0, 2, 3)) < 1.5)).all()
    assert (((10 ** (sar / 10) - mean) / std).mean(axis=(0, 2, 3)) > 2).all()
    dataset = PairDataset.from_folder(real.folder, TERRAMIND_V1, size=TILE_SIZE, strict=True)
    position = [p.name for p in real.patches].index(dataset.names[0])
    # float32 standardisation of dB values: ~1e-7 on z up to ~3; atol 1e-5 leaves 100x
    np.testing.assert_allclose(dataset[0]["sar"].numpy(), z[position], atol=1e-5)


def test_optical_pairs_read_back_to_reflectance(real: RealPairs) -> None:
    dataset = PairDataset.from_folder(real.folder, TERRAMIND_V1, size=TILE_SIZE, strict=True)
    dn = read(real.folder / "S2L2A" / f"{dataset.names[0]}.tif")
    back = dataset.destandardise_optical(dataset[0]["optical"]).numpy()
    np.testing.assert_allclose(back, dn, atol=0.01)  # float32 of DN up to ~6000: ulp 5e-4
    reflectance = dn / 10_000
    assert reflectance.min() > 0 and reflectance.max() < 1
    red, nir = OPTICAL_BANDS.index("B04"), OPTICAL_BANDS.index("B08")
    ndvi = (reflectance[nir] - reflectance[red]) / (reflectance[nir] + reflectance[red])
    assert np.median(ndvi) > 0.3  # Austrian farmland in June is green


# --- safe unpacking --------------------------------------------------------------------------


def crafted_tar(path: Path, member: tarfile.TarInfo) -> Path:
    """A tar with one harmless file, then ``member``."""
    with tarfile.open(path, "w") as tar:
        harmless = tarfile.TarInfo("patch/ok.txt")
        harmless.size = 2
        tar.addfile(harmless, io.BytesIO(b"ok"))
        if member.isfile():
            member.size = 4
            tar.addfile(member, io.BytesIO(b"evil"))
        else:
            tar.addfile(member)
    return path


def link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, target
    return member


UNSAFE = {
    "parent path": (tarfile.TarInfo("../evil.txt"), "outside the destination"),
    "absolute path": (tarfile.TarInfo("/tmp/evil.txt"), "absolute path"),
    "symlink": (link("patch/evil", "/etc/passwd", tarfile.SYMTYPE), "not a regular file"),
    "hard link": (link("patch/evil", "patch/ok.txt", tarfile.LNKTYPE), "not a regular file"),
}


@pytest.mark.parametrize("kind", UNSAFE)
def test_an_unsafe_archive_is_refused_whole(tmp_path: Path, kind: str) -> None:
    member, problem = UNSAFE[kind]
    archive = crafted_tar(tmp_path / "crafted.tar", member)
    target = tmp_path / "target" / "inside"
    target.mkdir(parents=True)
    with pytest.raises(DataError, match=problem) as raised:
        extract_archive(archive, target)
    assert str(archive) in str(raised.value) and "nothing was extracted" in str(raised.value)
    assert not any(target.iterdir())
    assert not (tmp_path / "target" / "evil.txt").exists()


def test_a_damaged_archive_names_the_file(tmp_path: Path) -> None:
    archive = tmp_path / "damaged.tar.bz2"
    archive.write_bytes(b"BZh91AY&SY" + bytes(64))
    with pytest.raises(DataError, match="cannot unpack") as raised:
        extract_archive(archive, tmp_path / "target")
    assert str(archive) in str(raised.value)


def test_only_the_geotiff_driver_reads_a_file(real: RealPairs, tmp_path: Path) -> None:
    """A VRT named .tif would let GDAL read whatever file it points at."""
    source = real.folder / "S1GRD" / f"{real.patches[0].name}.tif"
    patch = tmp_path / "S1A_patch"
    patch.mkdir()
    disguised = patch / "S1A_patch_VV.tif"
    copy_raster(source, patch / "pointer.vrt", driver="VRT")
    (patch / "pointer.vrt").rename(disguised)
    with rasterio.open(disguised) as ds:
        assert ds.driver == "VRT"  # what GDAL does when any driver may open the file
    with pytest.raises(DataError, match="not a readable GeoTIFF") as raised:
        read_patch_pair(patch, patch)
    assert str(disguised) in str(raised.value)


# --- the sar2opt task's datasets -------------------------------------------------------------


def task_datasets(tmp_path: Path, *overrides: str) -> tuple[PairDataset, PairDataset]:
    config = load_config(None, ["run.task='sar2opt'", f"run.out='{tmp_path / 'run'}'", *overrides])
    trainer = Trainer(config, PluginManager.from_names(["teacher_forcing"]))
    return trainer.ctx.task.build_datasets(config, trainer.ctx)


def test_default_task_trains_on_procedural_pairs_and_validates_on_the_real_ones(
    real: RealPairs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train, val = task_datasets(tmp_path)
    assert len(train) == 40 and all(name.startswith("pair_") for name in train.names)
    assert sorted(val.names) == sorted(p.name for p in real.patches)
    assert val[0]["sar"].shape == (2, TILE_SIZE, TILE_SIZE)
    out = capsys.readouterr().out
    assert "6 real BigEarthNet" in out and all(p.name in out for p in real.patches)


@pytest.mark.parametrize("key", ["val_regions", "exclude_regions"])
def test_the_default_data_refuses_regions_it_cannot_split_by(tmp_path: Path, key: str) -> None:
    """It validates on the six BigEarthNet pairs whatever the regions say: an error naming
    the key, before any pair is read."""
    with pytest.raises(DataError, match=rf"built-in sar2opt data .*data\.{key} cannot change"):
        task_datasets(tmp_path, f"data.{key}=['S2A_MSIL2A']")


def test_a_data_folder_is_split_as_before_without_the_real_pairs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TERRAPLUG_CACHE", str(tmp_path / "empty-cache"))
    folder = tmp_path / "pairs"
    write_good_pairs(folder, n=5)  # 32 x 32 pairs 1 km apart: one window and one block each
    overrides = ("data.val_fraction=0.4", "data.tile_size=32", "data.val_block=1")
    train, val = task_datasets(tmp_path, f"data.dir='{folder}'", *overrides)
    assert len(val) == 2 and sorted(train.names + val.names) == [f"good_{k}" for k in range(5)]
    # nothing fetched or built (the suite keeps window indexes in a folder of its own)
    assert not (tmp_path / "empty-cache").exists()
