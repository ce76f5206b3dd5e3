"""PNG plots every run folder gets: loss curves per epoch and per optimizer step.

Built on ``matplotlib.figure.Figure`` with the Agg canvas, never ``pyplot``: no global figure
state, no GUI backend, safe to call from a training loop or a test. Tasks draw their own
plots (``core/tasks/<task>/plots.py``) with :func:`save`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from core.spikes import batch_loss_outliers

DPI = 110


def save(fig: Figure, path: str | PathLike[str]) -> None:
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


def log_if_positive(ax: Any, values: Sequence[float]) -> None:
    """Log y when every value is positive: losses span decades and spikes stay readable."""
    if values and min(values) > 0:
        ax.set_yscale("log")


def domain_order(names: Sequence[str], known: Sequence[str]) -> list[str]:
    """``known`` domains in their own order, then any others in first-seen order, each once."""
    others = [name for name in dict.fromkeys(names) if name not in known]
    return [name for name in known if name in names] + others


def plot_loss_curves(
    rows: Sequence[Mapping[str, Any]], path: str | PathLike[str], components: Sequence[str] = ()
) -> None:
    """Per-epoch total and per-component losses; per-step losses with their outliers.

    ``rows`` are ``metrics.jsonl`` objects. Panels: train/val total loss; each
    ``train_loss_<component>`` of ``components`` (solid) and ``val_loss_<component>``
    (dashed) that exists; and, when rows carry ``step_losses`` (that epoch's per-step
    losses), the concatenated step series with ``batch_loss_outliers`` marked.
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
    log_if_positive(ax, plotted)
    ax.set(title="total loss", xlabel="epoch", ylabel="loss")

    ax = axes[1]
    plotted = []
    for i, component in enumerate(components):
        for split, style in (("train", "-"), ("val", "--")):
            epochs, values = _series(rows, f"{split}_loss_{component}")
            if values:
                ax.plot(epochs, values, style, color=f"C{i}", label=f"{split} {component}")
                plotted += values
    log_if_positive(ax, plotted)
    ax.set(title="loss components", xlabel="epoch")

    if steps:
        ax = axes[2]
        ax.plot(steps, lw=0.8, color="C0", label="step loss")
        outliers = batch_loss_outliers(steps)
        finite_outliers = [s for s in outliers if math.isfinite(steps[s])]
        ax.plot(
            finite_outliers,
            [steps[s] for s in finite_outliers],
            "v",
            color="C3",
            label=f"batch-loss outliers ({len(outliers)})",
        )
        log_if_positive(ax, [v for v in steps if math.isfinite(v)])
        ax.set(title="per-step loss", xlabel="step")

    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    save(fig, path)


def run_step_losses(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    """A run's training loss per optimizer step (``step_losses`` of each metrics row; a
    non-finite loss was written as null and reads as NaN)."""
    return [
        math.nan if value is None else float(value)
        for row in rows
        for value in row.get("step_losses", ())
    ]
