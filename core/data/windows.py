"""Cutting a raster into overlapping windows and blending them back without seams: the
streaming scheme both tasks' ``core.predict`` tools use."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

LINE_SECONDS = 30.0
"""How often :func:`window_progress` prints a line when no bar is shown."""


def taper(size: int, overlap: int) -> np.ndarray:
    """1-D blending weight: a linear ramp over ``overlap`` pixels at each end, 1 inside.

    Never zero, so every output pixel has weight, even at the raster's edge where only one
    window covers it; low at a window's border, where a CNN's padding makes it least sure.
    """
    weight = np.ones(size, dtype=np.float64)
    if overlap:
        ramp = (np.arange(overlap, dtype=np.float64) + 0.5) / overlap
        weight[:overlap] = np.minimum(weight[:overlap], ramp)
        weight[-overlap:] = np.minimum(weight[-overlap:], ramp[::-1])
    return weight


def window_starts(length: int, size: int, stride: int) -> list[int]:
    """Window origins covering ``[0, length)``; the last one is pulled back to fit."""
    if length <= size:
        return [0]
    return [*range(0, length - size, stride), length - size]


@contextlib.contextmanager
def window_progress(
    total: int, name: str, bar: bool, lines: bool, unit: str = "window"
) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n)``, which counts ``n`` more of ``total`` windows (or whatever
    ``unit`` names) of ``name``: on a tqdm bar (``bar``: stderr is a terminal), else in a line on
    stdout at most every ``LINE_SECONDS`` and once at the end (``lines``: a log file or a
    pipe, where a bar would only show at the end), else nowhere."""
    started = last = time.monotonic()
    done = shown = 0

    def line() -> None:
        nonlocal shown
        shown = done
        seconds = time.monotonic() - started
        rate = f"{done / seconds:.2f}" if seconds > 0 else "-"
        print(f"{name}: {done}/{total} {unit}s, {seconds:.0f} s, {rate} {unit}s/s", flush=True)

    with tqdm(total=total, desc=name, unit=unit, disable=not bar) as counter:

        def advance(count: int) -> None:
            nonlocal done, last
            done += count
            counter.update(count)
            if lines and not bar and time.monotonic() - last >= LINE_SECONDS:
                last = time.monotonic()
                line()

        yield advance
    if lines and not bar and shown != done:
        line()
