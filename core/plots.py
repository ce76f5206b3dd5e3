"""PNG plots for a run folder: loss curves, per-terrain errors, hillshade and SAR/optical
comparisons.

Built on ``matplotlib.figure.Figure`` with the Agg canvas, never ``pyplot``: no global figure
state, no GUI backend, safe to call from a training loop or a test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from core.losses import COMPONENTS
from core.metrics import spike_steps
from core.terrain import TERRAINS

DPI = 110

HillshadeExample = tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]
"""(LR input, prediction, truth) in metres and the HR cell size (dy, dx) in metres."""


def _save(fig: Figure, path: str | PathLike[str]) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) for the rows that have a finite ``key``."""
    points = [
        (float(row.get("epoch", i + 1)), float(row[key]))
        for i, row in enumerate(rows)
        if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])
    ]
    return [p[0] for p in points], [p[1] for p in points]


def _log_if_positive(ax: Any, values: Sequence[float]) -> None:
    """Log y when every value is positive: losses span decades and spikes stay readable."""
    if values and min(values) > 0:
        ax.set_yscale("log")


def plot_loss_curves(rows: Sequence[Mapping[str, Any]], path: str | PathLike[str]) -> None:
    """Per-epoch total and per-component losses; per-step losses with spikes, if present.

    ``rows`` are ``metrics.jsonl`` objects. Panels: train/val total loss; each
    ``train_loss_<component>`` (solid) and ``val_loss_<component>`` (dashed) that exists; and,
    when rows carry ``step_losses`` (that epoch's per-step losses), the concatenated step
    series with ``spike_steps`` marked.
    """
    steps = run_step_losses(rows)
    fig = Figure(figsize=(15 if steps else 10, 4.2), layout="constrained")
    axes = fig.subplots(1, 3 if steps else 2)

    ax = axes[0]
    plotted: list[float] = []
    for key, style in (("train_loss", "-o"), ("val_loss", "--s")):
        epochs, values = _series(rows, key)
        if values:
            ax.plot(epochs, values, style, ms=3, label=key)
            plotted += values
    _log_if_positive(ax, plotted)
    ax.set(title="total loss", xlabel="epoch", ylabel="loss")

    ax = axes[1]
    plotted = []
    for i, component in enumerate(COMPONENTS):
        for split, style in (("train", "-"), ("val", "--")):
            epochs, values = _series(rows, f"{split}_loss_{component}")
            if values:
                ax.plot(epochs, values, style, color=f"C{i}", label=f"{split} {component}")
                plotted += values
    _log_if_positive(ax, plotted)
    ax.set(title="loss components", xlabel="epoch")

    if steps:
        ax = axes[2]
        ax.plot(steps, lw=0.8, color="C0", label="step loss")
        spikes = spike_steps(steps)
        finite_spikes = [s for s in spikes if math.isfinite(steps[s])]
        ax.plot(
            finite_spikes,
            [steps[s] for s in finite_spikes],
            "v",
            color="C3",
            label=f"spikes ({len(spikes)})",
        )
        _log_if_positive(ax, [v for v in steps if math.isfinite(v)])
        ax.set(title="per-step loss", xlabel="step")

    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    _save(fig, path)


def _terrain_order(names: Sequence[str]) -> list[str]:
    """Known terrains in canonical order, then any others in first-seen order, each once."""
    others = [name for name in dict.fromkeys(names) if name not in TERRAINS]
    return [name for name in TERRAINS if name in names] + others


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
    _save(fig, path)


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
        _save(fig, path)
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
    _save(fig, path)


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
    _save(fig, path)


def _mean_band(curves: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position: mean and sample std over the curves that reach it (NaN-aware)."""
    length = max(len(curve) for curve in curves)
    table = np.full((len(curves), length), np.nan)
    for i, curve in enumerate(curves):
        table[i, : len(curve)] = curve
    counts = np.sum(np.isfinite(table), axis=0)
    mean = np.nanmean(table, axis=0)
    centred = np.where(np.isfinite(table), table - mean, 0.0)
    std = np.sqrt(np.sum(centred**2, axis=0) / np.maximum(counts - 1, 1))
    return np.arange(1, length + 1), mean, std


ArmRuns = Mapping[str, Mapping[int, Sequence[Mapping[str, Any]]]]
"""arm name -> seed -> that run's ``metrics.jsonl`` rows."""


def _curve(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [float(row[key]) if row.get(key) is not None else math.nan for row in rows]


def plot_loss_curves_by_arm(
    runs: ArmRuns, path: str | PathLike[str], baseline: str | None = None
) -> None:
    """Train loss, val loss and val RMSE per epoch for each arm: the mean over seeds with a
    band of ± one std. The seed also picks the validation tiles, so that band holds the
    split's spread too; with a ``baseline`` a second row shows each arm's change in % against
    the baseline run with the same seed, where only the arm's own effect and noise remain."""
    panels = (
        ("train_loss", "train loss"),
        ("val_loss", "val loss"),
        ("val_rmse_m", "val RMSE (m)"),
    )
    present = {key for seeds in runs.values() for rows in seeds.values() for r in rows for key in r}
    panels = tuple(panel for panel in panels if panel[0] in present) or panels[:2]
    paired = baseline in runs
    fig = Figure(figsize=(15, 8.5 if paired else 4.4), layout="constrained")
    axes = fig.subplots(2 if paired else 1, len(panels), squeeze=False)
    for column, (key, title) in enumerate(panels):
        for i, (arm, seeds) in enumerate(runs.items()):
            curves = [_curve(rows, key) for rows in seeds.values()]
            if not curves:
                continue
            epochs, mean, std = _mean_band(curves)
            ax = axes[0][column]
            ax.plot(epochs, mean, "-o", ms=3, color=f"C{i}", label=f"{arm} ({len(curves)})")
            ax.fill_between(epochs, mean - std, mean + std, color=f"C{i}", alpha=0.15, lw=0)
            if not paired or arm == baseline:
                continue
            base = {seed: np.array(_curve(rows, key)) for seed, rows in runs[baseline].items()}
            changes = []
            for seed, curve in zip(seeds, curves, strict=True):
                if seed in base:
                    length = min(len(curve), len(base[seed]))
                    changes.append(list(np.array(curve[:length]) / base[seed][:length] * 100 - 100))
            if changes:
                epochs, mean, std = _mean_band(changes)
                ax = axes[1][column]
                ax.plot(epochs, mean, "-o", ms=3, color=f"C{i}")
                ax.fill_between(epochs, mean - std, mean + std, color=f"C{i}", alpha=0.15, lw=0)
        axes[0][column].set_title(f"{title}, mean ± std over seeds")
        if paired:
            axes[1][column].axhline(0, color="k", lw=0.8)
            axes[1][column].set_title(f"{title}: % change vs {baseline}, same seed")
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    if runs:
        axes[0][0].legend(fontsize=7, title="arm (seeds)", title_fontsize=7)
    _save(fig, path)


def plot_terrain_rmse_by_arm(
    runs: ArmRuns, path: str | PathLike[str], baseline: str | None = None
) -> None:
    """Grouped bars per terrain of the final validation RMSE (m) and slope RMSE (°), mean over
    seeds with ± std error bars; with a ``baseline`` a second row shows each arm's change in %
    against the baseline with the same seed (same validation tiles), whose error bars are the
    std of those paired changes. Bicubic interpolation joins the RMSE panels as a reference
    when the rows carry ``val_rmse_m_bicubic_by_terrain``."""
    keys = (
        ("val_rmse_m_by_terrain", "val_rmse_m_bicubic_by_terrain", "RMSE (m)"),
        ("val_slope_rmse_deg_by_terrain", None, "slope RMSE (°)"),
    )
    finals = {
        arm: {seed: rows[-1] for seed, rows in seeds.items() if rows} for arm, seeds in runs.items()
    }
    finals = {arm: seeds for arm, seeds in finals.items() if seeds}
    paired = baseline in finals
    fig = Figure(figsize=(14, 8.5 if paired else 4.5), layout="constrained")
    axes = fig.subplots(2 if paired else 1, 2, squeeze=False)
    names = _terrain_order(
        [
            t
            for seeds in finals.values()
            for row in seeds.values()
            for t in row.get("val_rmse_m_by_terrain", {})
        ]
    )
    x = np.arange(len(names))

    def values(rows: Mapping[int, Mapping[str, Any]], key: str) -> dict[int, list[float]]:
        return {
            seed: [float((row.get(key) or {}).get(name, math.nan)) for name in names]
            for seed, row in rows.items()
        }

    for column, (key, reference_key, title) in enumerate(keys):
        groups = {arm: values(seeds, key) for arm, seeds in finals.items()}
        if reference_key and any(
            reference_key in row for s in finals.values() for row in s.values()
        ):
            first = next(iter(finals.values()))
            groups["bicubic"] = values(first, reference_key)
        width = 0.8 / max(1, len(groups))
        rows_of_axes = [(axes[0][column], False)] + ([(axes[1][column], True)] if paired else [])
        for ax, relative in rows_of_axes:
            for i, (arm, per_seed) in enumerate(groups.items()):
                if relative and arm == baseline:
                    continue
                if relative:
                    base = values(finals[baseline], key)
                    seeds = [s for s in per_seed if s in base]
                    table = np.array(
                        [np.array(per_seed[s]) / np.array(base[s]) * 100 - 100 for s in seeds]
                    )
                else:
                    table = np.array(list(per_seed.values()))
                if table.size == 0:
                    continue
                mean = np.nanmean(table, axis=0)
                std = np.nanstd(table, axis=0, ddof=1) if len(table) > 1 else np.zeros_like(mean)
                hatch = "//" if arm == "bicubic" else None
                color = "0.6" if arm == "bicubic" else f"C{i}"
                offset = (i - (len(groups) - 1) / 2) * width
                ax.bar(
                    x + offset,
                    mean,
                    width,
                    yerr=std,
                    capsize=2,
                    color=color,
                    hatch=hatch,
                    label=arm,
                    error_kw={"lw": 0.8},
                )
            ax.set_xticks(x, names)
            ax.grid(axis="y", alpha=0.3)
            if relative:
                ax.axhline(0, color="k", lw=0.8)
                ax.set_title(f"{title}: change vs {baseline} with the same seed (%)")
            else:
                ax.set_yscale("log")
                ax.set_title(f"final validation {title}, mean ± std over seeds")
    if finals:  # outside the axes: with many arms a legend inside hides bars
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    _save(fig, path)


def run_step_losses(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    """A run's training loss per optimizer step (``step_losses`` of each metrics row; a
    non-finite loss was written as null and reads as NaN)."""
    return [
        math.nan if value is None else float(value)
        for row in rows
        for value in row.get("step_losses", ())
    ]


def step_loss_figure(runs: ArmRuns) -> Figure:
    """One panel per arm: each seed's training loss per optimizer step, and red crosses on the
    steps ``core.metrics.spike_steps`` calls spikes, the definition behind the trainer's
    ``loss_spikes`` (a non-finite spike sits at the top of its seed's curve)."""
    arms = [arm for arm, seeds in runs.items() if seeds]
    fig = Figure(figsize=(12, 1.2 + 2.2 * max(1, len(arms))), layout="constrained")
    axes = fig.subplots(max(1, len(arms)), 1, squeeze=False)[:, 0]
    for ax, arm in zip(axes, arms, strict=False):
        count, finite_losses = 0, []
        for i, (seed, rows) in enumerate(runs[arm].items()):
            losses = np.array(run_step_losses(rows))
            if not losses.size:
                continue
            finite = losses[np.isfinite(losses)]
            finite_losses.extend(finite.tolist())
            spikes = np.array(spike_steps(losses.tolist()), dtype=int)
            count += len(spikes)
            top = finite.max() if finite.size else 1.0
            steps = np.arange(1, len(losses) + 1)
            ax.plot(steps, losses, lw=0.7, color=f"C{i}", label=f"seed {seed}")
            heights = np.where(np.isfinite(losses[spikes]), losses[spikes], top)
            ax.scatter(steps[spikes], heights, marker="x", s=30, color="red", zorder=3)
        _log_if_positive(ax, finite_losses)
        ax.set_title(f"{arm}: {count} loss spikes (red ×) over {len(runs[arm])} seeds", fontsize=9)
        ax.set_ylabel("train loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("optimizer step")
    return fig


def plot_step_losses_by_arm(runs: ArmRuns, path: str | PathLike[str]) -> None:
    """``step_loss_figure`` written to ``path``: the spikes behind the counts, visible."""
    _save(step_loss_figure(runs), path)
