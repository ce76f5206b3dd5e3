"""Power-law (1/f^beta) noise fields: the texture of synthetic terrain and imagery."""

from __future__ import annotations

import numpy as np


def power_law_noise(rng: np.random.Generator, size: int, beta: float) -> np.ndarray:
    """Zero-mean, unit-std noise with power spectrum ~ f^-beta (larger beta: smoother)."""
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.rfftfreq(size), indexing="ij"))
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) * f ** (-beta / 2)
    spectrum[0, 0] = 0.0
    z = np.fft.irfft2(spectrum, s=(size, size))
    return z / z.std()
