"""sar2opt's ``core.predict``: whether overlapping windows agree, the pattern at the window
stride, windows per second, and peak memory against scene size.

The scene is a mosaic of the six real BigEarthNet S1 patches (120 x 120 at 10 m, two rows
of three), with a nodata strip on the right and a NaN hole in the middle, on TerraMind tiny
with random weights (``model.pretrained=false``, the only weights here).

1. **Window agreement.** Predict fuses the windows on the scene's canvas at every step
   (MultiDiffusion): measured over every pair of side-by-side windows without nodata, the
   largest difference between the states the two read where they overlap, at every
   diffusion step (0 when they are fused), and the mean difference between their own last
   steps before they are fused (how far the fusion reconciles them). The first step reads
   the scene's starting noise, so a single step fuses nothing before the final blend: the
   default is the run's 2 steps.
2. **The stride pattern.** Where windows are independent samples, the blend averages two
   samples at the overlaps: the sampling variance (per pixel, across seeds) dips there,
   and the step between neighbouring pixels jumps where a window ends. Measured on the
   output: the max/min ratio of the mean variance per position within the stride, and the
   mean absolute step across window borders against the step elsewhere.
3. **Throughput.** Windows per second of the whole predictor (reading, the noise, the
   fused passes through the canvases on disk, writing) against TerraMind's own batched
   generation of the same windows in the same batches (``generate_noise``), interleaved.
4. **Memory.** Peak RSS (``VmHWM``) of a fresh process per scene height (the width fixed:
   the row buffers follow it), before and after predicting, with a stand-in for TerraMind
   that returns at once: what grows with the scene (reads, the noise, the row buffers,
   GDAL's cache, capped at 64 MB as ``core.predict`` caps it) is the same, and the model's
   own memory depends on the window and the batch, not on the scene. The smallest scene
   already fills GDAL's cache; between runs the rise varies by about 20 MB.

``--write-mosaic PATH`` only writes the mosaic, for timing ``python -m core.predict`` on it
(docs/terramind.md)::

    python benchmarks/terramind_predict.py [--seeds 4] [--steps 2] [--heights 2048,4096,8192]
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
import tracemalloc
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
from core.tasks.sar2opt.predict import DEFAULT_BATCH_SIZE, SarToOpticalPredictor
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


class Watching(SarToOpticalPredictor):
    """The predictor, keeping each window's state and own step at every diffusion step,
    and the windows of each batch per step."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.seen: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.batches: dict[int, list[list[tuple[int, int]]]] = {}

    def step_windows(
        self, images: torch.Tensor, t: torch.Tensor, quant: torch.Tensor, row: int,
        cols: list[int],
    ) -> np.ndarray:  # fmt: skip
        stepped = super().step_windows(images, t, quant, row, cols)
        for col, image, out in zip(cols, images.cpu().numpy(), stepped, strict=True):
            self.seen[int(t), row, col] = image, out
        self.batches.setdefault(int(t), []).append([(row, col) for col in cols])
        return stepped


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
    """Over every pair of side-by-side windows without nodata: the largest |difference|
    between the states the two read where they overlap, at any step, and the mean
    |difference| between their own last steps there before fusing (standardised units)."""
    with open_geotiff(scene) as src:
        valid = np.isfinite(src.read()).all(0)
    watching = Watching(model, steps, 0, WINDOW, OVERLAP)
    with tempfile.TemporaryDirectory(prefix="terraplug-bench-") as scratch:
        watching.run(scene, Path(scratch) / "out.tif", progress=False)
    times = sorted({t for t, _, _ in watching.seen}, reverse=True)
    pairs = [
        (row, col)
        for t, row, col in watching.seen
        if t == times[0]
        and (t, row, col + STRIDE) in watching.seen
        and valid[row : row + WINDOW, col : col + WINDOW + STRIDE].all()
    ]
    read = max(
        float(np.abs(watching.seen[t, row, col][0][:, :, STRIDE:]
                     - watching.seen[t, row, col + STRIDE][0][:, :, :-STRIDE]).max())
        for t in times
        for row, col in pairs
    )  # fmt: skip
    own = statistics.mean(
        float(np.abs(watching.seen[times[-1], row, col][1][:, :, STRIDE:]
                     - watching.seen[times[-1], row, col + STRIDE][1][:, :, :-STRIDE]).mean())
        for row, col in pairs
    )  # fmt: skip
    print(f"# two windows {STRIDE} px apart, {len(pairs)} pairs, over their overlap: the states "
          f"they read differ by at most {read:.3g} at every step; their own last steps differ "
          f"by {own:.3f} on average (standard deviations) before they are fused",
          flush=True)  # fmt: skip
    return {"read": read, "own": own}


def agreement(model: TerraMindSarToOptical, scene: Path, seeds: int, steps: int, batch: int):
    """Max/min of the mean per-pixel variance across seeds by position within the stride,
    and the mean step across window borders / the step elsewhere."""
    with tempfile.TemporaryDirectory(prefix="terraplug-bench-") as scratch:
        outputs = [
            predicted(SarToOpticalPredictor(model, steps, seed, WINDOW, OVERLAP, batch), scene,
                      Path(scratch) / "out.tif")
            for seed in range(seeds)
        ]  # fmt: skip
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
    print(
        f"# variance across {seeds} seeds by position within the {STRIDE}-px stride "
        f"{low:.0f}-{high:.0f} DN^2 (x{high / low:.2f}); step across window borders {at:.1f} "
        f"DN, elsewhere {away:.1f} DN ({at / away - 1:+.1%})",
        flush=True,
    )
    return {"variance": high / low, "edges": at / away}


def throughput(model: TerraMindSarToOptical, scene: Path, steps: int, batch: int, repeats: int):
    """Paired (predictor windows/s) / (the bare model's windows/s): ``generate_noise`` on
    the predictor's windows in its batches, standardised and with noise drawn beforehand."""
    watching = Watching(model, steps, 0, WINDOW, OVERLAP, batch)
    predictor = SarToOpticalPredictor(model, steps, 0, WINDOW, OVERLAP, batch)
    with open_geotiff(scene) as src:
        sar = src.read(masked=True).filled(np.nan)
    with tempfile.TemporaryDirectory(prefix="terraplug-bench-") as scratch:
        out = Path(scratch) / "out.tif"
        watching.run(scene, out, progress=False)
        batches = next(iter(watching.batches.values()))  # those of the first step
        inputs = []
        for windows in batches:
            cut = [predictor.padded(sar[:, r : r + WINDOW, c : c + WINDOW]) for r, c in windows]
            image = predictor.standardised(cut)
            tokens = (len(windows), (WINDOW // PATCH) ** 2, VOCABULARY)
            gumbel = -torch.empty(tokens).exponential_().log()
            noise = torch.randn(len(windows), len(OPTICAL_BANDS), WINDOW, WINDOW)
            inputs.append((image, steps, gumbel, noise))
        windows = sum(map(len, batches))

        def whole() -> float:
            started = time.perf_counter()
            with gdal_cache(DEFAULT_GDAL_CACHE_MB):
                predictor.run(scene, out, progress=False)
            return windows / (time.perf_counter() - started)

        def forward() -> float:
            started = time.perf_counter()
            for batch_inputs in inputs:
                model.generate_noise(*batch_inputs)
            return windows / (time.perf_counter() - started)

        rates = interleave({"predictor": whole, "forward": forward}, repeats)
    print(f"# {windows} windows of {WINDOW} px (overlap {OVERLAP}) generated, "
          f"{watching.skipped} all-nodata skipped, batches of {batch}, {steps} diffusion "
          "step(s)")  # fmt: skip
    print(f"#   predictor: {spread(rates['predictor'], ' windows/s', digits=2)}")
    print(f"#   bare generate_noise: {spread(rates['forward'], ' windows/s', digits=2)}")
    return paired(rates["predictor"], rates["forward"])


class StandIn(nn.Module):
    """TerraMind's shapes for the predictor at no compute: zero logits, token 0, and a
    diffusion step that changes nothing."""

    tokenizer = argparse.Namespace(patch_size=PATCH, n_channels=len(OPTICAL_BANDS))
    codebook = torch.empty(VOCABULARY, 0)

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # where the predictor looks for the device

    def forward(self, sar: torch.Tensor, output: str) -> torch.Tensor:
        return torch.zeros(len(sar), (sar.shape[-1] // PATCH) ** 2, VOCABULARY)

    def sample_tokens(self, logits: torch.Tensor, gumbel: torch.Tensor) -> torch.Tensor:
        return torch.zeros(logits.shape[:2], dtype=torch.long)

    def timesteps(self, steps: int) -> torch.Tensor:
        return torch.arange(steps)

    def condition(self, grid: torch.Tensor) -> torch.Tensor:
        return grid

    def denoise(self, image: torch.Tensor, t: torch.Tensor, quant: torch.Tensor) -> torch.Tensor:
        return image

    def generation_settings(self) -> dict:
        return {}


def rss_child(scene: Path) -> None:
    """In a fresh process: peak RSS before and after predicting ``scene``, and the peak of
    what Python and numpy allocated meanwhile (``tracemalloc``: the predictor's own
    buffers, without GDAL's cache and the allocator's slack), as JSON."""
    predictor = SarToOpticalPredictor(StandIn(), 1, 0, WINDOW, OVERLAP, DEFAULT_BATCH_SIZE)
    before = peak_rss_mib()
    started = time.perf_counter()
    tracemalloc.start()
    with gdal_cache(DEFAULT_GDAL_CACHE_MB):
        predictor.run(scene, scene.with_name("out.tif"), progress=False)
    traced = tracemalloc.get_traced_memory()[1] / 2**20
    seconds = time.perf_counter() - started
    print(json.dumps({"before": before, "after": peak_rss_mib(), "traced": traced,
                      "seconds": seconds}))  # fmt: skip


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
    parser.add_argument("--steps", type=int, default=2, help="diffusion steps (1: no fusing)")
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
        ratio_line("overlap_read_difference", [differences["read"]],
                   "0 (the windows read one fused canvas)", differences["read"] == 0)  # fmt: skip
        ratio_line("overlap_own_step_difference", [differences["own"]],
                   "none (what the fusion reconciles)", None)  # fmt: skip
        found = agreement(model, scene, args.seeds, args.steps, args.batch_size)
        ratio_line("variance_by_stride_position", [found["variance"]],
                   "<= 1.1 (no pattern at the stride)", found["variance"] <= 1.1)  # fmt: skip
        ratio_line("edges_vs_elsewhere", [found["edges"]],
                   "<= 1.03 (no step where a window ends)", found["edges"] <= 1.03)  # fmt: skip
        ratios = throughput(model, scene, args.steps, args.batch_size, args.repeats or 3)
    ratio_line(
        "predict_vs_generate_windows_per_s",
        ratios,
        ">= 0.8 (reading, noise, fusing and writing cost at most a fifth)",
        statistics.median(ratios) >= 0.8,
    )
    heights = [int(height) for height in args.heights.split(",")]
    rises, traced = [], []
    for height in heights:
        rss = measure_rss(height, args.width, args.threads)
        rises.append(rss["after"] - rss["before"])
        traced.append(rss["traced"])
        shape = f"{height} x {args.width}"
        print(f"# {shape} scene: peak RSS {rss['before']:.0f} -> {rss['after']:.0f} MiB "
              f"(+{rises[-1]:.0f}), Python and numpy's peak {traced[-1]:.1f} MiB, "
              f"{rss['seconds']:.1f} s", flush=True)  # fmt: skip
    ratio_line(
        f"predict_rss_rise_{heights[-1]}_vs_{heights[0]}_rows",
        [rises[-1] / rises[0]],
        "<= 1.25 (the same width, more rows: memory does not follow the area)",
        rises[-1] / rises[0] <= 1.25,
    )
    ratio_line(
        f"predict_traced_peak_{heights[-1]}_vs_{heights[0]}_rows",
        [traced[-1] / traced[0]],
        "<= 1.05 (the predictor's buffers follow the width only)",
        traced[-1] / traced[0] <= 1.05,
    )
    finish(started)


if __name__ == "__main__":
    main()
