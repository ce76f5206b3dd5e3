"""The experiment report's plots: curves and final errors per arm, per-step losses with their
batch-loss outliers marked, and the probe set's loss with the model spikes marked."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from os import PathLike
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from core.experiment.summary import STAT_ROWS, Summary, probe_series
from core.plots import domain_order, log_if_positive, run_step_losses, save
from core.spikes import batch_loss_outliers
from core.tasks import ReportMetric

LOSS_KEYS = ("train_loss", "val_loss")
"""Curves in the normalised units of the loss."""


def arm_colours(count: int) -> list[Any]:
    """One distinct colour per arm: matplotlib's ten-colour cycle repeats after ten arms, so
    more arms take the twenty colours of ``tab20``."""
    if count <= 10:
        return [f"C{i}" for i in range(count)]
    palette = colormaps["tab20"]
    return [palette(i % 20) for i in range(count)]


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
    runs: ArmRuns,
    path: str | PathLike[str],
    baseline: str | None = None,
    other_units: Collection[str] = (),
) -> None:
    """Train loss, val loss and val RMSE per epoch for each arm: the mean over seeds with a
    band of ± one std. The seed also picks the validation tiles, so that band holds the
    split's spread too; with a ``baseline`` a second row shows each arm's change in % against
    the baseline run with the same seed, where only the arm's own effect and noise remain.
    The arms of ``other_units`` (losses normalised otherwise) stay out of the loss panels."""
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
    colours = arm_colours(len(runs))
    for column, (key, title) in enumerate(panels):
        for i, (arm, seeds) in enumerate(runs.items()):
            curves = [_curve(rows, key) for rows in seeds.values()]
            if not curves or (key in LOSS_KEYS and arm in other_units):
                continue
            epochs, mean, std = _mean_band(curves)
            ax = axes[0][column]
            ax.plot(epochs, mean, "-o", ms=3, color=colours[i], label=f"{arm} ({len(curves)})")
            ax.fill_between(epochs, mean - std, mean + std, color=colours[i], alpha=0.15, lw=0)
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
                ax.plot(epochs, mean, "-o", ms=3, color=colours[i])
                ax.fill_between(epochs, mean - std, mean + std, color=colours[i], alpha=0.15, lw=0)
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
    save(fig, path)


def plot_domain_metrics_by_arm(
    runs: ArmRuns,
    path: str | PathLike[str],
    metrics: Sequence[ReportMetric],
    domains: Sequence[str],
    reference_name: str = "",
    baseline: str | None = None,
) -> None:
    """Grouped bars per domain (dem_sr: terrain) of each ``by_domain`` task metric's final
    value, mean over seeds with ± std error bars; with a ``baseline`` a second row shows each
    arm's change in % against the baseline with the same seed (same validation tiles), whose
    error bars are the std of those paired changes. The task's reference (dem_sr: bicubic)
    joins a metric's panel when the rows carry its ``<reference>_by_terrain``; a metric no
    run has gets no panel."""
    finals = {
        arm: {seed: rows[-1] for seed, rows in seeds.items() if rows} for arm, seeds in runs.items()
    }
    finals = {arm: seeds for arm, seeds in finals.items() if seeds}
    present = {key for seeds in finals.values() for row in seeds.values() for key in row}
    keys = tuple(
        (
            f"{metric.key}_by_terrain",
            f"{metric.reference}_by_terrain" if metric.reference else None,
            metric.label,
        )
        for metric in metrics
        if metric.by_domain and f"{metric.key}_by_terrain" in present
    )
    paired = baseline in finals
    fig = Figure(figsize=(7 * len(keys), 8.5 if paired else 4.5), layout="constrained")
    axes = fig.subplots(2 if paired else 1, len(keys), squeeze=False)
    seen = [
        name
        for seeds in finals.values()
        for row in seeds.values()
        for key, _, _ in keys
        for name in row.get(key) or {}
    ]
    names = domain_order(seen, domains)
    x = np.arange(len(names))

    def values(rows: Mapping[int, Mapping[str, Any]], key: str) -> dict[int, list[float]]:
        return {
            seed: [float((row.get(key) or {}).get(name, math.nan)) for name in names]
            for seed, row in rows.items()
        }

    colours = arm_colours(len(finals))  # the reference is grey
    for column, (key, reference_key, title) in enumerate(keys):
        groups = {arm: values(seeds, key) for arm, seeds in finals.items()}
        if reference_key and any(
            reference_key in row for s in finals.values() for row in s.values()
        ):
            first = next(iter(finals.values()))
            groups[reference_name or "reference"] = values(first, reference_key)
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
                reference = arm not in finals
                hatch = "//" if reference else None
                color = "0.6" if reference else colours[i]
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
                ax.set_title(f"final {title}, mean ± std over seeds")
    if finals:  # outside the axes: with many arms a legend inside hides bars
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    save(fig, path)


Series = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(optimizer steps, values, indices of the marked values) of one run."""


def step_series(rows: Sequence[Mapping[str, Any]]) -> Series:
    """Training loss per optimizer step, its batch-loss outliers marked."""
    losses = np.array(run_step_losses(rows), dtype=np.float64)
    marked = np.array(batch_loss_outliers(losses.tolist()), dtype=int)
    return np.arange(1, len(losses) + 1), losses, marked


def probe_marked(rows: Sequence[Mapping[str, Any]]) -> Series:
    """The probe set's loss at each probe step, the trainer's model spikes marked."""
    steps, values = probe_series(rows)
    spikes = {s for row in rows for s in row.get("model_spike_steps", [])}
    marked = np.array([i for i, s in enumerate(steps) if s in spikes], dtype=int)
    numbers = [math.nan if v is None else v for v in values]
    return np.array(steps, dtype=int), np.array(numbers, dtype=np.float64), marked


def marked_series_figure(
    runs: ArmRuns, series: Callable[[Sequence[Mapping[str, Any]]], Series], ylabel: str, what: str
) -> Figure:
    """One panel per arm, one curve per seed (``series`` of its rows), and red crosses on
    the marked values, ``what`` they are (a non-finite one sits at the top of its curve)."""
    arms = [arm for arm, seeds in runs.items() if seeds]
    fig = Figure(figsize=(12, 1.2 + 2.2 * max(1, len(arms))), layout="constrained")
    axes = fig.subplots(max(1, len(arms)), 1, squeeze=False, sharex=True)[:, 0]
    for ax, arm in zip(axes, arms, strict=False):
        count, finite_values = 0, []
        for i, (seed, rows) in enumerate(runs[arm].items()):
            steps, values, marked = series(rows)
            if not values.size:
                continue
            finite = values[np.isfinite(values)]
            finite_values.extend(finite.tolist())
            count += len(marked)
            top = finite.max() if finite.size else 1.0
            ax.plot(steps, values, lw=0.7, color=f"C{i}", label=f"seed {seed}")
            heights = np.where(np.isfinite(values[marked]), values[marked], top)
            ax.scatter(steps[marked], heights, marker="x", s=30, color="red", zorder=3)
        log_if_positive(ax, finite_values)
        ax.set_title(f"{arm}: {count} {what} (red ×) over {len(runs[arm])} seeds", fontsize=9)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("optimizer step")
    return fig


def step_loss_figure(runs: ArmRuns) -> Figure:
    """Each seed's training loss per optimizer step, the steps
    ``core.spikes.batch_loss_outliers`` finds marked: the trainer's ``batch_loss_outliers``."""
    return marked_series_figure(runs, step_series, "train loss", "batch-loss outliers")


def plot_step_losses_by_arm(runs: ArmRuns, path: str | PathLike[str]) -> None:
    """``step_loss_figure`` written to ``path``: the outliers behind the counts, visible."""
    save(step_loss_figure(runs), path)


def plot_probe_losses_by_arm(runs: ArmRuns, path: str | PathLike[str]) -> None:
    """Each seed's probe-set loss over the optimizer steps, its model spikes marked."""
    save(marked_series_figure(runs, probe_marked, "probe loss", "model spikes"), path)


def questions_figure(
    summary: Summary, baseline: str, alpha: float, colours: Mapping[str, Any]
) -> Figure:
    """Each question's primary endpoint against the baseline, in % of the baseline's mean:
    one dot per seed (the paired difference with the same seed), the mean difference with
    its 95 % interval over seeds (thick) and over seeds and tiles (thin), a filled marker
    where it survives the family's correction. The endpoints differ in units, hence %."""
    columns = {c.name: c for table in summary.tables for c in table.columns}
    rows = []
    for arm, name in summary.questions.items():
        stats = {row: summary.stats[arm][row].get(name) for row in STAT_ROWS}
        base_mean = summary.stats.get(baseline, {}).get("mean", {}).get(name)
        if stats["paired_diff_mean"] is None or not base_mean:
            continue  # a censored endpoint, or no baseline: no paired difference to draw
        scale = 100 / abs(base_mean)
        base = summary.per_seed[baseline]
        dots = [
            (value - base[seed][name]) * scale
            for seed, run in summary.per_seed[arm].items()
            if (value := run.get(name)) is not None
            and seed in base
            and base[seed].get(name) is not None
        ]
        rows.append((arm, columns[name], stats, scale, dots))
    fig = Figure(figsize=(9, 1.4 + 0.55 * max(1, len(rows))), layout="constrained")
    ax = fig.subplots()
    rng = np.random.default_rng(0)  # the dots' vertical jitter only
    for y, (arm, _, stats, scale, dots) in enumerate(rows):
        colour = colours.get(arm, "C0")
        ax.scatter(dots, y + rng.uniform(-0.18, 0.18, len(dots)), s=10, color=colour, alpha=0.5)
        for low, high, width in (("boot_low", "boot_high", 1.0), ("ci_low", "ci_high", 4.0)):
            if stats[low] is not None and stats[high] is not None:
                ax.plot([stats[low] * scale, stats[high] * scale], [y, y], color=colour, lw=width)
        survives = stats["adjusted_p"] is not None and stats["adjusted_p"] < alpha
        ax.scatter(
            [stats["paired_diff_mean"] * scale],
            [y],
            marker="D",
            s=50,
            zorder=3,
            edgecolor="k",
            color=colour if survives else "white",
        )
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(
        range(len(rows)),
        [
            f"{arm}: {column.label} ({'higher' if column.higher_is_better else 'lower'} is better)"
            for arm, column, *_ in rows
        ],
        fontsize=8,
    )
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel(f"paired change vs {baseline} with the same seed, % of {baseline}'s mean")
    ax.set_title(
        "primary endpoints: dots = seeds, thick = 95 % CI over seeds, thin = over seeds and "
        f"tiles; ◆ filled = survives the correction (α = {alpha})",
        fontsize=9,
    )
    return fig


def plot_questions(
    summary: Summary,
    baseline: str,
    alpha: float,
    colours: Mapping[str, Any],
    path: str | PathLike[str],
) -> None:
    """:func:`questions_figure` written to ``path``."""
    save(questions_figure(summary, baseline, alpha, colours), path)


def region_gains_figure(
    gains: Mapping[str, Mapping[int, Mapping[str, float]]],
    colours: Mapping[str, Any],
    reference_name: str,
    label: str,
) -> Figure:
    """Per validation region (a held-out landscape), each arm's gain over the reference in
    ``label`` (%), mean ± std over seeds: the spread across regions is §7.2's cross-terrain
    generalisation, and an arm that makes it consistent brings its markers level."""
    regions = sorted(
        {region for seeds in gains.values() for run in seeds.values() for region in run}
    )
    arms = [arm for arm, seeds in gains.items() if seeds]
    fig = Figure(figsize=(max(8, 0.8 * len(regions) + 3), 5), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(regions))
    width = 0.8 / max(1, len(arms))
    for i, arm in enumerate(arms):
        table = np.array(
            [[run.get(region, math.nan) for region in regions] for run in gains[arm].values()]
        )
        mean = np.nanmean(table, axis=0)
        std = np.nanstd(table, axis=0, ddof=1) if len(table) > 1 else np.zeros_like(mean)
        offset = (i - (len(arms) - 1) / 2) * width
        colour = colours.get(arm, f"C{i}")
        legend = f"{arm} ({len(table)})"
        ax.errorbar(
            x + offset, mean, std, fmt="o", ms=4, capsize=2, lw=0.8, color=colour, label=legend
        )
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, regions, rotation=30, ha="right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylabel(f"gain over {reference_name} in {label} (%)")
    ax.set_title(
        f"each validation region's gain over {reference_name}, mean ± std over seeds "
        "(above 0: better than the reference)",
        fontsize=9,
    )
    fig.legend(loc="outside right upper", fontsize=7, title="arm (seeds)", title_fontsize=7)
    return fig


def plot_region_gains(
    gains: Mapping[str, Mapping[int, Mapping[str, float]]],
    colours: Mapping[str, Any],
    reference_name: str,
    label: str,
    path: str | PathLike[str],
) -> None:
    """:func:`region_gains_figure` written to ``path``."""
    save(region_gains_figure(gains, colours, reference_name, label), path)
