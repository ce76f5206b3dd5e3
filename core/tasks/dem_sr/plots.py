"""dem_sr's plots: validation error per terrain and hillshade triptychs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from core.plots import domain_order, save
from core.tasks.dem_sr.terrain import TERRAINS

HillshadeExample = tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]
"""(LR input, prediction, truth) in metres and the HR cell size (dy, dx) in metres."""


def _terrain_order(names: Sequence[str]) -> list[str]:
    """The five terrains in canonical order, then any others in first-seen order."""
    return domain_order(names, TERRAINS)


def plot_terrain_rmse(row: Mapping[str, Any], path: str | PathLike[str]) -> None:
    """Bars per terrain: elevation RMSE (and MAE, if present) in metres; slope RMSE in degrees."""
    panels = (
        ("elevation error (m)", ("val_rmse_m_by_terrain", "val_mae_m_by_terrain")),
        ("slope RMSE (°)", ("val_slope_rmse_deg_by_terrain",)),
    )
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (title, keys) in zip(axes, panels, strict=True):
        present = [k for k in keys if row.get(k)]
        names = _terrain_order([name for key in present for name in row[key]])
        width = 0.8 / max(1, len(present))
        x = np.arange(len(names))
        for j, key in enumerate(present):
            values = [float(row[key].get(name, math.nan)) for name in names]
            label = key.removeprefix("val_").removesuffix("_by_terrain")
            bars = ax.bar(x + (j - (len(present) - 1) / 2) * width, values, width, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(x, names)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        if present:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    if "epoch" in row:
        fig.suptitle(f"validation by terrain, epoch {row['epoch']}")
    save(fig, path)


def hillshade(dem_m: np.ndarray, cell_size: tuple[float, float]) -> np.ndarray:
    """Lambertian hillshade in [0, 1], sun at azimuth 315°, altitude 45°, true (dy, dx) spacing.

    Unlike ``LightSource.hillshade`` there is no per-image contrast stretch, so the panels of a
    triptych are shaded on one scale. Rows run south, so north is minus the row direction.
    """
    dy, dx = cell_size
    dz_drow, dz_dx = np.gradient(np.asarray(dem_m, dtype=np.float64), dy, dx)
    dz_dnorth = -dz_drow
    azimuth, altitude = np.deg2rad(315.0), np.deg2rad(45.0)
    sun = np.array(
        [np.cos(altitude) * np.sin(azimuth), np.cos(altitude) * np.cos(azimuth), np.sin(altitude)]
    )
    shade = (-dz_dx * sun[0] - dz_dnorth * sun[1] + sun[2]) / np.sqrt(1 + dz_dx**2 + dz_dnorth**2)
    return np.clip(shade, 0.0, 1.0)


def plot_hillshade_triptych(
    examples: Mapping[str, HillshadeExample], path: str | PathLike[str]
) -> None:
    """One row per terrain: LR input, prediction and truth as hillshades, titled with RMSE.

    Arrays are 2-D elevations in metres. The LR hillshade uses the HR cell size times the
    scale (HR size / LR size), so all three show the same relief; the RMSE (prediction vs
    truth, metres) skips non-finite pixels, which stay blank.
    """
    names = _terrain_order(list(examples))
    fig = Figure(figsize=(9, 3 * max(1, len(names))), layout="constrained")
    if not names:
        fig.text(0.5, 0.5, "no examples", ha="center", va="center")
        save(fig, path)
        return
    axes = fig.subplots(len(names), 3, squeeze=False)
    for row_axes, name in zip(axes, names, strict=True):
        lr, pred, hr, (dy, dx) = examples[name]
        scale_y, scale_x = hr.shape[0] / lr.shape[0], hr.shape[1] / lr.shape[1]
        err = np.asarray(pred, dtype=np.float64) - np.asarray(hr, dtype=np.float64)
        err = err[np.isfinite(err)]
        rmse = math.sqrt(float(np.mean(err**2))) if err.size else math.nan
        panels = (
            ("input LR", hillshade(lr, (dy * scale_y, dx * scale_x))),
            (f"prediction, RMSE {rmse:.2f} m", hillshade(pred, (dy, dx))),
            ("truth", hillshade(hr, (dy, dx))),
        )
        # One grey stretch per row, from the truth: subdued relief stays visible, and the
        # three panels stay comparable.
        truth = panels[2][1][np.isfinite(panels[2][1])]
        low, high = np.percentile(truth, [1, 99]) if truth.size else (0.0, 1.0)
        low, high = min(low, high - 0.05), max(high, low + 0.05)
        for ax, (label, shade) in zip(row_axes, panels, strict=True):
            ax.imshow(shade, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            ax.set_title(f"{name}: {label}", fontsize=9)
            ax.set_axis_off()
    save(fig, path)
