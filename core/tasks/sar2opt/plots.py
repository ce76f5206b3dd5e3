"""sar2opt's plot: SAR input, generated and target optical, side by side."""

from __future__ import annotations

from os import PathLike

import numpy as np
from matplotlib.figure import Figure

from core.plots import save


def _true_colour(reflectance: np.ndarray) -> np.ndarray:
    """``[12, H, W]`` S2 L2A reflectance -> ``[H, W, 3]`` RGB (B04, B03, B02), 0.3 = white."""
    return np.clip(reflectance[[3, 2, 1]].transpose(1, 2, 0) / 0.3, 0, 1) ** (1 / 1.5)


def plot_sar_optical(
    sar: np.ndarray, generated: np.ndarray, target: np.ndarray, path: str | PathLike[str]
) -> None:
    """One row per tile: SAR VV (standardised), generated and target optical in true colour.

    ``generated`` and ``target`` are ``[B, 12, H, W]`` reflectances; each row is titled with
    the generated image's L1 error against the target.
    """
    fig = Figure(figsize=(9, 3 * max(1, len(sar))), layout="constrained")
    axes = fig.subplots(max(1, len(sar)), 3, squeeze=False)
    for row_axes, vv, gen, truth in zip(axes, sar[:, 0], generated, target, strict=False):
        l1 = float(np.mean(np.abs(gen - truth)))
        low, high = np.percentile(vv, [2, 98])
        row_axes[0].imshow(vv, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        row_axes[0].set_title("SAR VV", fontsize=9)
        row_axes[1].imshow(_true_colour(gen), interpolation="nearest")
        row_axes[1].set_title(f"generated, L1 {l1:.4f}", fontsize=9)
        row_axes[2].imshow(_true_colour(truth), interpolation="nearest")
        row_axes[2].set_title("target", fontsize=9)
        for ax in row_axes:
            ax.set_axis_off()
    save(fig, path)
