"""What every benchmark here shares: pinned threads, a machine header, interleaved timing
and one ``ratio`` line per result.

The machine the numbers come from is shared and noisy, so a benchmark never compares
timings taken in different runs: both sides of a ratio run in the same process, interleaved
(the order flips every repeat, so drift hits both), and the ratio is reported as the median
of the per-repeat paired ratios with their range.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--threads``, ``--repeats`` and ``--quick``, the same in every script."""
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a loaded 2-core box two OpenMP threads "
        "stall each other and steps vary tenfold)",
    )
    parser.add_argument("--repeats", type=int, help="interleaved repeats of each side")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny setting that runs in seconds (smoke test)"
    )


def start(title: str, threads: int) -> float:
    """Pin the threads and print what the numbers depend on; returns the start time."""
    torch.set_num_threads(threads)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"# {title}")
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"# {datetime.date.today().isoformat()}, {platform.node()}: {os.cpu_count()} cores, "
        f"{device}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}, load average {load_average()}",
        flush=True,
    )
    return time.perf_counter()


def finish(started: float) -> None:
    print(f"# done in {time.perf_counter() - started:.1f} s, load average {load_average()}")


def load_average() -> str:
    """The 1/5/15-minute load averages: other users' work on the machine during the run."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def interleave(
    variants: dict[str, Callable[[], float]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Run every variant ``repeats`` times, rotating which goes first each repeat.

    A variant returns what it measured itself (usually seconds, leaving set-up out). Warm-up
    runs of each variant come first and are dropped: first calls pay for lazy imports,
    allocator growth and oneDNN kernel selection.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(variants[name]())
    return times


def paired(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-repeat ratios: each pair ran back to back, so shared slow spells cancel."""
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def bootstrap_medians(
    values: Sequence[float], rng: np.random.Generator, resamples: int = 10_000
) -> np.ndarray:
    """Medians of ``resamples`` resamples of ``values`` (with replacement): how the median
    itself would vary if the repeats were drawn again, which the min-max range overstates."""
    samples = rng.choice(np.asarray(values), size=(resamples, len(values)))
    return np.median(samples, axis=1)


def interval(draws: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The central ``confidence`` share of bootstrap draws (percentile interval)."""
    low, high = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def spread(values: Sequence[float], unit: str = "", scale: float = 1.0, digits: int = 3) -> str:
    """``median (min-max, n)``: the median resists one slow repeat, the range shows the noise."""
    scaled = [value * scale for value in values]
    if len(scaled) == 1:
        return f"{scaled[0]:.{digits}f}{unit} (n=1)"
    return (
        f"{statistics.median(scaled):.{digits}f}{unit} "
        f"({min(scaled):.{digits}f}-{max(scaled):.{digits}f}, n={len(scaled)})"
    )


def number(value: float) -> str:
    """Three decimals, or three significant digits for ratios too small for that."""
    return f"{value:.3f}" if abs(value) >= 0.01 else f"{value:.2e}"


def ratio_line(
    name: str,
    ratios: Sequence[float],
    target: str,
    met: bool | None,
    bounds: tuple[float, float] | None = None,
) -> None:
    """The one line a reader (and the smoke test) looks for: ``ratio NAME = MEDIAN ...``,
    with the 95 % interval of the median where the script computes one."""
    verdict = "no target" if met is None else ("met" if met else "NOT met")
    where = f"; 95 % interval {number(bounds[0])}-{number(bounds[1])}" if bounds else ""
    print(
        f"ratio {name} = {number(statistics.median(ratios))} "
        f"[{number(min(ratios))}-{number(max(ratios))}, n={len(ratios)}]{where}; "
        f"target {target}: {verdict}",
        flush=True,
    )


def peak_rss_mib() -> float:
    """This process's peak RSS, MiB: ``VmHWM`` where Linux has it, since ``ru_maxrss`` of a
    child that ``subprocess`` starts begins at its parent's RSS."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def tiles_folder(data: Path | None, per_terrain: int, scratch: Path) -> Path:
    """``data``, or procedural GeoTIFF tiles (48 x 48, five terrains) written under ``scratch``.

    Procedural tiles are the same on every machine and need no download; they are the tiles
    the tests train on, at the size the default GLOBE dataset is cut to.
    """
    if data is not None:
        return data
    from core.tasks.dem_sr.data.procedural import write_procedural_tiles

    return write_procedural_tiles(scratch / "tiles", per_terrain=per_terrain)


def peak_tensor_bytes(run: Callable[[], None], device: torch.device) -> int:
    """Peak bytes of tensors allocated during ``run`` above those live when it started.

    On the CPU the profiler logs every allocation and free of PyTorch's allocator with its
    size, and their running sum in time order is the live tensor memory at each moment; on
    CUDA the caching allocator counts the same directly.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        live = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - live
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [
        event
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak
