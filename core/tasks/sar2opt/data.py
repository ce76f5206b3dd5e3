"""Co-registered Sentinel-1 GRD / Sentinel-2 L2A pairs for SAR->optical translation.

A folder holds ``S1GRD/<name>.tif`` (VV, VH backscatter in dB) and ``S2L2A/<name>.tif`` (12 L2A
bands, reflectance DN on the 0..10000 scale), paired by file name. As in ``TileDataset``, every
pair is read, checked and standardised once when the dataset is built and kept in memory, so a
pair that is not co-registered, has holes or does not fit TerraMind's 32-pixel grid is reported
before training rather than mid-epoch. Both modalities are standardised with fixed per-band
statistics (TerraMind's pretraining ones), not per tile: the pretrained encoder expects inputs on
the scale it was trained on, and a prediction must map back to absolute reflectance.

``ensure_default_pairs`` writes the embedded default data: procedural pairs in which SAR and
optical are two sensors looking at one land-cover map and one relief, so the translation has a
physical answer a model can learn, and tests can check that the answer is there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import rasterio
import torch
from affine import Affine
from numpy.typing import ArrayLike
from rasterio.crs import CRS
from torch.utils.data import Dataset

from core.data.cache import build_once, cache_root, read_manifest
from core.data.datasets import SkippedFiles
from core.data.geotiff import geotiff_profile, open_geotiff, require_file
from core.data.noise import power_law_noise
from core.errors import DataError

SAR_BANDS = ("VV", "VH")
"""Sentinel-1 GRD polarisations, backscatter (sigma0) in dB."""
OPTICAL_BANDS = (
    "B01",
    "B02",
    "B03",
    "B04",
    "B05",
    "B06",
    "B07",
    "B08",
    "B8A",
    "B09",
    "B11",
    "B12",
)
"""Sentinel-2 L2A bands in TerraMind's order, reflectance DN (10000 = reflectance 1)."""
SAR_DIR, OPTICAL_DIR = "S1GRD", "S2L2A"
MULTIPLE = 32
"""Height and width must be multiples of this: TerraMind's diffusion decoder needs it."""
LAYOUT = (
    f"expected {SAR_DIR}/<name>.tif ({len(SAR_BANDS)} bands: {', '.join(SAR_BANDS)} in dB) and "
    f"{OPTICAL_DIR}/<name>.tif ({len(OPTICAL_BANDS)} bands: {' '.join(OPTICAL_BANDS)}, "
    "reflectance DN), paired by file name"
)


def _read_only(values: ArrayLike) -> np.ndarray:
    array = np.array(values, dtype=np.float64)
    array.setflags(write=False)
    return array


@attrs.frozen(eq=False)
class Standardisation:
    """Per-band mean/std used to standardise both modalities (TerraMind's pretraining statistics).

    One set for the whole dataset, so standardised values keep their physical meaning across
    tiles and a prediction destandardises to absolute reflectance.
    """

    sar_mean: np.ndarray = attrs.field(converter=_read_only)  # [2] dB
    sar_std: np.ndarray = attrs.field(converter=_read_only)  # [2] dB
    optical_mean: np.ndarray = attrs.field(converter=_read_only)  # [12] DN
    optical_std: np.ndarray = attrs.field(converter=_read_only)  # [12] DN

    def __attrs_post_init__(self) -> None:
        for name, bands in (
            ("sar_mean", SAR_BANDS),
            ("sar_std", SAR_BANDS),
            ("optical_mean", OPTICAL_BANDS),
            ("optical_std", OPTICAL_BANDS),
        ):
            value = getattr(self, name)
            if value.shape != (len(bands),) or not np.isfinite(value).all():
                raise ValueError(
                    f"{name} needs {len(bands)} finite values ({', '.join(bands)}), got {value}"
                )
            if name.endswith("std") and (value <= 0).any():
                raise ValueError(f"{name} must be positive, got {value}")


TERRAMIND_V1 = Standardisation(
    sar_mean=(-12.599, -20.293),
    sar_std=(5.195, 5.890),
    optical_mean=(
        1390.458,
        1503.317,
        1718.197,
        1853.91,
        2199.1,
        2779.975,
        2987.011,
        3083.234,
        3132.22,
        3162.988,
        2424.884,
        1857.648,
    ),
    optical_std=(
        2106.761,
        2141.107,
        2038.973,
        2134.138,
        2085.321,
        1889.926,
        1820.257,
        1871.918,
        1753.829,
        1797.379,
        1434.261,
        1334.311,
    ),
)
"""TerraMind v1 pretraining statistics (``untok_sen1grd@224``, ``untok_sen2l2a@224``)."""


@attrs.frozen(eq=False)
class _Pairs:
    """Everything read from disk, shared by a dataset and all its subsets."""

    sar: np.ndarray  # [N, 2, H, W] float32, standardised
    optical: np.ndarray  # [N, 12, H, W] float32, standardised
    names: list[str]


class PairDataset(Dataset):
    """Standardised (SAR, optical) pairs of one domain.

    Build with ``from_folder``. ``names`` and ``terrains`` (all 0: samplers and
    ``train_val_split`` group by terrain) are aligned with the sample positions; ``skipped``
    lists ``(path, reason)`` for pairs left out, the path being the pair's S1GRD file (its
    S2L2A file when there is no SAR).
    """

    def __init__(
        self,
        pairs: _Pairs,
        indices: np.ndarray,
        stats: Standardisation,
        skipped: list[tuple[str, str]],
    ) -> None:
        self._pairs = pairs
        self._indices = np.asarray(indices, dtype=np.int64)
        self.stats = stats
        self.skipped = skipped
        self.names = [pairs.names[i] for i in self._indices]
        self.terrains = np.zeros(len(self._indices), dtype=np.int64)

    @classmethod
    def from_folder(
        cls, folder: Path, stats: Standardisation, *, strict: bool = False
    ) -> PairDataset:
        """Every pair of ``folder/S1GRD/<name>.tif`` and ``folder/S2L2A/<name>.tif``.

        A bad pair is skipped with a warning, or raises ``DataError`` when ``strict``; a missing
        subfolder, or no usable pair at all, always raises.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"{folder}: not a folder of SAR/optical pairs; {LAYOUT}")
        for sub in (SAR_DIR, OPTICAL_DIR):
            if not (folder / sub).is_dir():
                raise DataError(f"{folder}: no {sub}/ subfolder; {LAYOUT}")
        sar_files = _geotiffs(folder / SAR_DIR)
        optical_files = _geotiffs(folder / OPTICAL_DIR)
        names = sorted(sar_files.keys() | optical_files.keys())
        if not names:
            raise DataError(f"{folder}: no .tif or .tiff files in {SAR_DIR}/ or {OPTICAL_DIR}/")

        skipped = SkippedFiles(strict)
        loaded = []
        for name in names:
            sar_path, optical_path = sar_files.get(name), optical_files.get(name)
            if optical_path is None:
                skipped.add(
                    sar_path, DataError(f"{sar_path}: no {OPTICAL_DIR}/{name} to pair with")
                )
            elif sar_path is None:
                skipped.add(
                    optical_path, DataError(f"{optical_path}: no {SAR_DIR}/{name} to pair with")
                )
            else:
                try:
                    loaded.append((sar_path, *_load_pair(sar_path, optical_path)))
                except DataError as error:
                    skipped.add(sar_path, error)
        if not loaded:
            raise DataError(f"{folder}: none of the {len(names)} pairs is usable")
        kept = skipped.keep_common_shape(loaded, lambda item: item[1].shape[1:])

        pairs = _Pairs(
            sar=np.stack([_standardise(s, stats.sar_mean, stats.sar_std) for _, s, _ in kept]),
            optical=np.stack(
                [_standardise(o, stats.optical_mean, stats.optical_std) for _, _, o in kept]
            ),
            names=[path.stem for path, _, _ in kept],
        )
        return cls(pairs, np.arange(len(kept)), stats, skipped.entries)

    def subset(self, indices: Sequence[int] | np.ndarray) -> PairDataset:
        """A view on some samples (positions in this dataset), renumbered from 0."""
        chosen = self._indices[np.asarray(indices, dtype=np.int64)]
        return PairDataset(self._pairs, chosen, self.stats, self.skipped)

    def __len__(self) -> int:
        return len(self._indices)

    def fingerprint(self, modality: str) -> str:
        """A hash of this dataset's standardised ``"sar"`` or ``"optical"`` tiles, in order:
        what a per-tile cache computed from them is keyed by."""
        from core.keyed_cache import fingerprint

        tiles = getattr(self._pairs, modality)
        return fingerprint(*(tiles[i] for i in self._indices))

    def __getitem__(self, idx: int) -> dict[str, Any]:
        i = self._indices[idx]
        return {
            "sar": torch.from_numpy(self._pairs.sar[i].copy()),
            "optical": torch.from_numpy(self._pairs.optical[i].copy()),
            "terrain": torch.tensor(self.terrains[idx], dtype=torch.int64),
            "idx": int(idx),
        }

    def destandardise_optical(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised optical (``[..., 12, H, W]``) back to reflectance DN, for metrics in
        physical units and for writing predictions."""
        if x.ndim < 3 or x.shape[-3] != len(OPTICAL_BANDS):
            raise ValueError(
                f"expected [..., {len(OPTICAL_BANDS)}, H, W] optical, got {tuple(x.shape)}"
            )
        mean = torch.tensor(self.stats.optical_mean, dtype=x.dtype, device=x.device)
        std = torch.tensor(self.stats.optical_std, dtype=x.dtype, device=x.device)
        return x * std[:, None, None] + mean[:, None, None]


def _geotiffs(folder: Path) -> dict[str, Path]:
    """GeoTIFF files directly in ``folder``, by file name; a symbolic link that points
    nowhere is kept, so reading it reports it instead of dropping it silently."""
    suffixes = {".tif", ".tiff"}
    return {
        p.name: p
        for p in folder.iterdir()
        if p.suffix.lower() in suffixes and (p.is_file() or (p.is_symlink() and not p.exists()))
    }


def _standardise(data: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return ((data - mean[:, None, None]) / std[:, None, None]).astype(np.float32)


@attrs.frozen(eq=False)
class _Raster:
    """One file's bands and georeferencing, for the co-registration checks."""

    data: np.ndarray  # [C, H, W] float32
    crs: CRS | None
    transform: Affine


def _read_bands(path: Path, bands: tuple[str, ...], kind: str) -> _Raster:
    """All bands of one file as float32; every failure is a ``DataError`` naming the file."""
    require_file(path)
    with open_geotiff(path) as ds:
        if ds.count != len(bands):
            raise DataError(
                f"{path}: has {ds.count} bands; an {kind} file needs {len(bands)} "
                f"({', '.join(bands)})"
            )
        data = ds.read().astype(np.float32)
        void = ds.read_masks() == 0
        crs, transform = ds.crs, ds.transform
    void |= ~np.isfinite(data)
    if void.any():
        band, row, col = np.argwhere(void)[0]
        raise DataError(
            f"{path}: {int(void.sum())} values are nodata or not finite (first: band "
            f"{bands[band]}, row {row}, column {col}); a training pair needs every pixel"
        )
    return _Raster(data, crs, transform)


def _load_pair(sar_path: Path, optical_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SAR dB and optical DN of one pair, checked to be complete and co-registered."""
    sar = _read_bands(sar_path, SAR_BANDS, SAR_DIR)
    optical = _read_bands(optical_path, OPTICAL_BANDS, OPTICAL_DIR)
    (height, width), other = sar.data.shape[1:], optical.data.shape[1:]
    if (height, width) != other:
        raise DataError(
            f"{sar_path} is {height}x{width} pixels but {optical_path} is {other[0]}x{other[1]}; "
            "SAR and optical must be co-registered on one grid"
        )
    if sar.crs != optical.crs:
        raise DataError(
            f"{sar_path} has CRS {sar.crs} but {optical_path} has {optical.crs}; "
            "SAR and optical must be co-registered on one grid"
        )
    if not sar.transform.almost_equals(optical.transform):
        raise DataError(
            f"{sar_path} and {optical_path} have different geotransforms "
            f"({tuple(sar.transform)[:6]} vs {tuple(optical.transform)[:6]}); "
            "SAR and optical must be co-registered on one grid"
        )
    if height % MULTIPLE or width % MULTIPLE:
        raise DataError(
            f"{sar_path}: {height}x{width} pixels; height and width must be multiples of "
            f"{MULTIPLE} for TerraMind's diffusion decoder, so crop the pair"
        )
    return sar.data, optical.data


# --- the embedded default pairs --------------------------------------------------------------

CACHE_VERSION = "v1"
"""Bump when the generator or the file format change, so old caches are not reused."""
DEFAULT_PAIRS = 40
SEED = 20240501
PIXEL_M = 10.0
CRS_DEFAULT = "EPSG:32632"
"""UTM zone 32N, a projected CRS in metres, as Sentinel-2 tiles use."""
LULC_DIR = "LULC"
LAND_COVER = ("water", "vegetation", "bare", "urban")
"""Classes of the land-cover map both sensors see, by their code in ``LULC/<name>.tif``."""

_REFLECTANCE_DN: dict[str, tuple[float, ...]] = {
    # B01   B02   B03   B04   B05   B06   B07   B08   B8A   B09   B11   B12
    "water": (700, 620, 560, 360, 300, 240, 210, 180, 160, 110, 60, 40),
    "vegetation": (300, 380, 700, 380, 1200, 2900, 3500, 3700, 3850, 3600, 1900, 900),
    "bare": (900, 1100, 1500, 1900, 2100, 2300, 2450, 2600, 2700, 2750, 3500, 3100),
    "urban": (1800, 1900, 2000, 2100, 2150, 2200, 2250, 2300, 2300, 2250, 2400, 2200),
}
"""Surface reflectance signatures: water dark and darkest in NIR/SWIR, vegetation with the red
edge and NIR plateau, soil brightening with wavelength, built-up surfaces bright and flat."""
_BACKSCATTER_DB: dict[str, tuple[float, float]] = {
    "water": (-22.0, -28.0),  # specular: the pulse is reflected away from the sensor
    "vegetation": (-8.0, -14.0),  # volume scattering in the canopy, strong cross-pol
    "bare": (-12.0, -20.0),  # surface scattering, weak cross-pol
    "urban": (-3.0, -9.0),  # double bounce between walls and ground
}
"""Sentinel-1 sigma0 (VV, VH) at the scene's incidence angle on flat ground."""
_BACKSCATTER_POWER = {name: 10 ** (np.array(db) / 10) for name, db in _BACKSCATTER_DB.items()}
_LOOKS = 4.0
"""Equivalent number of looks of the speckle (GRD high resolution is about 4.4)."""
_TILES_PER_ROW = 8


def ensure_default_pairs(tile_size: int = 64, *, quiet: bool = False) -> Path:
    """Write ``DEFAULT_PAIRS`` procedural pairs once; return their folder.

    The folder is ``<cache_root()>/sar2opt-<tile_size>-v1``. It holds
    ``S1GRD/``, ``S2L2A/``, ``LULC/`` (the land-cover map behind each pair) and a
    ``manifest.json``, is built in a temporary folder and renamed into place, so an interrupted
    or concurrent first run never leaves a partial dataset; a later call only reads the manifest.
    """
    if tile_size < MULTIPLE or tile_size % MULTIPLE:
        raise DataError(
            f"tile_size must be a positive multiple of {MULTIPLE} (TerraMind's diffusion "
            f"decoder needs it), got {tile_size}"
        )
    folder = cache_root() / f"sar2opt-{tile_size}-{CACHE_VERSION}"
    manifest = build_once(folder, lambda staging: _build(staging, tile_size), _read_manifest)
    if not quiet:
        fractions = ", ".join(f"{k} {v:.0%}" for k, v in manifest["land_cover_fractions"].items())
        print(
            f"SAR->optical default pairs: {folder} ({manifest['pairs']} procedural S1 GRD / "
            f"S2 L2A pairs of {tile_size}x{tile_size} at {PIXEL_M:g} m; {fractions})"
        )
    return folder


@attrs.frozen(eq=False)
class _Scene:
    """What both sensors look at: one map of the ground, shared by SAR and optical."""

    cover: np.ndarray  # [H, W] uint8 codes into LAND_COVER
    canopy: np.ndarray  # [H, W] fraction of each pixel under vegetation
    moisture: np.ndarray  # [H, W] soil wetness, zero mean, unit std
    normal: np.ndarray  # [3, H, W] unit surface normals (east, north, up)

    def where(self, *names: str) -> np.ndarray:
        """Pixels of any of the named classes."""
        return np.isin(self.cover, [LAND_COVER.index(name) for name in names])


def _default_pair(n: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Land cover ``[H, W]`` uint8, SAR ``[2, H, W]`` float32 dB and optical ``[12, H, W]``
    uint16 DN of default pair ``n``; the same ``(n, size)`` always gives the same arrays."""
    rng = np.random.default_rng([SEED, n, size])
    scene = _scene(rng, size)
    return scene.cover, _sar(rng, scene), _optical(rng, scene)


def _scene(rng: np.random.Generator, size: int) -> _Scene:
    """A lake fills the lowest ground, a settlement and patches of bare soil lie on the rest,
    vegetation covers what is left; canopy density and soil moisture vary smoothly."""
    elevation = 300 + rng.uniform(2, 12) * power_law_noise(rng, size, 4.0)  # slopes mostly < 20°
    water_fraction = 0.0 if rng.random() < 0.3 else rng.uniform(0.05, 0.3)
    level = np.quantile(elevation, water_fraction)
    water = elevation < level
    elevation = np.maximum(elevation, level)  # a flat lake surface
    urban = _patches(rng, size, ~water, rng.uniform(0.0, 0.3))
    bare = _patches(rng, size, ~water & ~urban, rng.uniform(0.1, 0.4))
    cover = np.full((size, size), LAND_COVER.index("vegetation"), dtype=np.uint8)
    for name, where in (("water", water), ("urban", urban), ("bare", bare)):
        cover[where] = LAND_COVER.index(name)
    density = power_law_noise(rng, size, 3.0)
    canopy = np.select(
        [cover == LAND_COVER.index("vegetation"), cover == LAND_COVER.index("bare")],
        [np.clip(0.85 + 0.1 * density, 0.5, 1.0), np.clip(0.1 + 0.08 * density, 0.0, 0.3)],
        0.0,
    )
    return _Scene(cover, canopy, power_law_noise(rng, size, 3.0), _surface_normal(elevation))


def _patches(
    rng: np.random.Generator, size: int, within: np.ndarray, fraction: float
) -> np.ndarray:
    """About ``fraction`` of the ``within`` pixels, as smooth blobs."""
    field = power_law_noise(rng, size, 3.5)
    if not within.any():
        return within
    return within & (field > np.quantile(field[within], 1.0 - fraction))


def _surface_normal(elevation: np.ndarray) -> np.ndarray:
    """Unit upward normals ``[3, H, W]`` as (east, north, up); row 0 is the northern edge."""
    dz_drow, dz_dcol = np.gradient(elevation, PIXEL_M)
    normal = np.stack([-dz_dcol, dz_drow, np.ones_like(elevation)])
    return normal / np.linalg.norm(normal, axis=0)


def _towards(azimuth_deg: float, zenith_deg: float) -> np.ndarray:
    """Unit vector (east, north, up) pointing at ``azimuth`` (from north), ``zenith`` off up."""
    az, zen = math.radians(azimuth_deg), math.radians(zenith_deg)
    return np.array([math.sin(zen) * math.sin(az), math.sin(zen) * math.cos(az), math.cos(zen)])


def _per_class(scene: _Scene, table: dict[str, ArrayLike]) -> np.ndarray:
    """``table[class]`` at every pixel: ``[len(values), H, W]``."""
    values = np.array([table[name] for name in LAND_COVER], dtype=np.float64)  # [classes, C]
    return np.moveaxis(values[scene.cover], -1, 0)


def _mix_canopy(scene: _Scene, table: dict[str, ArrayLike], soil: np.ndarray) -> np.ndarray:
    """Vegetated and bare pixels as canopy over soil (linear in reflectance or power); the
    other classes keep their own values."""
    canopy = np.array(table["vegetation"], dtype=np.float64)[:, None, None]
    mixed = scene.canopy * canopy + (1 - scene.canopy) * soil
    return np.where(scene.where("vegetation", "bare"), mixed, _per_class(scene, table))


def _optical(rng: np.random.Generator, scene: _Scene) -> np.ndarray:
    """Sentinel-2 L2A DN: class signatures, canopy over soil (wet soil is darker), mild
    texture, lit by a late-morning sun over the relief."""
    size = scene.cover.shape[0]
    wetness = np.clip(1 - 0.12 * scene.moisture, 0.6, 1.3)
    soil = np.array(_REFLECTANCE_DN["bare"])[:, None, None] * wetness
    reflectance = _mix_canopy(scene, _REFLECTANCE_DN, soil)
    reflectance *= 1 + 0.04 * power_law_noise(rng, size, 2.0)
    reflectance *= np.where(scene.where("urban"), 1 + 0.15 * power_law_noise(rng, size, 1.0), 1.0)
    sun = _towards(rng.uniform(135, 170), rng.uniform(30, 55))
    hillshade = np.einsum("c,chw->hw", sun, scene.normal) / sun[2]
    illumination = np.where(scene.where("water"), 1.0, np.clip(hillshade, 0.15, None))
    dn = reflectance * illumination + rng.normal(0, 15, reflectance.shape)
    return np.clip(np.rint(dn), 1, 10000).astype(np.uint16)  # 0 is L2A's nodata


def _sar(rng: np.random.Generator, scene: _Scene) -> np.ndarray:
    """Sentinel-1 GRD sigma0 in dB: class backscatter, canopy over soil in power (wet soil is
    brighter), brighter on slopes facing the radar and darker on those facing away, then
    multiplicative speckle in power."""
    size = scene.cover.shape[0]
    wetness = 10 ** (2.0 * scene.moisture / 10)  # +-2 dB
    soil = _BACKSCATTER_POWER["bare"][:, None, None] * wetness
    power = _mix_canopy(scene, _BACKSCATTER_POWER, soil)
    roughness_db = np.where(scene.where("urban"), 3.0, 1.0) * power_law_noise(rng, size, 2.0)
    power *= 10 ** (roughness_db / 10)
    incidence = rng.uniform(31, 45)  # Sentinel-1 IW swath
    look = 80.0 if rng.random() < 0.5 else 280.0  # right-looking, ascending or descending
    radar = _towards(look + 180.0, incidence)
    cos_local = np.einsum("c,chw->hw", radar, scene.normal)
    local = np.clip(np.arccos(np.clip(cos_local, -1, 1)), np.radians(10), np.radians(89))
    theta0 = math.radians(incidence)
    power *= (np.cos(local) / math.cos(theta0)) * (math.sin(theta0) / np.sin(local))
    power *= rng.gamma(_LOOKS, 1.0 / _LOOKS, power.shape)
    return (10 * np.log10(np.maximum(power, 1e-5))).astype(np.float32)


def _tile_transform(n: int, size: int) -> Affine:
    """Tiles on a grid with one-tile gaps, so every tile has its own footprint."""
    extent = size * PIXEL_M
    row, col = divmod(n, _TILES_PER_ROW)
    origin = Affine.translation(400_000 + 2 * col * extent, 5_000_000 - 2 * row * extent)
    return origin @ Affine.scale(PIXEL_M, -PIXEL_M)


def write_bands(
    path: Path,
    data: np.ndarray,
    transform: Affine,
    bands: Sequence[str],
    tags: dict[str, str],
    *,
    crs: CRS | str = CRS_DEFAULT,
) -> None:
    """A tiled, deflate-compressed multi-band GeoTIFF with named bands."""
    count, height, width = data.shape
    profile = geotiff_profile(height, width, count, data.dtype.name, crs, transform)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
        ds.descriptions = tuple(bands)
        ds.update_tags(**tags)


def _build(out: Path, tile_size: int) -> dict:
    counts = np.zeros(len(LAND_COVER), dtype=np.int64)
    for n in range(DEFAULT_PAIRS):
        cover, sar, optical = _default_pair(n, tile_size)
        counts += np.bincount(cover.ravel(), minlength=len(LAND_COVER))
        transform = _tile_transform(n, tile_size)
        tags = {"source": "terraplug procedural", "seed": str(SEED), "pair": str(n)}
        name = f"pair_{n:03d}.tif"
        write_bands(out / SAR_DIR / name, sar, transform, SAR_BANDS, tags)
        write_bands(out / OPTICAL_DIR / name, optical, transform, OPTICAL_BANDS, tags)
        codes = {f"class_{k}": c for k, c in enumerate(LAND_COVER)}
        write_bands(out / LULC_DIR / name, cover[None], transform, ["land_cover"], tags | codes)
    manifest = {
        "version": f"sar2opt-{CACHE_VERSION}",
        "source": "terraplug procedural: one land-cover map and relief per pair, seen by both",
        "seed": SEED,
        "pairs": DEFAULT_PAIRS,
        "tile_size": tile_size,
        "pixel_size_m": PIXEL_M,
        "crs": CRS_DEFAULT,
        "sar_bands": list(SAR_BANDS),
        "optical_bands": list(OPTICAL_BANDS),
        "land_cover_fractions": {
            name: float(c / counts.sum()) for name, c in zip(LAND_COVER, counts, strict=True)
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _read_manifest(folder: Path) -> dict | None:
    def complete(manifest: dict) -> bool:
        return all(
            sum(1 for _ in (folder / sub).glob("pair_*.tif")) == manifest.get("pairs")
            for sub in (SAR_DIR, OPTICAL_DIR, LULC_DIR)
        )

    return read_manifest(folder, f"sar2opt-{CACHE_VERSION}", complete)
