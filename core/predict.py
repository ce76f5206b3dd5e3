"""``python -m core.predict --checkpoint RUN_DIR IN.tif OUT.tif``: apply a trained run.

The run's task does the work (``Task.predict``): a dem_sr run super-resolves a DEM, a
sar2opt run translates Sentinel-1 to Sentinel-2. The output is checked before any work
(never the input, never an existing file without ``--overwrite``) and written under a
temporary name that replaces it only once it reads back whole; a full disk stops with status
1 and SIGINT and SIGTERM with status 130, leaving no partial file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.data.geotiff import gdal_cache
from core.errors import EXIT_INTERRUPTED, EXIT_OK, StorageError, UsageError, report_error
from core.inference import run_task
from core.safe_io import SignalInterrupt, check_output, signals_interrupt
from core.tasks import PredictOptions, get_task

DEFAULT_GDAL_CACHE_MB = 64
"""GDAL's block cache for reading and writing: a few rows of 256 x 256 tiles of the widest
rasters, instead of GDAL's default of 5 % of RAM."""
MAX_WINDOW = 2048
"""The largest ``--window``, in input pixels: 32 times the largest default training tile
(sar2opt's 64). A window goes through the model and is blended in one piece, with weights of
(window x scale)^2 float64, so a larger one only exhausts memory (100000 at dem_sr's scale 3:
671 GiB of weights alone)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m core.predict",
        description="Apply a trained run's model to a GeoTIFF: a dem_sr run super-resolves "
        "a single-band DEM, a sar2opt run translates a 2-band Sentinel-1 GeoTIFF to 12-band "
        "Sentinel-2.",
    )
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="RUN_DIR")
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument(
        "--window",
        type=int,
        help=f"input window size in pixels, 1 to {MAX_WINDOW} (default: the training tiles')",
    )
    parser.add_argument(
        "--overlap", type=int, help="input pixels of overlap on each side (default: window / 4)"
    )
    parser.add_argument(
        "--terrain",
        help="dem_sr: the terrain category (flat, moderate, alpine, desert, extreme) of "
        "terrain-aware models (default: guessed from the input)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="windows per forward pass (default: dem_sr 16, sar2opt 8, which fits a 6 GB GPU)",
    )
    parser.add_argument(
        "--diffusion-steps",
        type=int,
        help="sar2opt: diffusion steps (default: the run's model.final_diffusion_steps, else "
        "model.diffusion_steps)",
    )
    parser.add_argument("--top-p", type=float, help="sar2opt: token sampling's top-p")
    parser.add_argument(
        "--temperature",
        type=float,
        help="sar2opt: token sampling's temperature (0: greedy, the most likely token)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress (by default a bar on a terminal, else a line every 30 s on stdout)",
    )
    parser.add_argument(
        "--strict-data",
        action="store_true",
        help="stop at values no terrain has (unmarked voids) instead of treating them as voids",
    )
    parser.add_argument("--cpu", action="store_true", help="run on the CPU")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT.tif if it exists (never the input)"
    )
    parser.add_argument(
        "--gdal-cache",
        type=int,
        default=DEFAULT_GDAL_CACHE_MB,
        metavar="MB",
        help=f"GDAL's raster block cache (default {DEFAULT_GDAL_CACHE_MB} MB)",
    )
    return parser


def check_window(window: int | None) -> None:
    """Refuse a ``--window`` no task can use, before the run loads: 0 is not the default."""
    if window is None:
        return
    if window < 1:
        raise UsageError(
            f"--window {window}: must be at least 1 (omit --window for the training tiles' size)"
        )
    if window > MAX_WINDOW:
        raise UsageError(
            f"--window {window}: at most {MAX_WINDOW} input pixels (a window goes through the "
            "model in one piece)"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = PredictOptions(
        window=args.window,
        overlap=args.overlap,
        domain=args.terrain,
        strict_data=args.strict_data,
        cpu=args.cpu,
        progress=not args.quiet and sys.stderr.isatty(),
        progress_lines=not args.quiet and not sys.stderr.isatty(),
        batch_size=args.batch_size,
        diffusion_steps=args.diffusion_steps,
        top_p=args.top_p,
        temperature=args.temperature,
    )
    try:
        with signals_interrupt():
            check_output(args.output, args.input, args.overwrite)
            if args.gdal_cache < 1:
                raise UsageError(f"--gdal-cache {args.gdal_cache} must be at least 1 (MB)")
            check_window(args.window)
            if args.batch_size is not None and args.batch_size < 1:
                raise UsageError(f"--batch-size {args.batch_size} must be at least 1")
            task = get_task(run_task(args.checkpoint))
            with gdal_cache(args.gdal_cache):
                task.predict(args.checkpoint, args.input, args.output, options)
    except (UsageError, StorageError) as error:
        return report_error(error)
    except SignalInterrupt as stop:
        print(f"{stop}: stopped; {args.output} was not written", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
