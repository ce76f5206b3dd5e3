"""``python -m core.predict --checkpoint RUN_DIR S1.tif S2.tif`` on a sar2opt run.

A Sentinel-1 GRD GeoTIFF (2 bands, VV and VH sigma0 in dB) of any size becomes a 12-band
Sentinel-2 L2A GeoTIFF on the same grid: the same CRS, transform and size. TerraMind
generates overlapping windows of the training tile size (each with its own seed), blended
with the tapered weight of the DEM predict so window borders leave no seams. Rows of
windows stream through a buffer one window high, so memory follows the scene's width. The
output holds L2A digital numbers as the products do (uint16, reflectance x 10,000, scale
1e-4 recorded per band); pixels whose SAR is nodata are nodata (0).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.errors import RasterioError
from rasterio.windows import Window
from tqdm.auto import tqdm

from core.data.geotiff import geotiff_profile, open_geotiff, require_file, write_geotiff
from core.data.windows import taper, window_starts
from core.errors import DataError, UsageError
from core.tasks import PredictOptions
from core.tasks.sar2opt.adapters import load_run_terramind
from core.tasks.sar2opt.data import OPTICAL_BANDS, SAR_BANDS, TERRAMIND_V1
from core.tasks.sar2opt.task import DEFAULT_TILE_SIZE, REFLECTANCE_SCALE, validation_steps
from core.tasks.sar2opt.terramind import TerraMindSarToOptical

MULTIPLE = 32
"""Window sides must be multiples of this (the diffusion decoder's down-sampling)."""
NODATA = 0
LINEAR_MAX = 1.5
LINEAR_SHARE = 0.9
SAMPLE_SIDE = 1024
""":func:`linear_backscatter` reads the scene decimated to at most this many pixels a side."""


@contextlib.contextmanager
def open_sar(path: Path) -> Iterator[rasterio.DatasetReader]:
    """A georeferenced 2-band (VV, VH) GeoTIFF, opened with the GeoTIFF driver only (as
    every input is, see docs/safety.md); every problem is a DataError naming it."""
    require_file(path)
    with open_geotiff(path) as src:
        if src.count != len(SAR_BANDS) or src.crs is None:
            raise DataError(
                f"{path}: needs {len(SAR_BANDS)} bands ({', '.join(SAR_BANDS)} in dB) and a "
                f"CRS; has {src.count} band(s), CRS {src.crs}"
            )
        yield src


def linear_backscatter(src: rasterio.DatasetReader) -> str | None:
    """What makes the scene look like linear backscatter rather than dB, or None.

    TerraMind reads sigma0 in dB: Sentinel-1 GRD lies mostly between -30 and +5 dB, and most
    of it is negative (TerraMind's means: -12.6 dB VV, -20.3 dB VH). Linear power (or
    amplitude) is never negative and mostly below 1; standardised as dB it gives garbage
    without any error. The rule: no valid value below 0, and at least ``LINEAR_SHARE``
    (90 %) of them within [0, ``LINEAR_MAX``] (1.5), over the scene read decimated.
    """
    shape = (src.count, min(src.height, SAMPLE_SIDE), min(src.width, SAMPLE_SIDE))
    try:
        values = src.read(out_shape=shape, masked=True).compressed()
    except RasterioError as error:
        raise DataError(f"{src.name}: unreadable: {error}") from None
    values = values[np.isfinite(values)]
    if not values.size or values.min() < 0:
        return None
    share = float(np.mean(values <= LINEAR_MAX))
    if share < LINEAR_SHARE:
        return None
    return (
        f"the backscatter looks linear, not dB: no value below 0 and {share:.0%} within "
        f"[0, {LINEAR_MAX:g}], where sigma0 in dB is mostly -30 to +5; TerraMind reads dB "
        "(convert with 10 * log10(value)), so the output is likely garbage"
    )


class SarToOpticalPredictor:
    """Streams a Sentinel-1 scene through a run's TerraMind, one row of windows at a time."""

    def __init__(
        self, terramind: TerraMindSarToOptical, steps: int, seed: int, window: int, overlap: int
    ) -> None:
        if window < MULTIPLE or window % MULTIPLE:
            raise UsageError(f"--window {window} must be a positive multiple of {MULTIPLE}")
        if not 0 <= 2 * overlap < window:
            raise UsageError(f"--overlap {overlap} must be >= 0 and less than half of {window}")
        self.terramind, self.steps, self.seed = terramind, steps, seed
        self.window, self.overlap = window, overlap
        weight = taper(window, overlap)
        self.weight = np.outer(weight, weight)
        stats = TERRAMIND_V1
        self.sar_mean, self.sar_std = stats.sar_mean[:, None, None], stats.sar_std[:, None, None]
        self.optical_mean = stats.optical_mean[:, None, None]
        self.optical_std = stats.optical_std[:, None, None]

    @torch.no_grad()
    def generate(self, sar_db: np.ndarray, index: int) -> np.ndarray:
        """``[12, w, w]`` L2A DN from one ``[2, w, w]`` window in dB (NaN: nodata)."""
        standard = (sar_db - self.sar_mean) / self.sar_std
        standard = np.nan_to_num(standard, nan=0.0).astype(np.float32)  # nodata: the mean
        device = next(self.terramind.parameters()).device
        sar = torch.from_numpy(standard)[None].to(device)
        optical = self.terramind.generate(sar, self.steps, self.seed + index)[0].cpu().numpy()
        return optical * self.optical_std + self.optical_mean

    def run(self, src_path: Path, dst_path: Path, progress: bool = True) -> None:
        """Write through ``write_geotiff``, so a failure or a full disk never leaves a
        half-written output."""
        with open_sar(src_path) as src:
            profile = geotiff_profile(
                src.height, src.width, len(OPTICAL_BANDS), "uint16", src.crs, src.transform, NODATA
            )
            with write_geotiff(dst_path, profile) as dst:
                dst.descriptions = OPTICAL_BANDS
                dst.scales = (1 / REFLECTANCE_SCALE,) * len(OPTICAL_BANDS)
                self._stream(src, dst, progress)

    def _read(self, src: rasterio.DatasetReader, row: int, rows: int) -> np.ndarray:
        """``[2, rows, width]`` dB, NaN where the raster says nodata."""
        try:
            data = src.read(window=Window(0, row, src.width, rows), masked=True)
        except RasterioError as error:
            raise DataError(f"{src.name}: unreadable: {error}") from None
        values = data.data.astype(np.float32)
        values[np.ma.getmaskarray(data) | ~np.isfinite(values)] = np.nan
        return values

    def _stream(
        self, src: rasterio.DatasetReader, dst: rasterio.io.DatasetWriter, progress: bool
    ) -> None:
        size, stride = self.window, self.window - 2 * self.overlap
        height, width = src.height, src.width
        rows, cols = window_starts(height, size, stride), window_starts(width, size, stride)
        band_rows = min(size, height)
        total = np.zeros((len(OPTICAL_BANDS), band_rows, width), dtype=np.float64)
        weights = np.zeros((band_rows, width), dtype=np.float64)
        index = 0
        with tqdm(
            total=len(rows) * len(cols), desc=Path(src.name).name, unit="window",
            disable=not progress,
        ) as bar:  # fmt: skip
            for i, row in enumerate(rows):
                band = self._read(src, row, band_rows)
                for col in cols:
                    sar = band[:, :, col : col + size]
                    h, w = sar.shape[1:]
                    padded = np.pad(sar, ((0, 0), (0, size - h), (0, size - w)), mode="symmetric")
                    optical = self.generate(padded, index)[:, :h, :w]
                    total[:, :, col : col + w] += optical * self.weight[:h, :w]
                    weights[:, col : col + w] += self.weight[:h, :w]
                    index += 1
                    bar.update()
                done = (rows[i + 1] if i + 1 < len(rows) else height) - row
                out = total[:, :done] / weights[:done]
                out = np.clip(np.rint(out), 1, np.iinfo(np.uint16).max).astype(np.uint16)
                out[:, np.isnan(band[:, :done]).any(0)] = NODATA
                dst.write(out, window=Window(0, row, width, done))
                for buffer in (total, weights):
                    buffer[..., :-done, :] = buffer[..., done:, :]
                    buffer[..., -done:, :] = 0


def predict(run_dir: Path, src: Path, dst: Path, options: PredictOptions) -> None:
    """Load the run's TerraMind (config, adapters, and the checkpoint's fingerprint of the
    frozen weights) and translate ``src`` to ``dst``; warn when ``src`` looks linear."""
    if options.domain is not None:
        raise UsageError("--terrain: a sar2opt run has no terrains")
    with open_sar(src) as sar:  # a bad input is reported before the model loads
        linear = linear_backscatter(sar)
    if linear:
        warnings.warn(f"{src}: {linear}", stacklevel=2)
    terramind, config, _ = load_run_terramind(run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() and not options.cpu else "cpu")
    window, overlap = options.window, options.overlap
    size = window or config.data.tile_size or DEFAULT_TILE_SIZE
    predictor = SarToOpticalPredictor(
        terramind.to(device),
        validation_steps(config, config.run.epochs),
        config.run.seed,
        size,
        overlap if overlap is not None else size // 4,
    )
    predictor.run(src, dst, progress=options.progress)
