"""``python -m core.predict --checkpoint RUN_DIR IN.tif OUT.tif``: super-resolve a DEM.

The raster is processed in overlapping windows of the size the model was trained on, each
normalised like a training tile, and blended with a tapered weight so window borders leave
no seams. Rows of windows stream through a band buffer: reads and writes are windowed, so
memory depends on the raster's width, not its size. Voids stay voids: an output pixel is
nodata where its source pixel is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import rasterio
import torch
from accelerate import Accelerator
from rasterio.windows import Window
from torch import nn
from tqdm.auto import tqdm

from core.config import load_config
from core.context import RunContext
from core.errors import DataError, UsageError
from core.plugins import PluginManager
from core.tasks import get_task
from core.terrain import TERRAINS, terrain_index
from core.train import CHECKPOINT

STD_FLOOR_M = 1.0


def load_trained_model(run_dir: Path, cpu: bool = False) -> tuple[nn.Module, RunContext, dict]:
    """The run's model with its plugins' surgery applied, in eval mode, and a context for
    the plugins' ``route_batch`` hooks."""
    config_path, checkpoint_path = run_dir / "config.toml", run_dir / CHECKPOINT
    if not config_path.is_file() or not checkpoint_path.is_file():
        raise UsageError(f"--checkpoint {run_dir}: no config.toml and {CHECKPOINT} there")
    config = load_config(config_path)
    plugins = PluginManager.from_names(config.run.plugins, config.plugins)
    accelerator = Accelerator(cpu=cpu or config.train.cpu)
    task = get_task(config.run.task)
    ctx = RunContext(config, accelerator, task, plugins, run_dir, config.run.epochs)
    model = plugins.chain("configure_model", task.build_model(config), "model", ctx=ctx)
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    ctx.model = model.to(accelerator.device).eval()
    return ctx.model, ctx, {"scale": config.data.scale, "lr_shape": state["lr_shape"]}


def taper(size: int, overlap: int) -> np.ndarray:
    """1-D blending weight: a linear ramp over ``overlap`` pixels at each end, 1 inside."""
    weight = np.ones(size, dtype=np.float32)
    if overlap:
        ramp = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        weight[:overlap] = np.minimum(weight[:overlap], ramp)
        weight[-overlap:] = np.minimum(weight[-overlap:], ramp[::-1])
    return weight


def window_starts(length: int, size: int, stride: int) -> list[int]:
    """Window origins covering ``[0, length)``; the last one is pulled back to fit."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size, stride))
    return [*starts, length - size]


def normalise(window: np.ndarray) -> tuple[np.ndarray, float, float]:
    """As in training: fill voids with the mean, scale by the std (floored at 1 m)."""
    valid = np.isfinite(window)
    mean = float(window[valid].mean()) if valid.any() else 0.0
    std = max(float(window[valid].std()) if valid.any() else 0.0, STD_FLOOR_M)
    filled = np.where(valid, window, mean)
    return ((filled - mean) / std).astype(np.float32), mean, std


def read_elevation(src: rasterio.DatasetReader, window: Window) -> np.ndarray:
    """Band 1 in metres as float32, NaN where the raster has nodata or non-finite values."""
    data = src.read(1, window=window, masked=True, boundless=False)
    values = data.filled(np.nan).astype(np.float32)
    values[~np.isfinite(values)] = np.nan
    return values


class Predictor:
    """Streams a raster through a trained model, one row of windows at a time."""

    def __init__(
        self,
        model: nn.Module,
        ctx: RunContext,
        scale: int,
        window: int,
        overlap: int,
        terrain: str,
        batch_size: int = 16,
    ) -> None:
        if not 0 <= overlap < window // 2 + 1:
            raise UsageError(f"--overlap {overlap} must be between 0 and half of --window {window}")
        self.model, self.ctx, self.scale = model, ctx, scale
        self.window, self.overlap, self.batch_size = window, overlap, batch_size
        self.terrain = terrain_index(terrain)
        weight = taper(window * scale, overlap * scale)
        self.weight = np.outer(weight, weight)

    @torch.no_grad()
    def predict_windows(self, windows: list[np.ndarray]) -> list[np.ndarray]:
        """Super-resolve equally sized LR windows (metres, NaN voids) in batches."""
        outputs = []
        for start in range(0, len(windows), self.batch_size):
            chunk = [normalise(w) for w in windows[start : start + self.batch_size]]
            device = self.ctx.device
            lr = torch.from_numpy(np.stack([c[0] for c in chunk]))[:, None].to(device)
            batch = {"lr": lr, "terrain": torch.full((len(chunk),), self.terrain, device=device)}
            self.ctx.plugins.call("route_batch", model=self.model, batch=batch, ctx=self.ctx)
            pred = self.model(lr)[:, 0].float().cpu().numpy()
            outputs += [p * std + mean for p, (_, mean, std) in zip(pred, chunk, strict=True)]
        return outputs

    def run(self, src_path: Path, dst_path: Path, progress: bool = True) -> None:
        try:
            src = rasterio.open(src_path)
        except rasterio.RasterioIOError as error:
            raise DataError(f"{src_path}: not a readable raster ({error})") from None
        with src:
            if src.count != 1:
                raise DataError(f"{src_path}: expected 1 band (a DEM), found {src.count}")
            self._stream(src, dst_path, progress)

    def _stream(self, src: rasterio.DatasetReader, dst_path: Path, progress: bool) -> None:
        s, size, stride = self.scale, self.window, self.window - 2 * self.overlap
        height, width = src.height, src.width
        nodata = src.nodata if src.nodata is not None and np.isfinite(src.nodata) else np.nan
        profile = {
            "driver": "GTiff", "height": height * s, "width": width * s, "count": 1,
            "dtype": "float32", "crs": src.crs, "nodata": nodata,
            "transform": src.transform * src.transform.scale(1 / s),
            "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate",
        }  # fmt: skip
        rows = window_starts(height, size, stride)
        cols = window_starts(width, size, stride)
        band_rows = min(size, height) * s
        total = np.zeros((band_rows + stride * s, width * s), dtype=np.float64)
        weights = np.zeros_like(total)
        band_top = 0  # output row of total[0]
        with rasterio.open(dst_path, "w", **profile) as dst:
            for row in tqdm(rows, desc="windows", unit="row", disable=not progress):
                lr_rows = min(size, height)
                windows = [
                    self._padded(read_elevation(src, Window(c, row, min(size, width), lr_rows)))
                    for c in cols
                ]
                top = row * s - band_top
                for col, pred in zip(cols, self.predict_windows(windows), strict=True):
                    pred = pred[: lr_rows * s, : min(size, width) * s]
                    weight = self.weight[: pred.shape[0], : pred.shape[1]]
                    total[top : top + pred.shape[0], col * s : col * s + pred.shape[1]] += (
                        pred * weight
                    )
                    weights[top : top + pred.shape[0], col * s : col * s + pred.shape[1]] += weight
                next_top = rows[rows.index(row) + 1] * s if row != rows[-1] else height * s
                done = next_top - band_top
                self._write(src, dst, total[:done], weights[:done], band_top, nodata)
                total = np.roll(total, -done, axis=0)
                weights = np.roll(weights, -done, axis=0)
                total[-done:] = 0
                weights[-done:] = 0
                band_top = next_top

    def _padded(self, window: np.ndarray) -> np.ndarray:
        """Reflect-pad a window smaller than the model's input (rasters smaller than it)."""
        pad_y, pad_x = self.window - window.shape[0], self.window - window.shape[1]
        if pad_y <= 0 and pad_x <= 0:
            return window
        return np.pad(window, ((0, max(pad_y, 0)), (0, max(pad_x, 0))), mode="symmetric")

    def _write(
        self,
        src: rasterio.DatasetReader,
        dst: rasterio.io.DatasetWriter,
        total: np.ndarray,
        weights: np.ndarray,
        top: int,
        nodata: float,
    ) -> None:
        """Write finished output rows, nodata wherever the source pixel is void."""
        s = self.scale
        rows = total.shape[0]
        source = read_elevation(src, Window(0, top // s, src.width, rows // s))
        void = np.repeat(np.repeat(~np.isfinite(source), s, axis=0), s, axis=1)
        out = (total / np.maximum(weights, 1e-12)).astype(np.float32)
        out[void] = nodata
        dst.write(out, 1, window=Window(0, top, out.shape[1], rows))


def guess_terrain(path: Path, max_pixels: int = 512) -> str:
    """The raster's category from its name, else from a decimated read of its relief."""
    from core.data.geotiff import cell_size_m
    from core.data.labels import label_tile

    with rasterio.open(path) as src:
        factor = max(1, -(-max(src.height, src.width) // max_pixels))
        shape = (max(1, src.height // factor), max(1, src.width // factor))
        data = src.read(1, out_shape=shape, masked=True).filled(np.nan).astype(np.float32)
        dy, dx = cell_size_m(src.transform, src.crs, (src.height, src.width))
    return label_tile(path.stem, data, (dy * factor, dx * factor))[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core.predict", description="Super-resolve a DEM GeoTIFF."
    )
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="RUN_DIR")
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--window", type=int, help="LR window size (default: training tiles)")
    parser.add_argument("--overlap", type=int, help="LR pixels of overlap on each side")
    parser.add_argument(
        "--terrain", choices=TERRAINS, help="terrain category for terrain-aware models"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU")
    args = parser.parse_args(argv)
    try:
        if not args.input.is_file():
            raise DataError(f"{args.input}: no such file")
        model, ctx, meta = load_trained_model(args.checkpoint, cpu=args.cpu)
        window = args.window or max(meta["lr_shape"])
        overlap = args.overlap if args.overlap is not None else window // 4
        routed = any(plugin.hooks.count("route_batch") for plugin in ctx.plugins.active)
        terrain = args.terrain or (guess_terrain(args.input) if routed else "moderate")
        predictor = Predictor(model, ctx, meta["scale"], window, overlap, terrain)
        predictor.run(args.input, args.output, progress=not args.quiet and sys.stderr.isatty())
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
