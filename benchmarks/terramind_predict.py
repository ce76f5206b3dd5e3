"""sar2opt's ``core.predict``: the pattern at the window stride, windows per second, and
peak memory against scene size.

The scene is a mosaic of the six real BigEarthNet S1 patches (120 x 120 at 10 m, two rows
of three), with a nodata strip on the right and a NaN hole in the middle, on TerraMind tiny
with random weights (``model.pretrained=false``, the only weights here).

1. **Window agreement.** Independent noise per window, as predict drew it before, makes
   every window a different sample, and the blend averages two samples where windows
   overlap: the sampling variance (per pixel, across seeds) dips at the overlaps, and the
   step between neighbouring pixels jumps where a window ends. Both are measured with the
   noise drawn per window and on the scene's grid (:class:`SceneNoise`, what predict does):
   the max/min ratio of the mean variance per position within the stride, and the mean
   absolute step across window borders against the step elsewhere.
2. **Throughput.** Windows per second of the whole predictor (reading, noise, generation,
   blending, writing) against TerraMind's own batched generation of the same windows
   (``generate``, TerraTorch's sampler), interleaved.
3. **Memory.** Peak RSS (``VmHWM``) of a fresh process per scene height (the width fixed:
   the row buffers follow it), before and after
   predicting, with a stand-in for TerraMind that returns the mean image at once: what grows
   with the scene (reads, the noise, the row buffers, GDAL's cache, capped at 64 MB as
   ``core.predict`` caps it) is the same, and the model's own memory depends on the window
   and the batch, not on the scene. The smallest scene already fills GDAL's cache; between
   runs the rise varies by about 20 MB.

``--write-mosaic PATH`` only writes the mosaic, for timing ``python -m core.predict`` on it
(docs/terramind.md)::

    python benchmarks/terramind_predict.py [--seeds 4] [--steps 1] [--heights 2048,4096,8192]
    python benchmarks/terramind_predict.py --write-mosaic mosaic.tif
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
import rasterio
import torch
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

from core.config import load_config
from core.data.geotiff import gdal_cache, open_geotiff
from core.data.windows import window_starts
from core.predict import DEFAULT_GDAL_CACHE_MB
from core.tasks.sar2opt.bigearthnet import ensure_bigearthnet_pairs
from core.tasks.sar2opt.data import OPTICAL_BANDS, SAR_BANDS, SAR_DIR, write_bands
from core.tasks.sar2opt.predict import DEFAULT_BATCH_SIZE, SarToOpticalPredictor, SceneNoise
from core.tasks.sar2opt.task import SarToOptical
from core.tasks.sar2opt.terramind import TerraMindSarToOptical

WINDOW, OVERLAP = 64, 16
STRIDE = WINDOW - 2 * OVERLAP
PATCH = 16
"""TerraMind's token patch: windows start on its grid."""
VOCABULARY = 15_360
"""The S2 L2A tokenizer's codes (FSQ levels 8-8-8-6-5): the stand-in's Gumbel noise."""
STRIP, HOLE = 40, 80
"""The mosaic's nodata strip (columns, right) and NaN hole (a square in the middle)."""


def mosaic(path: Path, rows: int = 2, cols: int = 3) -> Path:
    """The BigEarthNet S1 patches, ``rows`` x ``cols`` of them side by side, a nodata
    strip of ``STRIP`` columns and a NaN hole of ``HOLE`` pixels in the middle, on the
    first patch's grid (240 x 400 for 2 x 3)."""
    files = sorted((ensure_bigearthnet_pairs(quiet=True).full / SAR_DIR).glob("*.tif"))
    patches = []
    for file in files[: rows * cols]:
        with open_geotiff(file) as src:
            patches.append(src.read())
    with open_geotiff(files[0]) as first:
        transform, crs = first.transform, first.crs
    grid = [np.concatenate(patches[r * cols : (r + 1) * cols], axis=2) for r in range(rows)]
    sar = np.concatenate(grid, axis=1)
    sar = np.concatenate([sar, np.full((2, sar.shape[1], STRIP), np.nan, np.float32)], axis=2)
    top, left = (sar.shape[1] - HOLE) // 2, (sar.shape[2] - HOLE) // 2
    sar[:, top : top + HOLE, left : left + HOLE] = np.nan
    write_bands(path, sar, transform, SAR_BANDS, {"source": "BigEarthNet S1 mosaic"}, crs=crs)
    return path


def starts(length: int) -> list[int]:
    """The predictor's window origins along a side of ``length`` pixels."""
    return window_starts(-(-length // PATCH) * PATCH, WINDOW, STRIDE)


def terramind() -> TerraMindSarToOptical:
    """TerraMind tiny with random weights and the default LoRA, as a sar2opt run builds it."""
    torch.manual_seed(0)
    return SarToOptical().build_model(load_config(None, ["run.task='sar2opt'"])).eval()


class WindowNoise(SceneNoise):
    """Noise drawn for each window on its own, as predict drew it before: two windows that
    overlap share nothing."""

    def window(self, row: int, col: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        seed = int(np.random.SeedSequence((self.seed, row, col)).generate_state(1)[0])
        own = SceneNoise(seed, self.patch, self.channels, self.vocabulary)
        return own.window(0, 0, size)


def predicted(predictor: SarToOpticalPredictor, scene: Path, out: Path) -> np.ndarray:
    predictor.run(scene, out, progress=False)
    with rasterio.open(out) as src:
        return src.read().astype(np.float64)


def border_steps(width: int) -> np.ndarray:
    """``[width - 1]``: True for the steps between pixels ``c`` and ``c + 1`` where a window
    begins or ends."""
    edges = [s for s in starts(width) if s > 0] + [s + WINDOW for s in starts(width)]
    border = np.zeros(width - 1, bool)
    border[[edge - 1 for edge in edges if edge < width]] = True
    return border


def overlap_differences(model: TerraMindSarToOptical, scene: Path, steps: int) -> dict:
    """Mean |difference| (standardised units) between two windows ``STRIDE`` apart over
    their overlap, at every such pair of the scene without nodata, for three ways to draw:
    independent noise per window, the scene's noise (predict), and a deterministic decode
    (the most likely tokens, zero starting noise)."""
    with open_geotiff(scene) as src:
        sar = src.read().astype(np.float32)
    predictor = SarToOpticalPredictor(model, steps, 0, WINDOW, OVERLAP)
    own = WindowNoise(0, PATCH, predictor.noise.channels, VOCABULARY)
    height, width = sar.shape[1:]
    pairs = [
        (row, col)
        for row in range(0, height - WINDOW + 1, STRIDE)
        for col in range(0, width - WINDOW - STRIDE + 1, STRIDE)
        if np.isfinite(sar[:, row : row + WINDOW, col : col + WINDOW + STRIDE]).all()
    ]
    found: dict[str, list[float]] = {"window": [], "scene": [], "deterministic": []}
    for row, col in pairs:
        origins = [(row, col), (row, col + STRIDE)]
        windows = [sar[:, r : r + WINDOW, c : c + WINDOW] for r, c in origins]
        image, _, gumbel, noise = predictor.model_inputs(windows, origins)
        drawn = [own.window(r, c, WINDOW) for r, c in origins]
        mine = [torch.stack(parts) for parts in zip(*drawn, strict=True)]
        logits = model(image, output="logits")
        outputs = {
            "window": model.generate_noise(image, steps, *mine),
            "scene": model.generate_noise(image, steps, gumbel, noise),
            "deterministic": model.decode_noise(logits.argmax(-1), torch.zeros_like(noise), steps),
        }
        for name, out in outputs.items():
            found[name].append(float((out[0, :, :, STRIDE:] - out[1, :, :, :-STRIDE]).abs().mean()))
    means = {name: statistics.mean(values) for name, values in found.items()}
    shown = ", ".join(f"{name} {value:.3f}" for name, value in means.items())
    print(f"# two windows {STRIDE} px apart, {len(pairs)} pairs, mean |difference| over the "
          f"overlap in standard deviations, noise per {shown}", flush=True)  # fmt: skip
    return means


def agreement(model: TerraMindSarToOptical, scene: Path, seeds: int, steps: int, batch: int):
    """Per noise scheme: max/min of the mean per-pixel variance across seeds by position
    within the stride, and the mean step across window borders / the step elsewhere."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="terraplug-bench-") as scratch:
        for scheme, noise in (("window", WindowNoise), ("scene", SceneNoise)):
            outputs = []
            for seed in range(seeds):
                predictor = SarToOpticalPredictor(model, steps, seed, WINDOW, OVERLAP, batch)
                predictor.noise = noise(seed, PATCH, predictor.noise.channels, VOCABULARY)
                outputs.append(predicted(predictor, scene, Path(scratch) / "out.tif"))
            stack = np.stack(outputs)  # [seeds, bands, rows, cols] in DN
            valid = (stack > 0).all((0, 1))
            variance = stack.var(0).mean(0)
            phase = np.indices(variance.shape)[1] % STRIDE
            by_phase = [variance[(phase == p) & valid].mean() for p in range(STRIDE)]
            step = np.abs(np.diff(stack, axis=3)).mean((0, 1))  # [rows, cols - 1]
            both = valid[:, 1:] & valid[:, :-1]
            border = border_steps(variance.shape[1])[None] & both
            at, away = step[border].mean(), step[~border & both].mean()
            low, high = min(by_phase), max(by_phase)
            results[scheme] = {"variance": high / low, "edges": at / away}
            print(
                f"# noise per {scheme}: variance across {seeds} seeds by position within the "
                f"{STRIDE}-px stride {low:.0f}-{high:.0f} DN^2 (x{high / low:.2f}); step "
                f"across window borders {at:.1f} DN, elsewhere {away:.1f} DN "
                f"({at / away - 1:+.1%})",
                flush=True,
            )
    return results


class Recording(SarToOpticalPredictor):
    """The predictor, keeping what it hands TerraMind for each batch."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.batches: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []

    def model_inputs(
        self, windows: list[np.ndarray], origins: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
        self.batches.append(super().model_inputs(windows, origins))
        return self.batches[-1]


def throughput(model: TerraMindSarToOptical, scene: Path, steps: int, batch: int, repeats: int):
    """Paired (predictor windows/s) / (the bare model's windows/s): ``generate_noise`` on
    the batches the predictor hands it, noise drawn beforehand."""
    recording = Recording(model, steps, 0, WINDOW, OVERLAP, batch)
    predictor = SarToOpticalPredictor(model, steps, 0, WINDOW, OVERLAP, batch)
    with tempfile.TemporaryDirectory(prefix="terraplug-bench-") as scratch:
        out = Path(scratch) / "out.tif"
        recording.run(scene, out, progress=False)
        batches = recording.batches
        windows = sum(len(inputs[0]) for inputs in batches)

        def whole() -> float:
            started = time.perf_counter()
            with gdal_cache(DEFAULT_GDAL_CACHE_MB):
                predictor.run(scene, out, progress=False)
            return windows / (time.perf_counter() - started)

        def forward() -> float:
            started = time.perf_counter()
            for inputs in batches:
                model.generate_noise(*inputs)
            return windows / (time.perf_counter() - started)

        rates = interleave({"predictor": whole, "forward": forward}, repeats)
    print(f"# {windows} windows of {WINDOW} px (overlap {OVERLAP}) generated, "
          f"{recording.skipped} all-nodata skipped, batches of {batch}, {steps} diffusion "
          "step(s)")  # fmt: skip
    print(f"#   predictor: {spread(rates['predictor'], ' windows/s', digits=2)}")
    print(f"#   bare generate_noise: {spread(rates['forward'], ' windows/s', digits=2)}")
    return paired(rates["predictor"], rates["forward"])


class StandIn(nn.Module):
    """TerraMind's shapes for the predictor at no compute: the mean image at once."""

    tokenizer = argparse.Namespace(patch_size=PATCH, n_channels=len(OPTICAL_BANDS))
    codebook = torch.empty(VOCABULARY, 0)

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # where the predictor looks for the device

    def generate_noise(
        self, sar: torch.Tensor, steps: int, gumbel: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        return torch.zeros(len(sar), len(OPTICAL_BANDS), *sar.shape[-2:])

    def generation_settings(self) -> dict:
        return {}


def rss_child(scene: Path) -> None:
    """In a fresh process: peak RSS before and after predicting ``scene``, as JSON."""
    predictor = SarToOpticalPredictor(StandIn(), 1, 0, WINDOW, OVERLAP, DEFAULT_BATCH_SIZE)
    predictor.generate([np.zeros((2, WINDOW, WINDOW), np.float32)], [(0, 0)])
    before = peak_rss_mib()
    started = time.perf_counter()
    with gdal_cache(DEFAULT_GDAL_CACHE_MB):
        predictor.run(scene, scene.with_name("out.tif"), progress=False)
    seconds = time.perf_counter() - started
    print(json.dumps({"before": before, "after": peak_rss_mib(), "seconds": seconds}))


def measure_rss(height: int, width: int, threads: int) -> dict[str, float]:
    """Peak RSS of a fresh process predicting a ``height`` x ``width`` scene: the mosaic,
    tiled, written here so that the child holds none of it."""
    with tempfile.TemporaryDirectory(prefix="terraplug-bench-") as scratch:
        with open_geotiff(mosaic(Path(scratch) / "mosaic.tif")) as src:
            data, transform, crs = src.read(), src.transform, src.crs
        reps = (1, -(-height // data.shape[1]), -(-width // data.shape[2]))
        scene = Path(scratch) / "scene.tif"
        tiled = np.tile(data, reps)[:, :height, :width]
        write_bands(scene, tiled, transform, SAR_BANDS, {}, crs=crs)
        command = [sys.executable, __file__, "--rss-child", str(scene),
                   "--threads", str(threads)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--seeds", type=int, default=4, help="seeds per noise scheme")
    parser.add_argument("--steps", type=int, default=1, help="diffusion steps")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--width", type=int, default=1024, help="scene width, RSS sweep")
    parser.add_argument("--heights", default="2048,4096,8192", help="scene heights, RSS sweep")
    parser.add_argument("--write-mosaic", type=Path, metavar="PATH", help="write it and stop")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.write_mosaic:
        mosaic(args.write_mosaic)
        return
    if args.rss_child:
        rss_child(args.rss_child)
        return
    if args.quick:
        args.seeds, args.width, args.heights = 2, 256, "256,1024"
        args.repeats = args.repeats or 1
    started = start("sar2opt predict: window agreement, windows/s, peak RSS", args.threads)
    model = terramind()
    with tempfile.TemporaryDirectory(prefix="terraplug-bench-") as scratch:
        scene = mosaic(Path(scratch) / "mosaic.tif", *((1, 2) if args.quick else (2, 3)))
        differences = overlap_differences(model, scene, args.steps)
        for name in ("scene", "deterministic"):
            share = differences[name] / differences["window"]
            met = share <= 0.5 if name == "scene" else None
            target = "<= 0.5 (the scene's noise makes windows agree)" if met is not None else "none"
            ratio_line(f"overlap_difference_{name}_vs_window_noise", [share], target, met)
        found = agreement(model, scene, args.seeds, args.steps, args.batch_size)
        for what in ("variance", "edges"):
            window, scene_grid = found["window"][what], found["scene"][what]
            pattern = "none (the pattern of independent windows)"
            ratio_line(f"{what}_window_noise", [window], pattern, None)
            excess = (scene_grid - 1) / (window - 1)
            ratio_line(f"{what}_scene_noise", [scene_grid], "none (see the next line)", None)
            ratio_line(f"{what}_excess_scene_vs_window_noise", [excess],
                       "<= 0.5 (the pattern at least halved)", excess <= 0.5)  # fmt: skip
        ratios = throughput(model, scene, args.steps, args.batch_size, args.repeats or 3)
    ratio_line(
        "predict_vs_generate_windows_per_s",
        ratios,
        ">= 0.8 (reading, noise, blending and writing cost at most a fifth)",
        statistics.median(ratios) >= 0.8,
    )
    heights = [int(height) for height in args.heights.split(",")]
    rises = []
    for height in heights:
        rss = measure_rss(height, args.width, args.threads)
        rises.append(rss["after"] - rss["before"])
        shape = f"{height} x {args.width}"
        print(f"# {shape} scene: peak RSS {rss['before']:.0f} -> {rss['after']:.0f} MiB "
              f"(+{rises[-1]:.0f}), {rss['seconds']:.1f} s", flush=True)  # fmt: skip
    ratio_line(
        f"predict_rss_rise_{heights[-1]}_vs_{heights[0]}_rows",
        [rises[-1] / rises[0]],
        "<= 1.25 (the same width, more rows: memory does not follow the area)",
        rises[-1] / rises[0] <= 1.25,
    )
    finish(started)


if __name__ == "__main__":
    main()
