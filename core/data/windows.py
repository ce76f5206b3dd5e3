"""Cutting a raster into overlapping windows and blending them back without seams: the
streaming scheme both tasks' ``core.predict`` tools use."""

from __future__ import annotations

import numpy as np


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
