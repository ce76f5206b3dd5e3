"""The task's figure, drawn with matplotlib's object API and the Agg canvas: no pyplot, so
no global state and no GUI backend on a headless training machine."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_denoised(examples: Sequence[tuple[np.ndarray, ...]], path: Path) -> None:
    """One row per example: noisy input, denoised and clean elevations (metres), sharing one
    colour stretch per row; the titles give each panel's RMSE against the clean tile."""
    fig = Figure(figsize=(9, 3 * max(1, len(examples))), layout="constrained")
    FigureCanvasAgg(fig)
    if not examples:
        fig.text(0.5, 0.5, "no validation tiles", ha="center", va="center")
    else:
        axes = fig.subplots(len(examples), 3, squeeze=False)
        for row_axes, (noisy, denoised, clean) in zip(axes, examples, strict=True):
            low, high = np.percentile(clean, [1, 99])
            for ax, label, tile in zip(
                row_axes, ("noisy", "denoised", "clean"), (noisy, denoised, clean), strict=True
            ):
                rmse = math.sqrt(float(np.mean((tile - clean) ** 2)))
                image = ax.imshow(tile, cmap="terrain", vmin=low, vmax=max(high, low + 1e-3))
                ax.set_title(f"{label}, RMSE {rmse:.2f} m" if tile is not clean else label,
                             fontsize=9)  # fmt: skip
                ax.set_axis_off()
            fig.colorbar(image, ax=row_axes.tolist(), label="elevation (m)", shrink=0.8)
    fig.savefig(path, dpi=100)
