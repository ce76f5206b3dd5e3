"""``python -m core.predict --checkpoint RUN_DIR S1.tif S2.tif`` on a sar2opt run.

A Sentinel-1 GRD GeoTIFF (2 bands, VV and VH sigma0 in dB) of any size becomes a 12-band
Sentinel-2 L2A GeoTIFF on the same grid: the same CRS, transform and size. TerraMind
generates overlapping windows of the training tile size, ``--batch-size`` at a time, blended
with the tapered weight of the DEM predict. The generation's noise is drawn once on the
scene's grid (:class:`SceneNoise`), so overlapping windows agree and the blend leaves no
pattern at the window stride. Windows without a valid pixel are skipped. Rows of windows
stream through a buffer one window high, so memory follows the scene's width. The output
holds L2A digital numbers as the products do (uint16, reflectance x 10,000, scale 1e-4
recorded per band) and the generation's settings in its tags; pixels whose SAR is nodata
are nodata (0).
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

from core.data.geotiff import geotiff_profile, open_geotiff, require_file, write_geotiff
from core.data.windows import taper, window_progress, window_starts
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
DEFAULT_BATCH_SIZE = 8
"""Windows per forward pass when ``--batch-size`` is not given (see docs/terramind.md)."""


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


class SceneNoise:
    """The generation's randomness, drawn once on the scene's grid of token patches.

    Each token patch (16 x 16 pixels) of the scene has its own seed (``seed``, block row,
    block column): Gumbel noise over the vocabulary for the token at that patch, and the
    diffusion's starting noise for its pixels. A window on the patch grid reads the blocks
    it covers, so two overlapping windows draw the same noise where they overlap: where
    their logits agree they pick the same tokens, and the decoder starts from the same
    image. Independent draws per window leave a pattern at the window stride instead (each
    window a different sample, blended at the overlaps).
    """

    def __init__(self, seed: int, patch: int, channels: int, vocabulary: int) -> None:
        self.seed, self.patch, self.channels, self.vocabulary = seed, patch, channels, vocabulary

    def block(self, row: int, col: int) -> tuple[np.ndarray, np.ndarray]:
        """``[V]`` Gumbel noise and ``[C, patch, patch]`` pixel noise of block ``(row, col)``."""
        rng = np.random.default_rng((self.seed, row, col))
        with np.errstate(divide="ignore"):  # a uniform of 0: -inf, a token never picked
            gumbel = -np.log(-np.log(rng.random(self.vocabulary, dtype=np.float32)))
        pixels = rng.standard_normal((self.channels, self.patch, self.patch), dtype=np.float32)
        return gumbel, pixels

    def window(self, row: int, col: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, V]`` Gumbel noise (tokens in raster order) and ``[C, size, size]`` pixel
        noise of the window whose top-left pixel is ``(row, col)``, all multiples of the
        patch."""
        patch, blocks = self.patch, size // self.patch
        gumbel = np.empty((blocks, blocks, self.vocabulary), dtype=np.float32)
        noise = np.empty((self.channels, size, size), dtype=np.float32)
        for i in range(blocks):
            for j in range(blocks):
                tile = np.s_[:, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch]
                gumbel[i, j], noise[tile] = self.block(row // patch + i, col // patch + j)
        return torch.from_numpy(gumbel.reshape(blocks * blocks, -1)), torch.from_numpy(noise)


class SarToOpticalPredictor:
    """Streams a Sentinel-1 scene through a run's TerraMind, one row of windows at a time,
    in batches of windows, with the generation's noise drawn on the scene's grid."""

    def __init__(
        self,
        terramind: TerraMindSarToOptical,
        steps: int,
        seed: int,
        window: int,
        overlap: int,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if window < MULTIPLE or window % MULTIPLE:
            raise UsageError(f"--window {window} must be a positive multiple of {MULTIPLE}")
        if not 0 <= 2 * overlap < window:
            raise UsageError(f"--overlap {overlap} must be >= 0 and less than half of {window}")
        patch = terramind.tokenizer.patch_size
        if (window - 2 * overlap) % patch:
            raise UsageError(
                f"--overlap {overlap}: the windows' stride, {window} - 2 x {overlap}, must be a "
                f"multiple of {patch} (TerraMind's token patch), so that overlapping windows "
                f"share the generation's noise; use a multiple of {patch // 2}"
            )
        self.terramind, self.steps, self.seed = terramind, steps, seed
        self.window, self.overlap, self.batch_size = window, overlap, batch_size
        self.patch = patch
        channels, vocabulary = terramind.tokenizer.n_channels, len(terramind.codebook)
        self.noise = SceneNoise(seed, patch, channels, vocabulary)
        weight = taper(window, overlap)
        self.weight = np.outer(weight, weight)
        stats = TERRAMIND_V1
        self.sar_mean, self.sar_std = stats.sar_mean[:, None, None], stats.sar_std[:, None, None]
        self.optical_mean = stats.optical_mean[:, None, None]
        self.optical_std = stats.optical_std[:, None, None]
        self.windows = self.skipped = 0
        """The windows of the last scene, and those of them without a valid pixel, which
        were not generated."""

    @torch.no_grad()
    def generate(self, windows: list[np.ndarray], origins: list[tuple[int, int]]) -> np.ndarray:
        """``[B, 12, w, w]`` L2A DN from ``[2, w, w]`` windows in dB (NaN: nodata) whose
        top-left pixels lie at ``origins`` of the scene, in one batch."""
        inputs = self.model_inputs(windows, origins)
        optical = self.terramind.generate_noise(*inputs).cpu().numpy()
        return optical * self.optical_std + self.optical_mean

    def model_inputs(
        self, windows: list[np.ndarray], origins: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
        """What ``generate_noise`` takes: the windows standardised on TerraMind's device
        (nodata at the mean), the diffusion steps, and each window's noise from the scene's."""
        standard = (np.stack(windows) - self.sar_mean) / self.sar_std
        standard = np.nan_to_num(standard, nan=0.0).astype(np.float32)
        sar = torch.from_numpy(standard).to(next(self.terramind.parameters()).device)
        drawn = [self.noise.window(row, col, self.window) for row, col in origins]
        gumbel, noise = (torch.stack(parts) for parts in zip(*drawn, strict=True))
        return sar, self.steps, gumbel, noise

    def tags(self) -> dict[str, object]:
        """What the output was generated with, recorded in its tags."""
        return {
            "diffusion_steps": self.steps,
            **self.terramind.generation_settings(),
            "seed": self.seed,
            "window": self.window,
            "overlap": self.overlap,
        }

    def run(
        self, src_path: Path, dst_path: Path, progress: bool = True, lines: bool = False
    ) -> None:
        """Write through ``write_geotiff``, so a failure or a full disk never leaves a
        half-written output. ``progress``: a bar; ``lines``: a line now and then on stdout."""
        with open_sar(src_path) as src:
            profile = geotiff_profile(
                src.height, src.width, len(OPTICAL_BANDS), "uint16", src.crs, src.transform, NODATA
            )
            with write_geotiff(dst_path, profile) as dst:
                dst.descriptions = OPTICAL_BANDS
                dst.scales = (1 / REFLECTANCE_SCALE,) * len(OPTICAL_BANDS)
                dst.update_tags(**{key: str(value) for key, value in self.tags().items()})
                self._stream(src, dst, progress, lines)

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
        self, src: rasterio.DatasetReader, dst: rasterio.io.DatasetWriter, progress: bool,
        lines: bool,
    ) -> None:  # fmt: skip
        size, stride = self.window, self.window - 2 * self.overlap
        height, width = src.height, src.width
        # windows on the token grid: the last ones may reach past the scene (mirrored there)
        patch = self.patch
        rows = window_starts(-(-height // patch) * patch, size, stride)
        cols = window_starts(-(-width // patch) * patch, size, stride)
        total = np.zeros((len(OPTICAL_BANDS), size, width), dtype=np.float64)
        weights = np.zeros((size, width), dtype=np.float64)
        self.windows, self.skipped = len(rows) * len(cols), 0
        name = Path(src.name).name
        with window_progress(self.windows, name, progress, lines) as advance:
            for i, row in enumerate(rows):
                band = self._read(src, row, min(size, height - row))
                wanted = [col for col in cols if not self._void(band[:, :, col : col + size])]
                self.skipped += len(cols) - len(wanted)
                advance(len(cols) - len(wanted))
                for start in range(0, len(wanted), self.batch_size):
                    batch = wanted[start : start + self.batch_size]
                    windows = [self._padded(band[:, :, col : col + size]) for col in batch]
                    generated = self.generate(windows, [(row, col) for col in batch])
                    for col, optical in zip(batch, generated, strict=True):
                        h, w = band.shape[1], min(size, width - col)
                        total[:, :h, col : col + w] += optical[:, :h, :w] * self.weight[:h, :w]
                        weights[:h, col : col + w] += self.weight[:h, :w]
                    advance(len(batch))
                done = (rows[i + 1] if i + 1 < len(rows) else height) - row
                out = self._finish(total, weights, band, done)
                dst.write(out, window=Window(0, row, width, done))
                for buffer in (total, weights):
                    buffer[..., :-done, :] = buffer[..., done:, :]
                    buffer[..., -done:, :] = 0

    @staticmethod
    def _void(sar: np.ndarray) -> bool:
        """No pixel of the window has both bands: every output pixel of it is nodata."""
        return bool(np.isnan(sar).any(0).all())

    def _padded(self, sar: np.ndarray) -> np.ndarray:
        """Mirror a window that reaches past the scene to the full window size."""
        h, w = sar.shape[1:]
        return np.pad(sar, ((0, 0), (0, self.window - h), (0, self.window - w)), mode="symmetric")

    @staticmethod
    def _finish(total: np.ndarray, weights: np.ndarray, band: np.ndarray, done: int) -> np.ndarray:
        """The first ``done`` rows blended, as uint16 DN, nodata where the SAR is (and where
        only skipped windows lay, which is nodata too)."""
        void = np.isnan(band[:, :done]).any(0)
        out = np.divide(total[:, :done], weights[:done], out=np.zeros_like(total[:, :done]),
                        where=~void)  # fmt: skip
        out = np.clip(np.rint(out), 1, np.iinfo(np.uint16).max).astype(np.uint16)
        out[:, void] = NODATA
        return out


def predict(run_dir: Path, src: Path, dst: Path, options: PredictOptions) -> None:
    """Load the run's TerraMind (config, adapters, and the checkpoint's fingerprint of the
    frozen weights) and translate ``src`` to ``dst``; warn when ``src`` looks linear. The
    options' diffusion steps, top-p and temperature override the run's."""
    if options.domain is not None:
        raise UsageError("--terrain: a sar2opt run has no terrains")
    check_generation_options(options)
    with open_sar(src) as sar:  # a bad input is reported before the model loads
        linear = linear_backscatter(sar)
    if linear:
        warnings.warn(f"{src}: {linear}", stacklevel=2)
    terramind, config, _ = load_run_terramind(run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() and not options.cpu else "cpu")
    model = config.model
    terramind.configure_generation(
        top_p=model.top_p if options.top_p is None else options.top_p,
        temperature=model.temperature if options.temperature is None else options.temperature,
        thresholding=model.decoder_thresholding,
        clip=model.decoder_clip,
    )
    window, overlap = options.window, options.overlap
    size = window or config.data.tile_size or DEFAULT_TILE_SIZE
    terramind.to(device).park_tokenizer_encoder()  # predict never tokenizes
    predictor = SarToOpticalPredictor(
        terramind,
        options.diffusion_steps or validation_steps(config, config.run.epochs),
        config.run.seed,
        size,
        overlap if overlap is not None else size // 4,
        options.batch_size or DEFAULT_BATCH_SIZE,
    )
    predictor.run(src, dst, progress=options.progress, lines=options.progress_lines)


def check_generation_options(options: PredictOptions) -> None:
    """Refuse overrides TerraMind cannot generate with, before anything loads."""
    if options.diffusion_steps is not None and options.diffusion_steps < 1:
        raise UsageError(f"--diffusion-steps {options.diffusion_steps} must be at least 1")
    if options.top_p is not None and not 0 <= options.top_p <= 1:
        raise UsageError(f"--top-p {options.top_p} must lie in [0, 1] (0: every token)")
    if options.temperature is not None and not options.temperature >= 0:
        raise UsageError(
            f"--temperature {options.temperature} must be at least 0 (0: the most likely token)"
        )
