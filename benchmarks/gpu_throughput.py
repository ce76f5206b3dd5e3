"""On a GPU: training throughput at both presets in fp32 and bf16, then the other
benchmarks' comparisons on the same device.

Throughput is tiles per second of training steps (forward, the five losses, backward,
AdamW) on one batch shape, with the peak memory the caching allocator saw; bf16 runs the
forward under ``torch.autocast`` and is reported as a ratio to fp32 at the same preset.
Then it runs ``overhead.py``, ``balanced_grad.py`` and ``data_loading.py`` with
``--device cuda``: on a GPU the trainer's per-step host syncs (``.item()``, the finite
check) and the single-process loader can cost what they do not cost on a CPU::

    python benchmarks/gpu_throughput.py              # on a machine with CUDA
    python benchmarks/gpu_throughput.py --quick --device cpu   # exercise it without one
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

import balanced_grad
import data_loading
import overhead
import torch
from benchlib import (
    add_common_arguments,
    finish,
    interleave,
    paired,
    ratio_line,
    spread,
    start,
    synchronize,
)

from core.config import Config
from core.tasks.dem_sr.losses import dem_loss_components
from core.tasks.dem_sr.rcan import build_rcan
from core.tasks.dem_sr.task import base_loss_weights

TILE = 48
SCALE = 3


def training_steps(
    preset: str, precision: str, batch_size: int, steps: int, device: torch.device, model: list[str]
) -> tuple[Callable[[], float], Callable[[], int]]:
    """A timed run of ``steps`` training steps, and the peak bytes seen by the allocator."""
    overrides = {key: int(value) for key, value in (item.split("=") for item in model)}
    net = build_rcan(preset, SCALE, **overrides).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    weights = base_loss_weights(Config()).to(device)
    generator = torch.Generator().manual_seed(0)
    hr = torch.randn(batch_size, 1, TILE, TILE, generator=generator).to(device)
    lr = hr.reshape(batch_size, 1, TILE // SCALE, SCALE, TILE // SCALE, SCALE).mean((3, 5))
    mask = torch.ones_like(hr, dtype=torch.bool)

    def step() -> None:
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if precision == "bf16"
            else contextlib.nullcontext()
        )
        with autocast:
            pred = net(lr)
        (dem_loss_components(pred.float(), hr, mask) @ weights).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def run() -> float:
        synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        return (time.perf_counter() - started) / (steps * batch_size)

    def peak() -> int:
        if device.type != "cuda":
            return 0
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated()

    return run, peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if present")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="training steps per timing")
    parser.add_argument("--presets", default="small,default", help="comma-separated presets")
    parser.add_argument(
        "--no-others", action="store_true", help="skip the other benchmarks on this device"
    )
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if args.device is None:
        print("no CUDA device here: nothing measured (--device cpu runs it on the CPU)")
        return
    model = []
    if args.quick:
        args.steps, args.presets, args.repeats = 1, "small", args.repeats or 1
        model = ["n_resgroups=1", "n_resblocks=1", "n_feats=8"]
    repeats = args.repeats or 3
    device = torch.device(args.device)
    started = start(f"training throughput on {device}, fp32 vs bf16", args.threads)
    presets = args.presets.split(",")
    runs, peaks = {}, {}
    for preset in presets:
        for precision in ("fp32", "bf16"):
            run, peak = training_steps(
                preset, precision, args.batch_size, args.steps, device, model
            )
            runs[preset, precision], peaks[preset, precision] = run, peak
    times = interleave({f"{p} {q}": run for (p, q), run in runs.items()}, repeats)
    print(
        f"# batch {args.batch_size} of {TILE} x {TILE} HR tiles (scale {SCALE}), {args.steps} "
        f"steps per timing, {repeats} interleaved repeats {' '.join(model)}"
    )
    for (preset, precision), peak in peaks.items():
        rates = [1 / seconds for seconds in times[f"{preset} {precision}"]]
        memory = f", peak {peak() / 2**20:.0f} MiB" if device.type == "cuda" else ""
        print(f"#   {preset:<8} {precision}  {spread(rates, ' tiles/s', digits=1)}{memory}")
    print("# ratios: time per tile, bf16 / fp32 (below 1: bf16 is faster)")
    for preset in presets:
        ratio = paired(times[f"{preset} bf16"], times[f"{preset} fp32"])
        ratio_line(f"bf16_vs_fp32_{preset}", ratio, "none", None)
    finish(started)
    if args.no_others:
        return
    common = ["--device", args.device, "--threads", str(args.threads)]
    common += ["--quick"] if args.quick else []
    overhead.main(common)
    balanced_grad.main([*common, "--preset", "small" if args.quick else "default"])
    data_loading.main(common)


if __name__ == "__main__":
    main()
