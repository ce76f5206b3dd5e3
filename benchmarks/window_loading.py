"""Windows over rasters of any size: peak RSS of ``python -m core.run --data BIG.tif`` against
the raster's size, the window index's build time, and windows per second from the trainer's
loader against what the ``small`` model consumes.

1. Memory. For each side in ``--sides``, a procedural raster (smooth random relief on a 30 m
   UTM grid, float32, tiled and uncompressed, so it takes 4 bytes a cell on disk; written a
   strip of blocks at a time, so writing never holds it whole either), then ``core.run`` on
   it in a fresh process with a fresh ``TERRAPLUG_CACHE``, so the index is built in the
   measured process: one epoch of ``--steps`` optimizer steps of the ``small`` preset, then
   validation on every validation window, as a user's run has it. Peak RSS is that
   process's ``VmHWM``. A second run reads the cached index; the index's build time is the
   difference of the two runs' time outside the epoch (the trainer times the epoch,
   validation included, and that is left out of the difference).
2. Throughput. On the largest raster, windows per second delivered by the trainer's
   ``DataLoader`` (its shuffled plan, one windowed read per window, at each ``--workers``)
   against windows per second of training steps of the ``small`` model (forward, the five
   losses, backward, AdamW) on batches of the same windows, interleaved in one process.

The defaults (13 and 105 MB rasters) take about a minute on 2 cores. The sweep of
record in docs/benchmarks.md, 13 MB to 2.15 GB, keeps its rasters in ``--scratch`` (each is
written once, under a temporary name until complete, and reused by a later run; remove the
folder afterwards)::

    nice -n 10 python benchmarks/window_loading.py --sides 1600,5000,16000,23200 \\
        --scratch /tmp/terraplug-windows
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import data_loading
import numpy as np
import torch
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
from rasterio.windows import Window
from torch.utils.data import DataLoader

from core.data.geotiff import geotiff_profile, write_geotiff
from core.tasks.dem_sr.data.dataset import TileDataset
from core.train import default_plan, loader_generator
from terraplug.testing import read_metrics

SCALE = 3
WINDOW = 48
CELL_M = 30.0
CRS = "EPSG:32613"
STRIP = 256
"""Rows written at a time: one row of the GeoTIFF's 256-pixel blocks."""
TENTH = (0.08, 0.125)
"""Pairs of rasters whose cell counts differ about tenfold: a raster against one a tenth its
size."""
FLAT_FROM_MB = 90.0
"""Memory is flat from about 100 MB on: below it, GDAL's block cache (capped at 64 MB) is
still filling."""


def relief_waves(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Plane waves (row and column wavenumbers, phase, amplitude) of the relief and of its
    envelope: hills and ridges of 0.6 to 20 km, under a 40-120 km envelope that leaves plains
    between mountain ranges, so windows of every steepness occur."""
    rng = np.random.default_rng(seed)

    def waves(count: int, shortest: float, longest: float) -> np.ndarray:
        wavelength = np.exp(rng.uniform(np.log(shortest), np.log(longest), count))
        angle = rng.uniform(0, np.pi, count)
        k = 2 * np.pi / wavelength
        amplitude = 0.12 * wavelength / (2 * np.pi)  # each wave's steepest slope about 7°
        return np.stack(
            [k * np.sin(angle), k * np.cos(angle), rng.uniform(0, 2 * np.pi, count), amplitude]
        )

    return waves(16, 600.0, 20_000.0), waves(3, 40_000.0, 120_000.0)


def wave_sum(waves: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``sum_k a_k sin(ky_k y + kx_k x + p_k)`` on the grid ``y`` x ``x`` as one matrix
    product: each wave splits into sin(ky y + p) cos(kx x) + cos(ky y + p) sin(kx x)."""
    ky, kx, phase, amplitude = waves
    rows = np.concatenate(
        [np.sin(np.outer(y, ky) + phase) * amplitude, np.cos(np.outer(y, ky) + phase) * amplitude],
        axis=1,
    )
    cols = np.concatenate([np.cos(np.outer(kx, x)), np.sin(np.outer(kx, x))], axis=0)
    return rows @ cols


def write_relief(path: Path, side: int, seed: int = 0) -> Path:
    """A ``side``-square raster of smooth random relief, written a strip at a time; an
    existing complete file is reused (``write_geotiff`` renames only a file that reads
    back whole)."""
    if path.is_file():
        return path
    relief, envelope = relief_waves(seed)
    transform = Affine.translation(500_000.0, 4_400_000.0) @ Affine.scale(CELL_M, -CELL_M)
    profile = geotiff_profile(side, side, 1, "float32", CRS, transform)
    del profile["compress"], profile["predictor"]  # 4 bytes a cell: size on disk = raster size
    x = np.arange(side) * CELL_M
    with write_geotiff(path, profile) as dst:
        for row in range(0, side, STRIP):
            y = np.arange(row, min(row + STRIP, side)) * CELL_M
            steepness = np.clip(0.45 + wave_sum(envelope, y, x) / 2_000, 0.02, 1.0) ** 2
            z = 1500 + steepness * wave_sum(relief, y, x)
            dst.write(z.astype(np.float32), 1, window=Window(0, row, side, len(y)))
    return path


def run_child(spec: str) -> None:
    """In a fresh process: ``core.run`` on one raster, then this process's peak RSS, the
    run's time and its epoch's time, as JSON."""
    from core.run import main as core_run

    raster, out, steps, val_block = json.loads(spec)
    settings = ['model.preset="small"', f"train.max_steps_per_epoch={steps}"]
    settings += ['train.progress="never"', f"data.val_block={val_block}"]
    started = time.perf_counter()
    code = core_run(
        ["--data", raster, "--out", out, "--epochs", "1"]
        + [word for setting in settings for word in ("--set", setting)]
    )
    seconds = time.perf_counter() - started
    if code:
        sys.exit(code)
    row = read_metrics(Path(out))[-1]
    print(
        json.dumps(
            {
                "peak": peak_rss_mib(),
                "seconds": seconds,
                "epoch": row["seconds"],
                "steps": row["steps"],
            }
        )
    )


def measure_run(
    raster: Path, cache: Path, steps: int, val_block: int, threads: int
) -> dict[str, float]:
    """One ``core.run`` in a fresh process with ``cache`` as its ``TERRAPLUG_CACHE``."""
    env = {**os.environ, "TERRAPLUG_CACHE": str(cache), "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory(prefix="terraplug-bench-") as out:
        spec = json.dumps([str(raster), str(Path(out) / "run"), steps, val_block])
        command = [sys.executable, __file__, "--run-child", spec, "--threads", str(threads)]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"core.run on {raster} failed:\n{done.stdout[-2000:]}{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def loader_rate(
    dataset: TileDataset, batch_size: int, batches: int, workers: int, first: list[float]
) -> Callable[[], float]:
    """Seconds per window for ``batches`` batches of a new epoch's shuffled plan through the
    trainer's kind of ``DataLoader``, from the first batch on: an epoch over a large raster
    runs thousands of batches, so the workers' start (appended to ``first``, with the
    first batch) is paid once an epoch, not per batch."""
    epoch = iter(range(1, 1_000_000))

    def run() -> float:
        e = next(epoch)
        plan = default_plan(np.arange(len(dataset)), batch_size, 0, e)[: batches + 1]
        loader = iter(
            DataLoader(
                dataset,
                batch_sampler=[batch.tolist() for batch in plan],
                num_workers=workers,
                generator=loader_generator(0, e),
            )
        )
        started = time.perf_counter()
        next(loader)
        steady = time.perf_counter()
        first.append(steady - started)
        for _ in loader:
            pass
        return (time.perf_counter() - steady) / sum(len(batch) for batch in plan[1:])

    return run


def throughput(raster: Path, args: argparse.Namespace, repeats: int) -> None:
    """Loader windows/s at each worker count against the ``small`` model's, interleaved."""
    dataset = TileDataset.from_folder(raster, SCALE, tile_size=WINDOW)
    plan = default_plan(np.arange(len(dataset)), args.batch_size, 0, 0)[: args.train_steps]
    batches = list(DataLoader(dataset, batch_sampler=[batch.tolist() for batch in plan]))
    first: dict[int, list[float]] = {w: [] for w in args.workers}
    variants = {
        f"loader_workers{w}": loader_rate(
            dataset, args.batch_size, args.loader_batches, w, first[w]
        )
        for w in args.workers
    }
    variants["small"] = data_loading.model_rate("small", batches, torch.device("cpu"))
    times = interleave(variants, repeats)
    print(
        f"# throughput: {len(dataset)} windows of {WINDOW} x {WINDOW} in {raster.name}, "
        f"shuffled, batch {args.batch_size}; loader {args.loader_batches} batches a timing, "
        f"model {args.train_steps} training steps a timing, {repeats} interleaved repeats"
    )
    for name, seconds in times.items():
        print(f"#   {name:<16} {spread([1 / s for s in seconds], ' windows/s', digits=1)}")
    for w, seconds in first.items():
        print(f"#   workers {w}: start and first batch {spread(seconds, ' s', digits=2)}")
    for w in args.workers:
        ratios = paired(times["small"], times[f"loader_workers{w}"])
        ratio_line(
            f"loader_workers{w}_vs_small_model",
            ratios,
            ">= 3 (loading delivers three times what training consumes)",
            statistics.median(ratios) >= 3,
        )


def memory_sweep(sides: list[int], scratch: Path, args: argparse.Namespace) -> Path:
    """Peak RSS and times of a fresh and a cached run per raster; returns the cache of the
    largest raster's index."""
    peaks: dict[int, float] = {}
    on_disk: dict[int, float] = {}
    for side in sides:
        raster = write_relief(scratch / f"relief_{side}.tif", side)
        megabytes = raster.stat().st_size / 1e6
        cache = scratch / f"cache_{side}"
        shutil.rmtree(cache, ignore_errors=True)  # the first run builds the index itself
        fresh = measure_run(raster, cache, args.steps, args.val_block, args.threads)
        cached = measure_run(raster, cache, args.steps, args.val_block, args.threads)
        peaks[side] = fresh["peak"]
        on_disk[side] = megabytes
        build = (fresh["seconds"] - fresh["epoch"]) - (cached["seconds"] - cached["epoch"])
        windows = (side // WINDOW) ** 2
        print(
            f"# {side} x {side} cells, {megabytes:.1f} MB on disk, {windows} windows: peak RSS "
            f"{fresh['peak']:.0f} MiB (cached index: {cached['peak']:.0f} MiB); run "
            f"{fresh['seconds']:.1f} s, cached {cached['seconds']:.1f} s (epoch of "
            f"{fresh['steps']} steps and validation {fresh['epoch']:.1f} s, "
            f"{cached['epoch']:.1f} s); index built in about {build:.1f} s "
            f"({windows / max(build, 1e-9):.0f} windows/s)",
            flush=True,
        )
    largest = max(sides)
    base = min((s for s in sides if on_disk[s] >= FLAT_FROM_MB), default=min(sides))
    ratio_line(
        f"peak_rss_{largest}_vs_{base}",
        [peaks[largest] / peaks[base]],
        f"<= 1.2 (flat in the raster's size from {on_disk[base]:.0f} MB)",
        peaks[largest] <= 1.2 * peaks[base],
    )
    for big in sides:
        for small in sides:
            if TENTH[0] <= (small / big) ** 2 <= TENTH[1] and (big, small) != (largest, base):
                ratio_line(
                    f"peak_rss_{big}_vs_{small}",
                    [peaks[big] / peaks[small]],
                    "<= 1.2 (within 20 % of a raster a tenth its size)",
                    peaks[big] <= 1.2 * peaks[small],
                )
    return scratch / f"cache_{largest}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--sides", default="1600,5000", help="raster sides in cells, ascending")
    parser.add_argument("--steps", type=int, default=4, help="train.max_steps_per_epoch")
    parser.add_argument("--val-block", type=int, default=8, help="data.val_block (windows)")
    parser.add_argument("--scratch", type=Path, help="keep the rasters here (default: removed)")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--loader-batches", type=int, default=40, help="batches a loader timing")
    parser.add_argument("--train-steps", type=int, default=4, help="steps a model timing")
    parser.add_argument("--workers", default="0,2", help="DataLoader num_workers to time")
    parser.add_argument("--run-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.run_child:
        run_child(args.run_child)
        return
    if args.quick:
        args.sides, args.steps, args.val_block = "240,768", 1, 2
        args.loader_batches, args.train_steps = 4, 1
        args.repeats = args.repeats or 1
    sides = sorted(int(side) for side in args.sides.split(","))
    args.workers = [int(w) for w in args.workers.split(",")]
    started = start("windows over large rasters: peak RSS against size, windows/s", args.threads)
    with tempfile.TemporaryDirectory(prefix="terraplug-bench-") as temporary:
        scratch = args.scratch or Path(temporary)
        scratch.mkdir(parents=True, exist_ok=True)
        cache = memory_sweep(sides, scratch, args)
        os.environ["TERRAPLUG_CACHE"] = str(cache)  # the largest raster's index, built above
        throughput(scratch / f"relief_{max(sides)}.tif", args, args.repeats or 3)
    finish(started)


if __name__ == "__main__":
    main()
