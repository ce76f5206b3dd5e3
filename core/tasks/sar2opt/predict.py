"""``python -m core.predict --checkpoint RUN_DIR S1.tif S2.tif`` on a sar2opt run.

A Sentinel-1 GRD GeoTIFF (2 bands, VV and VH sigma0 in dB) of any size becomes a 12-band
Sentinel-2 L2A GeoTIFF on the same grid: the same CRS, transform and size. TerraMind
generates overlapping windows of the training tile size, ``--batch-size`` at a time, fused
on the scene's canvas at every step of the generation (:class:`SarToOpticalPredictor`), so
overlapping windows agree where they overlap and the output shows no window grid. The
generation's noise is drawn once on the scene's grid (:class:`SceneNoise`). Windows without
a valid pixel are skipped. The output holds L2A digital numbers as the products do (uint16,
reflectance x 10,000, scale 1e-4 recorded per band) and the generation's settings in its
tags; pixels whose SAR is nodata are nodata (0).
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing
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
    diffusion's starting noise for its pixels. Every window that covers a patch reads the
    same noise there, whatever the batch, and the scene's canvas starts from it.
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

    def row(self, row: int, blocks: int) -> tuple[np.ndarray, np.ndarray]:
        """``[blocks, V]`` Gumbel noise and ``[C, patch, blocks x patch]`` pixel noise of the
        first ``blocks`` blocks of block row ``row``."""
        drawn = [self.block(row, col) for col in range(blocks)]
        return np.stack([gumbel for gumbel, _ in drawn]), np.concatenate(
            [pixels for _, pixels in drawn], axis=2
        )


class Canvas:
    """A ``[channels, height, width]`` array in a file, read and written by whole rows.

    Plain reads and writes rather than a memory map: a write the disk refuses then raises
    the ``OSError`` that names the reason, where a mapped page would kill the process.
    """

    def __init__(self, path: Path, channels: int, height: int, width: int, dtype: type) -> None:
        self.file = path.open("w+b")
        self.shape, self.dtype = (channels, width), np.dtype(dtype)
        self.row_bytes = channels * width * self.dtype.itemsize

    def read(self, row: int, rows: int) -> np.ndarray:
        """``[channels, rows, width]`` from row ``row`` on."""
        self.file.seek(row * self.row_bytes)
        data = np.frombuffer(self.file.read(rows * self.row_bytes), self.dtype)
        return data.reshape(rows, *self.shape).transpose(1, 0, 2)

    def write(self, row: int, data: np.ndarray) -> None:
        """``[channels, rows, width]`` from row ``row`` on."""
        self.file.seek(row * self.row_bytes)
        self.file.write(np.ascontiguousarray(data.transpose(1, 0, 2), self.dtype).data)

    def close(self) -> None:
        self.file.close()


class SarToOpticalPredictor:
    """Translates a Sentinel-1 scene with a run's TerraMind by fusing its windows on the
    scene's canvas (MultiDiffusion: Bar-Tal et al., ICML 2023).

    Every window of the scene takes each step of the generation in lockstep, and after each
    step the windows' states are averaged where they overlap, on a canvas of the scene from
    which every window reads its next state: the token logits on the grid of token patches
    before the one draw of the tokens, then the diffusion's image after every DDIM step
    (weighted by the DEM predict's taper). Overlapping windows therefore agree wherever
    they overlap, and the output is the last canvas. The canvases live in files beside the
    output; each pass streams through them one row of windows at a time, in batches of
    windows, so memory follows the scene's width, not its area. Windows without a valid
    pixel take no part.
    """

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
                f"share their tokens; use a multiple of {patch // 2}"
            )
        self.terramind, self.steps, self.seed = terramind, steps, seed
        self.window, self.overlap, self.batch_size = window, overlap, batch_size
        self.patch = patch
        self.channels, vocabulary = terramind.tokenizer.n_channels, len(terramind.codebook)
        self.noise = SceneNoise(seed, patch, self.channels, vocabulary)
        weight = taper(window, overlap)
        self.weight = np.outer(weight, weight)
        stats = TERRAMIND_V1
        self.sar_mean, self.sar_std = stats.sar_mean[:, None, None], stats.sar_std[:, None, None]
        self.optical_mean = stats.optical_mean[:, None, None]
        self.optical_std = stats.optical_std[:, None, None]
        self.device = next(terramind.parameters()).device
        self.windows = self.skipped = 0
        """The windows of the last scene, and those of them without a valid pixel, which
        were not generated."""

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
        half-written output; the canvases go in a temporary folder beside it, removed at the
        end. ``progress``: a bar; ``lines``: a line now and then on stdout."""
        with open_sar(src_path) as src:
            profile = geotiff_profile(
                src.height, src.width, len(OPTICAL_BANDS), "uint16", src.crs, src.transform, NODATA
            )
            with write_geotiff(dst_path, profile) as dst, tempfile.TemporaryDirectory(
                prefix=f".{dst_path.name}.canvas-", dir=dst_path.parent
            ) as scratch:  # fmt: skip
                dst.descriptions = OPTICAL_BANDS
                dst.scales = (1 / REFLECTANCE_SCALE,) * len(OPTICAL_BANDS)
                dst.update_tags(**{key: str(value) for key, value in self.tags().items()})
                self._predict(src, dst, Path(scratch), progress, lines)

    @torch.no_grad()
    def _predict(
        self, src: rasterio.DatasetReader, dst: rasterio.io.DatasetWriter, scratch: Path,
        progress: bool, lines: bool,
    ) -> None:  # fmt: skip
        size, patch = self.window, self.patch
        stride = size - 2 * self.overlap
        # windows on the token grid: the last ones may reach past the scene (mirrored there)
        rows = window_starts(-(-src.height // patch) * patch, size, stride)
        cols = window_starts(-(-src.width // patch) * patch, size, stride)
        height, width = rows[-1] + size, cols[-1] + size  # the canvas: every window's pixels
        self.windows, passes = len(rows) * len(cols), 1 + self.steps
        with contextlib.ExitStack() as files:

            def canvas(name: str, channels: int, scale: int, dtype: type) -> Canvas:
                shape = (channels, height // scale, width // scale)
                return files.enter_context(closing(Canvas(scratch / name, *shape, dtype)))

            canvases = [canvas(name, self.channels, 1, np.float32) for name in ("a", "b")]
            tokens = canvas("tokens", 1, patch, np.int32)
            with window_progress(self.windows * passes, Path(src.name).name, progress, lines,
                                 unit="window step") as advance:  # fmt: skip
                wanted = self._tokens(src, rows, cols, tokens, canvases[0], advance)
                self.skipped = self.windows - sum(map(len, wanted))
                for step, t in enumerate(self.terramind.timesteps(self.steps)):
                    state, following = canvases[step % 2], canvases[1 - step % 2]
                    self._denoise(t, rows, wanted, state, tokens, following, advance)
            self._write(src, dst, canvases[self.steps % 2])

    def _rows(self, rows: list[int], flush: Callable[[int, int], None]) -> Iterator[int]:
        """Yields the index of each window row; after each, calls ``flush(row, done)`` for
        its first ``done`` pixel rows, which no later window row covers."""
        for i, row in enumerate(rows):
            yield i
            flush(row, (rows[i + 1] if i + 1 < len(rows) else row + self.window) - row)

    def _tokens(
        self, src: rasterio.DatasetReader, rows: list[int], cols: list[int], tokens: Canvas,
        canvas: Canvas, advance: Callable[[int], None],
    ) -> list[list[int]]:  # fmt: skip
        """The first pass: TerraMind's token logits of every window with a valid pixel,
        averaged on the grid of token patches where windows overlap (a plain mean, which
        gives a lone window's logits exactly), then one draw per patch with the scene's
        Gumbel noise into ``tokens``, and the scene's starting noise into ``canvas``.
        Returns the columns of the windows generated, per window row."""
        size, patch, vocabulary = self.window, self.patch, self.noise.vocabulary
        blocks, across = size // patch, tokens.shape[1]
        logits = np.zeros((blocks, across, vocabulary), np.float32)
        counts = np.zeros((blocks, across), np.float32)
        wanted: list[list[int]] = []

        def flush(row: int, done: int) -> None:
            for block in range(done // patch):
                gumbel, pixels = self.noise.row(row // patch + block, across)
                mean = torch.from_numpy(logits[block] / np.maximum(counts[block], 1)[:, None])
                drawn = self.terramind.sample_tokens(mean[None], torch.from_numpy(gumbel)[None])
                tokens.write(row // patch + block, drawn.cpu().numpy()[None])
                canvas.write(row + block * patch, pixels)
            for buffer in (logits, counts):
                shift_up(buffer, done // patch, 0)

        for i in self._rows(rows, flush):
            row = rows[i]
            band = self._read(src, row, min(size, src.height - row))
            wanted.append([col for col in cols if not self._void(band[:, :, col : col + size])])
            advance(len(cols) - len(wanted[i]))
            for batch in self._batches(wanted[i]):
                windows = [self.padded(band[:, :, col : col + size]) for col in batch]
                found = self.terramind(self.standardised(windows), output="logits")
                for col, window in zip(batch, found.cpu().numpy(), strict=True):
                    at = np.s_[:, col // patch : col // patch + blocks]
                    logits[at] += window.reshape(blocks, blocks, vocabulary)
                    counts[at] += 1
                advance(len(batch))
        return wanted

    def _denoise(
        self, t: torch.Tensor, rows: list[int], wanted: list[list[int]], state: Canvas,
        tokens: Canvas, following: Canvas, advance: Callable[[int], None],
    ) -> None:  # fmt: skip
        """One diffusion step of every window generated, each from its part of ``state``
        conditioned on its part of ``tokens``; the windows' new states averaged with the
        taper where they overlap, into ``following`` (as they were where no window lies)."""
        size, patch, width = self.window, self.patch, state.shape[1]
        total = np.zeros((self.channels, size, width), np.float64)
        weights = np.zeros((size, width), np.float64)
        band = np.empty(0)

        def flush(row: int, done: int) -> None:
            kept = band[:, :done].astype(np.float64)  # where no window lies
            covered = weights[:done] > 0
            following.write(row, np.divide(total[:, :done], weights[:done], out=kept,
                                           where=covered))  # fmt: skip
            shift_up(total, done, 1)
            shift_up(weights, done, 0)

        for i in self._rows(rows, flush):
            row = rows[i]
            band = state.read(row, size)
            grid = tokens.read(row // patch, size // patch)[0]
            advance(self.windows // len(rows) - len(wanted[i]))
            for batch in self._batches(wanted[i]):
                images = self._on_device(np.stack([band[:, :, col : col + size] for col in batch]))
                grids = np.stack([grid[:, col // patch : (col + size) // patch] for col in batch])
                quant = self.terramind.condition(self._on_device(grids).long())
                stepped = self.step_windows(images, t, quant, row, batch)
                for col, window in zip(batch, stepped, strict=True):
                    total[:, :, col : col + size] += window * self.weight
                    weights[:, col : col + size] += self.weight
                advance(len(batch))

    def step_windows(
        self, images: torch.Tensor, t: torch.Tensor, quant: torch.Tensor, row: int,
        cols: list[int],
    ) -> np.ndarray:  # fmt: skip
        """``[B, C, w, w]``: one DDIM step of the windows at ``row``, ``cols``, before they
        are fused (where a benchmark looks at how far they differ)."""
        return self.terramind.denoise(images, t, quant).cpu().numpy()

    def _write(self, src: rasterio.DatasetReader, dst: rasterio.io.DatasetWriter,
               canvas: Canvas) -> None:  # fmt: skip
        """The last canvas as uint16 L2A DN, nodata where the SAR is."""
        for row in range(0, src.height, self.window):
            rows = min(self.window, src.height - row)
            standard = canvas.read(row, rows)[:, :, : src.width]
            optical = np.rint(standard * self.optical_std + self.optical_mean)
            out = np.clip(optical, 1, np.iinfo(np.uint16).max).astype(np.uint16)
            out[:, np.isnan(self._read(src, row, rows)).any(0)] = NODATA
            dst.write(out, window=Window(0, row, src.width, rows))

    def _batches(self, cols: list[int]) -> list[list[int]]:
        size = self.batch_size
        return [cols[start : start + size] for start in range(0, len(cols), size)]

    def standardised(self, windows: list[np.ndarray]) -> torch.Tensor:
        """``[B, 2, w, w]`` SAR in dB (NaN: nodata) standardised on TerraMind's device,
        nodata at the mean."""
        standard = (np.stack(windows) - self.sar_mean) / self.sar_std
        return self._on_device(np.nan_to_num(standard, nan=0.0).astype(np.float32))

    def _on_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _read(self, src: rasterio.DatasetReader, row: int, rows: int) -> np.ndarray:
        """``[2, rows, width]`` dB, NaN where the raster says nodata."""
        try:
            data = src.read(window=Window(0, row, src.width, rows), masked=True)
        except RasterioError as error:
            raise DataError(f"{src.name}: unreadable: {error}") from None
        values = data.data.astype(np.float32)
        values[np.ma.getmaskarray(data) | ~np.isfinite(values)] = np.nan
        return values

    @staticmethod
    def _void(sar: np.ndarray) -> bool:
        """No pixel of the window has both bands: every output pixel of it is nodata."""
        return bool(np.isnan(sar).any(0).all())

    def padded(self, sar: np.ndarray) -> np.ndarray:
        """Mirror a window that reaches past the scene to the full window size."""
        h, w = sar.shape[1:]
        return np.pad(sar, ((0, 0), (0, self.window - h), (0, self.window - w)), mode="symmetric")


def shift_up(buffer: np.ndarray, rows: int, axis: int) -> None:
    """Move a row buffer's content ``rows`` back along ``axis``, zeros behind it."""
    moved = np.moveaxis(buffer, axis, 0)
    moved[:-rows] = moved[rows:]
    moved[-rows:] = 0


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
