"""``core.predict``'s memory and speed: peak RSS against raster size, with GDAL's block
cache capped (``--gdal-cache``, the default) and left at GDAL's own default (5 % of RAM);
then windows per second of the whole predictor against the model's own forward on the
same windows.

Peak RSS is measured in a fresh process per raster (``VmHWM``), after the model is built
and after the raster is predicted. The size sweep runs a stand-in model, bicubic
upsampling with the model's input and output shapes, so that large rasters fit in
minutes: what grows with the raster (windowed reads, band buffers, GDAL's cache of input
and output blocks) is the same, and the model's own memory depends on the window and the
batch, not on the raster. Throughput uses the trained model's architecture (``--preset``)
on one raster::

    python benchmarks/predict_memory.py [--sizes 500,1000,2000] [--preset small] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from affine import Affine
from benchlib import (
    add_common_arguments,
    finish,
    interleave,
    paired,
    peak_rss_mib,
    ratio_line,
    spread,
    start,
)
from torch import nn

from core.config import Config
from core.context import RunContext
from core.data.geotiff import gdal_cache, write_dem
from core.data.windows import window_starts
from core.inference import TrainedRun
from core.plugins import PluginManager
from core.predict import DEFAULT_GDAL_CACHE_MB
from core.tasks import get_task
from core.tasks.dem_sr.predict import Predictor, normalise
from core.tasks.dem_sr.rcan import build_rcan

SCALE = 3
WINDOW, OVERLAP = 64, 8
UTM_TRANSFORM = Affine(30.0, 0.0, 500_000.0, 0.0, -30.0, 4_400_000.0)


class Bicubic(nn.Module):
    """Stand-in for the network: the model's shapes at almost no compute."""

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(lr, scale_factor=SCALE, mode="bicubic")


def terrain(size: int) -> np.ndarray:
    y, x = np.mgrid[:size, :size].astype(np.float32)
    return 1500 + 300 * np.sin(x / 90) * np.cos(y / 130) + 50 * np.sin(x / 31 + y / 23)


def predictor(model: nn.Module) -> Predictor:
    """A predictor as ``core.predict`` builds it from a run, around ``model``."""
    config = Config()
    config.data.scale = SCALE  # the model's; the predictor reads it from the run's config
    accelerator = Accelerator(cpu=True)
    ctx = RunContext(config, accelerator, get_task("dem_sr"), PluginManager([]), Path("."), 1)
    ctx.model = model.eval()
    return Predictor(TrainedRun(config, ctx.model, ctx, {}), WINDOW, OVERLAP, "moderate")


def rss_child(size: int, cache_mb: int, scratch: Path) -> None:
    """In a fresh process: peak RSS before and after predicting a ``size``-square raster,
    with GDAL's cache at ``cache_mb`` (0: GDAL's default), as JSON."""
    src = write_dem(scratch / f"in{size}.tif", terrain(size), UTM_TRANSFORM, "EPSG:32613")
    run = predictor(Bicubic())
    run.predict_windows([np.zeros((WINDOW, WINDOW), np.float32)])  # first-call allocations
    before = peak_rss_mib()
    started = time.perf_counter()
    if cache_mb:
        with gdal_cache(cache_mb):
            run.run(src, scratch / f"out{size}.tif", progress=False)
    else:
        run.run(src, scratch / f"out{size}.tif", progress=False)
    seconds = time.perf_counter() - started
    print(json.dumps({"before": before, "after": peak_rss_mib(), "seconds": seconds}))


def measure_rss(size: int, cache_mb: int, threads: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="terraplug-bench-") as scratch:
        command = [sys.executable, __file__, "--rss-child", f"{size},{cache_mb},{scratch}"]
        command += ["--threads", str(threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def throughput(preset: str, size: int, repeats: int) -> list[float]:
    """Paired (predictor windows/s) / (model forward windows/s) on the same windows."""
    torch.manual_seed(0)
    model = build_rcan(preset, SCALE).eval()
    run = predictor(model)
    starts = window_starts(size, WINDOW, WINDOW - 2 * OVERLAP)
    windows = len(starts) ** 2
    with tempfile.TemporaryDirectory(prefix="terraplug-bench-") as scratch:
        src = write_dem(Path(scratch) / "in.tif", terrain(size), UTM_TRANSFORM, "EPSG:32613")
        data = terrain(size)
        inputs = []  # the predictor's batches: up to 16 windows of one row of windows
        for r in starts:
            row = [normalise(data[r : r + WINDOW, c : c + WINDOW])[0] for c in starts]
            batches = range(0, len(row), 16)
            inputs += [torch.from_numpy(np.stack(row[i : i + 16]))[:, None] for i in batches]

        def whole() -> float:
            started = time.perf_counter()
            with gdal_cache(DEFAULT_GDAL_CACHE_MB):
                run.run(src, Path(scratch) / "out.tif", progress=False)
            return windows / (time.perf_counter() - started)

        @torch.no_grad()
        def forward() -> float:
            started = time.perf_counter()
            for lr in inputs:
                model(lr)
            return windows / (time.perf_counter() - started)

        rates = interleave({"predictor": whole, "forward": forward}, repeats)
    print(f"# {preset} model, {size} x {size} raster, {windows} windows of {WINDOW} px "
          f"(overlap {OVERLAP}), batches of up to 16 from one row")  # fmt: skip
    print(f"#   predictor: {spread(rates['predictor'], ' windows/s', digits=1)}")
    print(f"#   forward alone: {spread(rates['forward'], ' windows/s', digits=1)}")
    return paired(rates["predictor"], rates["forward"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--sizes", default="500,1000,2000", help="input raster sides, pixels")
    parser.add_argument("--preset", default="small", help="model preset for throughput")
    parser.add_argument("--throughput-size", type=int, default=256, help="raster side")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_child:
        size, cache, scratch = args.rss_child.split(",")
        rss_child(int(size), int(cache), Path(scratch))
        return
    if args.quick:
        args.sizes, args.throughput_size = "120", 96
        args.repeats = args.repeats or 1
    sizes = [int(size) for size in args.sizes.split(",")]
    started = start("core.predict: peak RSS against raster size, windows/s", args.threads)
    rises: dict[int, list[float]] = {DEFAULT_GDAL_CACHE_MB: [], 0: []}
    for cache in rises:
        label = f"GDAL cache {cache} MB" if cache else "GDAL's default cache (5 % of RAM)"
        for size in sizes:
            rss = measure_rss(size, cache, args.threads)
            rises[cache].append(rss["after"] - rss["before"])
            print(
                f"# {label}: {size} x {size} in, {size * SCALE} x {size * SCALE} out: "
                f"peak RSS {rss['before']:.0f} -> {rss['after']:.0f} MiB "
                f"(+{rss['after'] - rss['before']:.0f}), {rss['seconds']:.1f} s",
                flush=True,
            )
    largest = sizes[-1] * SCALE
    output_mib = largest**2 * 4 / 2**20
    print(f"# largest output: {output_mib:.0f} MiB of float32")
    capped = rises[DEFAULT_GDAL_CACHE_MB][-1]
    ratio_line(
        "predict_rss_rise_largest_vs_cache_capped",
        [capped / DEFAULT_GDAL_CACHE_MB],
        f"<= 1.5 (the rise stays near the {DEFAULT_GDAL_CACHE_MB} MB cache)",
        capped <= 1.5 * DEFAULT_GDAL_CACHE_MB,
    )
    ratio_line(
        "predict_rss_rise_largest_vs_output_gdal_default",
        [rises[0][-1] / output_mib],
        "none (GDAL's default cache, for comparison)",
        None,
    )
    ratios = throughput(args.preset, args.throughput_size, args.repeats or 3)
    ratio_line(
        f"predict_vs_forward_windows_per_s_{args.preset}",
        ratios,
        ">= 0.8 (streaming, blending and I/O cost at most a fifth)",
        statistics.median(ratios) >= 0.8,
    )
    finish(started)


if __name__ == "__main__":
    main()
