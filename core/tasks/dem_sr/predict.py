"""dem_sr's ``python -m core.predict``: super-resolve a DEM GeoTIFF of any size.

The raster is processed in overlapping windows of the size the model was trained on, each
normalised like a training tile, and blended with a tapered weight so window borders leave
no seams. Rows of windows stream through a band buffer of one window's height: reads and
writes are windowed, so the numpy buffers depend on the raster's width, not its height, and
GDAL's block cache is capped (``--gdal-cache``), so resident memory stays flat however large
the raster. Voids stay voids: an output pixel is nodata where its source pixel is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import torch
from affine import Affine
from rasterio.errors import RasterioError
from rasterio.windows import Window

from core.data.geotiff import geotiff_profile, mask_implausible, open_dem, write_geotiff
from core.data.windows import taper, window_progress, window_starts
from core.errors import DataError, UsageError
from core.inference import TrainedRun
from core.tasks import PredictOptions
from core.tasks.dem_sr.data.dataset import normalisation
from core.tasks.dem_sr.terrain import TERRAINS, terrain_index

DEFAULT_BATCH_SIZE = 16
"""Windows per forward pass when ``--batch-size`` is not given."""


def normalise(
    window: np.ndarray, global_scale_m: float | None = None
) -> tuple[np.ndarray, float, float]:
    """As in training: fill voids with the mean, divide by the std (floored at 1 m) or by
    the run's ``global_scale_m``."""
    mean, std = normalisation(window, global_scale_m)
    filled = np.where(np.isfinite(window), window, mean)
    return ((filled - mean) / std).astype(np.float32), mean, std


def read_elevation(
    src: rasterio.DatasetReader,
    window: Window | None = None,
    out_shape: tuple | None = None,
    *,
    strict: bool = False,
) -> np.ndarray:
    """Band 1 as float32, NaN wherever the raster says nodata (value, mask, NaN) or inf,
    or holds a value no terrain has (``mask_implausible``; an error with ``strict``).

    Converted to float before masking: an int16/uint16 DEM cannot hold NaN.
    """
    try:
        data = src.read(1, window=window, out_shape=out_shape, masked=True)
    except RasterioError as error:
        raise DataError(f"{src.name}: unreadable (truncated or damaged?): {error}") from None
    values = data.data.astype(np.float32)
    values[np.ma.getmaskarray(data) | ~np.isfinite(values)] = np.nan
    if src.nodata is not None and np.isfinite(src.nodata):
        values[values == np.float32(src.nodata)] = np.nan
    mask_implausible(values, src.name, strict=strict)
    return values


class Predictor:
    """Streams a raster through a trained model, one row of windows at a time."""

    def __init__(
        self,
        trained: TrainedRun,
        window: int,
        overlap: int,
        terrain: str,
        batch_size: int = DEFAULT_BATCH_SIZE,
        strict_data: bool = False,
    ) -> None:
        if window < 1:
            raise UsageError(f"--window {window} must be at least 1")
        if not 0 <= 2 * overlap < window:
            raise UsageError(f"--overlap {overlap} must be >= 0 and less than half of {window}")
        self.trained = trained
        self.scale = scale = trained.config.data.scale
        self.window, self.overlap, self.batch_size = window, overlap, batch_size
        self.strict_data = strict_data
        self.terrain = terrain_index(terrain)
        weight = taper(window * scale, overlap * scale)
        self.weight = np.outer(weight, weight)

    @torch.no_grad()
    def predict_windows(self, windows: list[np.ndarray]) -> list[np.ndarray]:
        """Super-resolve equally sized LR windows (metres, NaN voids) in one batch."""
        scale_m = self.trained.config.data.global_scale
        chunk = [normalise(w, scale_m) for w in windows]
        device = self.trained.ctx.device
        lr = torch.from_numpy(np.stack([c[0] for c in chunk]))[:, None].to(device)
        batch = {"lr": lr, "terrain": torch.full((len(chunk),), self.terrain, device=device)}
        pred = self.trained.model(self.trained.route(batch)["lr"])[:, 0].float().cpu().numpy()
        return [p * std + mean for p, (_, mean, std) in zip(pred, chunk, strict=True)]

    def run(
        self, src_path: Path, dst_path: Path, progress: bool = True, lines: bool = False
    ) -> None:
        """Write the super-resolved raster through ``write_geotiff``, so a failure, a full
        disk or a signal never leaves a half-written ``dst_path``, nor the temporary file.
        ``progress``: a bar; ``lines``: a line now and then on stdout."""
        with open_dem(src_path) as src:
            nodata = src.nodata if src.nodata is not None and np.isfinite(src.nodata) else np.nan
            with write_geotiff(dst_path, self._profile(src, nodata)) as dst:
                self._stream(src, dst, nodata, progress, lines)

    def _profile(self, src: rasterio.DatasetReader, nodata: float) -> dict:
        """Float32 (super-resolved elevations are fractional), the input's CRS and nodata."""
        s = self.scale
        # output pixel (col, row) is input pixel (col / s, row / s): the input's bounds at
        # 1/s of its cell size, whether the CRS counts in degrees or in metres
        transform = src.transform @ Affine.scale(1 / s)
        return geotiff_profile(
            src.height * s, src.width * s, 1, "float32", src.crs, transform, nodata
        )

    def _stream(
        self,
        src: rasterio.DatasetReader,
        dst: rasterio.io.DatasetWriter,
        nodata: float,
        progress: bool,
        lines: bool,
    ) -> None:
        s, size, stride = self.scale, self.window, self.window - 2 * self.overlap
        height, width = src.height, src.width
        rows, cols = window_starts(height, size, stride), window_starts(width, size, stride)
        lr_rows, lr_cols = min(size, height), min(size, width)
        # The output rows of one row of windows; finished rows leave from the top.
        total = np.zeros((lr_rows * s, width * s), dtype=np.float64)
        weights = np.zeros_like(total)
        weight = self.weight[: lr_rows * s, : lr_cols * s]
        name, total_windows = Path(src.name).name, len(rows) * len(cols)
        with window_progress(total_windows, name, progress, lines) as advance:
            for i, row in enumerate(rows):
                band = read_elevation(src, Window(0, row, width, lr_rows), strict=self.strict_data)
                for start in range(0, len(cols), self.batch_size):
                    batch_cols = cols[start : start + self.batch_size]
                    windows = [self._padded(band[:, c : c + lr_cols]) for c in batch_cols]
                    for col, pred in zip(batch_cols, self.predict_windows(windows), strict=True):
                        span = slice(col * s, (col + lr_cols) * s)
                        total[:, span] += pred[: lr_rows * s, : lr_cols * s] * weight
                        weights[:, span] += weight
                    advance(len(batch_cols))
                # LR rows no later window touches: blend, mask and write them, then shift up
                done = (rows[i + 1] if i + 1 < len(rows) else height) - row
                out = self._finish(total[: done * s], weights[: done * s], band[:done], nodata)
                dst.write(out, 1, window=Window(0, row * s, width * s, done * s))
                for buffer in (total, weights):
                    buffer[: -done * s] = buffer[done * s :]
                    buffer[-done * s :] = 0

    def _padded(self, window: np.ndarray) -> np.ndarray:
        """Mirror-pad a window smaller than the model's input (rasters smaller than it)."""
        pad_y, pad_x = self.window - window.shape[0], self.window - window.shape[1]
        if pad_y == 0 and pad_x == 0:
            return window
        return np.pad(window, ((0, pad_y), (0, pad_x)), mode="symmetric")

    def _finish(
        self, total: np.ndarray, weights: np.ndarray, source: np.ndarray, nodata: float
    ) -> np.ndarray:
        """Blended output rows, nodata wherever the source pixel is void.

        A valid prediction that happens to equal the nodata value is nudged off it, so it
        is not read back as a void.
        """
        s = self.scale
        out = (total / weights).astype(np.float32)
        void = np.repeat(np.repeat(np.isnan(source), s, axis=0), s, axis=1)
        if np.isfinite(nodata):
            clash = ~void & (out == np.float32(nodata))
            out[clash] = np.nextafter(out[clash], np.float32(np.inf))
        out[void] = nodata
        return out


def guess_terrain(path: Path, max_pixels: int = 512, *, strict: bool = False) -> str:
    """The raster's category from its name, else from a decimated read of its relief."""
    from core.data.geotiff import cell_size_m
    from core.tasks.dem_sr.data.labels import label_tile

    with open_dem(path) as src:
        factor = max(1, -(-max(src.height, src.width) // max_pixels))
        shape = (max(1, src.height // factor), max(1, src.width // factor))
        data = read_elevation(src, out_shape=shape, strict=strict)
        dy, dx = cell_size_m(src.transform, src.crs, (src.height, src.width))
        cell = (dy * src.height / shape[0], dx * src.width / shape[1])
    if not np.isfinite(data).any():
        raise DataError(f"{path}: every pixel is nodata")
    return label_tile(path.stem, data, cell)[0]


def predict(run_dir: Path, src: Path, dst: Path, options: PredictOptions) -> None:
    """Super-resolve ``src`` into ``dst`` with the run's model; the terrain of a
    terrain-aware model (one with ``route_batch`` plugins) is guessed when not given."""
    if options.domain is not None and options.domain not in TERRAINS:
        raise UsageError(f"--terrain {options.domain!r}: choose one of {', '.join(TERRAINS)}")
    sampling = {"--diffusion-steps": options.diffusion_steps, "--top-p": options.top_p,
                "--temperature": options.temperature}  # fmt: skip
    given = [name for name, value in sampling.items() if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: a dem_sr run does not sample; sar2opt runs do")
    with open_dem(src):
        pass  # a bad input is reported before the model loads
    trained = TrainedRun.restore(run_dir, cpu=options.cpu)
    window = (
        options.window if options.window is not None else max(trained.checkpoint_meta["lr_shape"])
    )
    overlap = options.overlap if options.overlap is not None else window // 4
    terrain = options.domain or (
        guess_terrain(src, strict=options.strict_data)
        if trained.uses_hook("route_batch")
        else "moderate"
    )
    predictor = Predictor(
        trained,
        window,
        overlap,
        terrain,
        batch_size=options.batch_size or DEFAULT_BATCH_SIZE,
        strict_data=options.strict_data,
    )
    predictor.run(src, dst, progress=options.progress, lines=options.progress_lines)
