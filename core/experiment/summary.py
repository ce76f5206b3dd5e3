"""From the runs' ``metrics.jsonl`` rows and ``val_tiles.csv.gz`` to the numbers of the report.

The trainer's columns (batch-loss outliers, model spikes, steps, convergence, val_loss) exist
for every task; the task adds its own through ``report_metrics`` (``core.tasks.ReportMetric``).
Each question (an arm against the baseline) is decided on one primary endpoint; every other
test is exploratory, corrected per table.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from itertools import accumulate
from typing import Any

import attrs
import numpy as np

from core.errors import UsageError
from core.experiment.schedule import Runs
from core.experiment.spec import Experiment
from core.experiment.stats import (
    Tiles,
    adjust,
    corrected_level,
    delta_pct,
    detectable_change,
    hierarchical_bootstrap,
    mean_std,
    paired_test,
    sign_test_p,
)
from core.spikes import probe_rise
from core.tasks import ReportMetric, TileMetric

EQUAL_STEPS = "@equal_steps"
"""Suffix of the columns read at the epoch where every arm has had the same steps."""
FRACTIONS = (50, 80, 95)
"""The fractions of the baseline's gain over the reference whose steps the report gives."""
REGION_GAIN = "gain over the reference (%)"
"""The measure of ``Summary.region_shares`` that is no share: each region's gain."""
REGION_SPREAD = "region_gain_spread"
"""The column of the spread over the validation regions of each region's gain over the
reference (:func:`region_gain_spread`)."""
STAT_ROWS = (
    "mean", "std", "count", "delta_pct", "paired_diff_mean", "paired_diff_std",
    "ci_low", "ci_high", "boot_low", "boot_high", "paired_p", "adjusted_p", "detectable_80",
    "primary",
)  # fmt: skip
POWER = 0.8

TileRuns = dict[str, dict[int, Tiles]]
"""arm name -> seed -> that run's ``val_tiles.csv.gz`` columns."""


@attrs.frozen
class Column:
    name: str
    label: str
    higher_is_better: bool = False
    tested: bool = True
    """False for a budget (optimizer steps, the epoch read): what an arm was given, not an
    outcome."""
    censored: bool = False
    """Values are None where a run never got there: tested by the exact sign test."""
    loss_units: bool = False
    """In the normalised units of the loss, which an arm with another
    ``data.normalisation`` does not share: such an arm's cells are not compared."""


@attrs.frozen
class Table:
    """One table of the report; its exploratory tests form one family for the correction."""

    title: str
    columns: tuple[Column, ...]


def curve_metric(metrics: Sequence[ReportMetric]) -> ReportMetric:
    """The metric of the validation curve: the task's first, else ``val_loss``."""
    return metrics[0] if metrics else ReportMetric("val_loss", "val_loss")


def has_region_gains(metric: ReportMetric) -> bool:
    """Whether the per-tile errors give ``metric``'s reference per tile, hence per region."""
    return metric.tiles is not None and metric.tiles.reference is not None


def tables_for(metrics: Sequence[ReportMetric], domains: Sequence[str]) -> list[Table]:
    """The headline (trainer and task columns), the view at equal steps, one per domain."""
    curve = curve_metric(metrics)
    better = curve.higher_is_better
    fractions = [
        Column(f"steps_to_{f}pct", f"steps to {f} % of the gain", censored=True)
        for f in (FRACTIONS if curve.reference else ())
    ]
    label = f"{curve.label}: spread of the regions' gain (pp)"
    spread = [Column(REGION_SPREAD, label)] if has_region_gains(curve) else []
    headline = [
        Column("batch_loss_outliers_per_1000_steps", "batch-loss outliers / 1000 steps"),
        Column("model_spikes_per_1000_steps", "model spikes / 1000 steps"),
        Column("probe_rise", "probe loss rise (log)"),
        Column("steps", "optimizer steps", tested=False),
        *fractions,
        Column("val_auc", f"{curve.label}, mean over the curve", better),
        Column("final_val_loss", "final val_loss", loss_units=True),
        *(Column(m.key, m.label, m.higher_is_better) for m in metrics),
        *spread,
    ]
    equal = [
        Column(f"epoch{EQUAL_STEPS}", "epoch", tested=False),
        Column(f"steps{EQUAL_STEPS}", "optimizer steps", tested=False),
        Column(f"val_loss{EQUAL_STEPS}", "val_loss", loss_units=True),
        *(Column(f"{m.key}{EQUAL_STEPS}", m.label, m.higher_is_better) for m in metrics),
    ]
    tables = [Table("Headline", tuple(headline)), Table("At equal optimizer steps", tuple(equal))]
    for m in metrics:
        if m.by_domain:
            columns = tuple(Column(f"{m.key}_{d}", d, m.higher_is_better) for d in domains)
            tables.append(Table(f"{m.label[0].upper()}{m.label[1:]} per terrain", columns))
    return tables


def column_names(metrics: Sequence[ReportMetric], domains: Sequence[str]) -> list[str]:
    """Every tested column, the names a primary endpoint may take."""
    tables = tables_for(metrics, domains)
    return [c.name for table in tables for c in table.columns if c.tested]


def primary_of(experiment: Experiment, arm_name: str, metrics: Sequence[ReportMetric]) -> str:
    """An arm's primary endpoint: its own, else the experiment's, else the task's first
    metric (``final_val_loss`` for a task without report metrics)."""
    arm = next(arm for arm in experiment.arms if arm.name == arm_name)
    default = metrics[0].key if metrics else "final_val_loss"
    return arm.primary or experiment.primary or default


def check_primaries(
    experiment: Experiment, metrics: Sequence[ReportMetric], domains: Sequence[str]
) -> None:
    """Every declared primary endpoint is a tested column of the report (exit 2 naming it)."""
    names = column_names(metrics, domains)
    declared = [("primary", experiment.primary)]
    declared += [(f"arm {arm.name!r}: primary", arm.primary) for arm in experiment.arms]
    for where, name in declared:
        if name is not None and name not in names:
            raise UsageError(
                f"{where} {name!r} is not a tested column of task {experiment.task!r}; "
                f"choose one of {', '.join(names)}"
            )


def total(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """The sum of ``key`` over the rows; None when a row lacks it."""
    values = [row.get(key) for row in rows]
    return None if None in values else float(sum(values))


def per_1000_steps(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """``sum(key) / sum(steps) x 1000``: fair where arms differ in steps per epoch."""
    count = total(rows, key)
    return None if count is None else count / max(1, sum(row["steps"] for row in rows)) * 1000


def probe_series(rows: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[float | None]]:
    """The run's probe steps and probe losses, in order."""
    steps = [step for row in rows for step in row.get("probe_steps", [])]
    return steps, [value for row in rows for value in row.get("probe_loss", [])]


def validation_curve(rows: Sequence[Mapping[str, Any]], key: str) -> list[tuple[int, float]]:
    """``(optimizer step, key)`` at every validation: the rows' ``val_curve`` points (every
    ``train.validate_every_steps`` steps and each epoch's end), or the epochs' own rows
    where they have none; points without a finite value are left out."""
    points: list[tuple[int, Any]] = []
    for row, done in zip(rows, accumulate(row["steps"] for row in rows), strict=True):
        curve = row.get("val_curve") or [{"step": done, key: row.get(key)}]
        points += [(point["step"], point.get(key)) for point in curve]
    return [(step, float(v)) for step, v in points if v is not None and math.isfinite(v)]


def curve_mean(points: Sequence[tuple[int, float]]) -> float | None:
    """The area under the validation curve divided by the steps it spans (trapezoids between
    validations): the metric's mean over training, which rewards getting there early."""
    if not points:
        return None
    steps, values = np.array(points, dtype=np.float64).T
    if len(points) == 1 or steps[-1] == steps[0]:
        return float(values[-1])
    area = np.sum((values[1:] + values[:-1]) / 2 * np.diff(steps))
    return float(area / (steps[-1] - steps[0]))


def gain(value: float, reference: float, higher_is_better: bool) -> float:
    """How much better than the reference ``value`` is (positive: better)."""
    return value - reference if higher_is_better else reference - value


def steps_to_fraction(
    points: Sequence[tuple[int, float]], reference: float, goal: float, metric: ReportMetric
) -> int | None:
    """The first validation step with at least ``goal`` gain over the reference; None if
    none (censored: the run never got there within its budget)."""
    for step, value in points:
        if gain(value, reference, metric.higher_is_better) >= goal:
            return step
    return None


def region_gains(tiles: Tiles, metric: ReportMetric) -> dict[str, float]:
    """Per validation region (the tiles' ``region`` column: a held-out landscape or named
    region, else a tile's own file), how much better than the reference the run is there, in %
    of the reference: ``100 (reference - metric) / reference`` (dem_sr: bicubic's RMSE against
    the model's), both pooled over the region's tiles. A region without a valid pixel is left
    out."""
    how = metric.tiles
    assert how is not None and how.reference is not None
    numerator, denominator = tiles[how.numerator], tiles[how.denominator]
    reference = how.numerator_of(tiles[how.reference], denominator)
    gains = {}
    for region in np.unique(tiles["region"]):
        inside = (tiles["region"] == region) & np.isfinite(reference) & (denominator > 0)
        if inside.any():
            value = how.over(numerator[inside].sum(), denominator[inside].sum())
            base = how.over(reference[inside].sum(), denominator[inside].sum())
            gains[str(region)] = 100 * gain(value, base, metric.higher_is_better) / base
    return gains


def region_gain_spread(tiles: Tiles | None, metric: ReportMetric) -> float | None:
    """The sample standard deviation over the validation regions of :func:`region_gains`, in
    percentage points: 0 when every held-out landscape gains alike over the reference (the
    seed's "consistent" cross-terrain generalisation). None without the run's per-tile errors
    or with fewer than two regions."""
    gains = [] if tiles is None else list(region_gains(tiles, metric).values())
    return float(np.std(gains, ddof=1)) if len(gains) > 1 else None


def row_at_steps(rows: Sequence[Mapping[str, Any]], budget: int) -> Mapping[str, Any]:
    """The last epoch's row whose cumulative optimizer steps stay within ``budget`` (the
    first epoch when even that one exceeds it)."""
    totals = accumulate(row["steps"] for row in rows)
    within = [row for row, done in zip(rows, totals, strict=True) if done <= budget]
    return within[-1] if within else rows[0]


def task_values(row: Mapping[str, Any], metric: ReportMetric, key: str, domains: Iterable[str]):
    """``{name: value}`` of one task metric read under ``key`` (its own or its reference)."""
    values = {metric.key: row.get(key)}
    if metric.by_domain:
        by_domain = row.get(f"{key}_by_terrain") or {}
        values.update({f"{metric.key}_{d}": by_domain.get(d) for d in domains})
    return values


def run_metrics(
    rows: Sequence[Mapping[str, Any]],
    budget: int,
    metrics: Sequence[ReportMetric],
    domains: Sequence[str],
    baseline_gain: float | None,
    tiles: Tiles | None = None,
) -> dict[str, Any]:
    """One run's numbers (None where a value does not exist, e.g. a fraction not reached);
    ``tiles``: its ``val_tiles.csv.gz`` columns, if it has them."""
    final, equal = rows[-1], row_at_steps(rows, budget)
    curve = curve_metric(metrics)
    points = validation_curve(rows, curve.key)
    _, probes = probe_series(rows)
    values: dict[str, Any] = {
        "batch_loss_outliers_per_1000_steps": per_1000_steps(rows, "batch_loss_outliers"),
        "model_spikes_per_1000_steps": per_1000_steps(rows, "model_spikes") if probes else None,
        "probe_rise": probe_rise(probes) if probes else None,
        "steps": sum(row["steps"] for row in rows),
        "val_auc": curve_mean(points),
        "final_val_loss": final.get("val_loss"),
        f"epoch{EQUAL_STEPS}": equal["epoch"],
        f"steps{EQUAL_STEPS}": sum(row["steps"] for row in rows if row["epoch"] <= equal["epoch"]),
        f"val_loss{EQUAL_STEPS}": equal.get("val_loss"),
    }
    reference = final.get(curve.reference) if curve.reference else None
    for fraction in FRACTIONS if reference is not None and baseline_gain is not None else ():
        goal = fraction / 100 * baseline_gain
        values[f"steps_to_{fraction}pct"] = steps_to_fraction(points, reference, goal, curve)
    if has_region_gains(curve):
        values[REGION_SPREAD] = region_gain_spread(tiles, curve)
    for metric in metrics:
        values.update(task_values(final, metric, metric.key, domains))
        values[f"{metric.key}{EQUAL_STEPS}"] = equal.get(metric.key)
    return values


def reference_metrics(
    final: Mapping[str, Any], metrics: Sequence[ReportMetric], domains: Sequence[str]
) -> dict[str, Any] | None:
    """The task's reference (dem_sr: bicubic) in the task's columns; None without one."""
    values: dict[str, Any] = {}
    for metric in metrics:
        if metric.reference is not None and final.get(metric.reference) is not None:
            values.update(task_values(final, metric, metric.reference, domains))
    return values or None


def baseline_gain(experiment: Experiment, runs: Runs, metrics: Sequence[ReportMetric]):
    """The baseline's final gain over the reference, averaged over its seeds: the goal the
    fractions are of. A mean over seeds rather than each seed's own end, so no run reaches
    100 % by construction; None without a reference or a baseline that beats it."""
    curve = curve_metric(metrics)
    gains = [
        gain(rows[-1][curve.key], rows[-1][curve.reference], curve.higher_is_better)
        for rows in runs.get(experiment.baseline, {}).values()
        if curve.reference and rows[-1].get(curve.key) is not None
        and rows[-1].get(curve.reference) is not None
    ]  # fmt: skip
    goal = float(np.mean(gains)) if gains else None
    return goal if goal is not None and goal > 0 else None


def domain_shares(
    rows: Sequence[Mapping[str, Any]], tiles: Tiles | None, metric: ReportMetric
) -> dict[str, dict[str, float]]:
    """Which domain carries how much of each measure, in one run: per domain, its share of
    the training windows and of the training loss (the last epoch, ``[loss]`` base weights,
    before plugins), of the validation tiles, of ``val_loss`` and of the sum behind the
    metric (dem_sr: the squared error behind val RMSE)."""
    final = rows[-1]
    counts, losses = final.get("terrain_counts") or {}, final.get("train_loss_by_terrain") or {}
    measures = {
        "training windows": {d: float(n) for d, n in counts.items()},
        "training loss": {d: counts.get(d, 0) * loss for d, loss in losses.items()},
    }
    if tiles is not None:
        measures.update(tile_measures(tiles, "terrain", metric))
    return as_shares(measures)


def region_shares(tiles: Tiles | None, metric: ReportMetric) -> dict[str, dict[str, float]]:
    """Which validation region (a held-out landscape or named region) carries how much of
    the validation tiles, of ``val_loss`` and of the sum behind the metric, in one run: a
    pooled metric is mostly the regions whose errors are largest, whatever their number of
    tiles. Empty without regions to compare: fewer than two, or each tile its own (a tile
    folder's regions are its files)."""
    regions = None if tiles is None else tiles.get("region")
    if regions is None or not 1 < len(np.unique(regions)) < len(regions):
        return {}
    return as_shares(tile_measures(tiles, "region", metric))


def tile_measures(tiles: Tiles, by: str, metric: ReportMetric) -> dict[str, dict[str, float]]:
    """Per value of the tiles' column ``by``: its tiles, its val_loss and the metric's
    numerator summed over them."""
    groups = {str(value): tiles[by] == value for value in np.unique(tiles[by])}
    measures = {"validation tiles": {d: float(np.sum(inside)) for d, inside in groups.items()}}
    pooled = {"val_loss": "loss"}
    if metric.tiles is not None:
        pooled[f"{metric.label}: {metric.tiles.numerator}"] = metric.tiles.numerator
    for label, column in pooled.items():
        if column in tiles:
            measures[label] = {
                d: float(tiles[column][inside].sum()) for d, inside in groups.items()
            }
    return measures


def as_shares(measures: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Each measure's values as fractions of its total (a measure that sums to 0 left out)."""
    return {
        label: {d: v / sum(values.values()) for d, v in values.items()}
        for label, values in measures.items()
        if sum(values.values()) > 0
    }


@attrs.define
class Summary:
    """Per arm and metric: the per-seed numbers, their mean, std and count, the change of the
    mean against the baseline (%), a paired test of the per-seed differences, its intervals
    and its p-value after its family's correction."""

    per_seed: dict[str, dict[int, dict[str, Any]]]
    stats: dict[str, dict[str, dict[str, float | None]]]
    """arm -> row (``STAT_ROWS``) -> metric -> value."""
    tables: list[Table]
    reference_name: str
    """The task's reference row (dem_sr: bicubic); empty for a task without one."""
    questions: dict[str, str] = attrs.Factory(dict)
    """Question arm -> its primary endpoint (a column name)."""
    level: float = 0.05
    """The corrected level of the primary endpoints' family (``corrected_level``)."""
    shares: dict[str, dict[str, float]] = attrs.Factory(dict)
    """The baseline's ``domain_shares``, averaged over its seeds."""
    region_shares: dict[str, dict[str, float]] = attrs.Factory(dict)
    """The baseline's ``region_shares``, averaged over its seeds, and under
    ``REGION_GAIN`` each region's gain over the reference (%, ``region_gains``)."""
    other_units: frozenset[str] = frozenset()
    """Arms whose losses are in other units than the baseline's (``loss_units`` columns)."""

    @property
    def complete_runs(self) -> int:
        """The arms' finished runs; the task's reference row (``reference_name``) is none."""
        return sum(len(seeds) for arm, seeds in self.per_seed.items() if arm != self.reference_name)


def step_budgets(runs: Runs) -> dict[int, int]:
    """Per seed: the fewest optimizer steps any arm's run took, the budget of the equal-steps
    view (``curriculum`` takes fewer steps per epoch than the others)."""
    budgets: dict[int, int] = {}
    for seeds in runs.values():
        for seed, rows in seeds.items():
            steps = sum(row["steps"] for row in rows)
            budgets[seed] = min(budgets.get(seed, steps), steps)
    return budgets


def tile_metrics(
    metrics: Sequence[ReportMetric], domains: Sequence[str]
) -> dict[str, tuple[TileMetric, str | None]]:
    """Column name -> (how it follows from the tiles, its domain or None for all tiles)."""
    found: dict[str, tuple[TileMetric, str | None]] = {}
    for m in metrics:
        if m.tiles is not None:
            found[m.key] = (m.tiles, None)
            if m.by_domain:
                found.update({f"{m.key}_{d}": (m.tiles, d) for d in domains})
    return found


def compare(
    experiment: Experiment,
    column: Column,
    values: Mapping[int, Any],
    base: Mapping[int, Any],
    tiles: tuple[Mapping[int, Tiles], Mapping[int, Tiles], TileMetric, str | None] | None,
) -> dict[str, float | None]:
    """The paired cells of one arm and column: the test (the exact sign test for a censored
    column, whose differences do not exist where a run never got there), the seed-level and
    the seeds-and-tiles intervals."""
    cells: dict[str, float | None] = dict.fromkeys(
        ("paired_diff_mean", "paired_diff_std", "ci_low", "ci_high", "boot_low", "boot_high")
    )
    if column.censored:
        cells["paired_p"] = sign_test_p(values, base)
        return cells
    paired = paired_test(values, base, experiment.test)
    if paired is None:
        cells["paired_p"] = None
        return cells
    cells.update(
        paired_diff_mean=paired.mean,
        paired_diff_std=paired.std,
        ci_low=paired.low,
        ci_high=paired.high,
        paired_p=paired.p,
    )
    if tiles is not None and (interval := hierarchical_bootstrap(*tiles)) is not None:
        cells["boot_low"], cells["boot_high"] = interval
    return cells


def summarise(
    experiment: Experiment,
    runs: Runs,
    metrics: Sequence[ReportMetric],
    domains: Sequence[str],
    reference_name: str,
    tiles: TileRuns | None = None,
    other_units: Collection[str] = (),
) -> Summary:
    """Every arm's numbers and paired comparisons; ``other_units``: arms whose losses are
    normalised otherwise than the baseline's, whose loss columns get no comparison."""
    tiles = tiles or {}
    budgets, goal = step_budgets(runs), baseline_gain(experiment, runs, metrics)
    per_seed = {
        arm: {
            seed: run_metrics(
                rows, budgets[seed], metrics, domains, goal, tiles.get(arm, {}).get(seed)
            )
            for seed, rows in sorted(seeds.items())
        }
        for arm, seeds in runs.items()
    }
    reference = {  # every run validates on the same tiles; the baseline's, read last, win
        seed: values
        for _, seeds in sorted(runs.items(), key=lambda arm: arm[0] == experiment.baseline)
        for seed, rows in seeds.items()
        if (values := reference_metrics(rows[-1], metrics, domains)) is not None
    }
    if reference and reference_name:
        per_seed[reference_name] = dict(sorted(reference.items()))
    tables = tables_for(metrics, domains)
    questions = {
        arm.name: primary_of(experiment, arm.name, metrics)
        for arm in experiment.questions()
        if arm.name in per_seed
    }
    from_tiles = tile_metrics(metrics, domains)
    base = per_seed.get(experiment.baseline, {})
    base_tiles = tiles.get(experiment.baseline, {})
    stats: dict[str, dict[str, dict[str, float | None]]] = {}
    for arm, seeds in per_seed.items():
        stats[arm] = {row: {} for row in STAT_ROWS}
        for column in (column for table in tables for column in table.columns):
            name = column.name
            values = {seed: run.get(name) for seed, run in seeds.items()}
            base_values = {seed: run.get(name) for seed, run in base.items()}
            mean, spread, count = mean_std(list(values.values()))
            base_mean = mean_std(list(base_values.values()))[0]
            change = None if arm == experiment.baseline else delta_pct(mean, base_mean)
            if column.censored:
                change = None  # the report gives medians, a run never there counting as last
            cells: dict[str, float | None] = {"paired_p": None}
            comparable = not (column.loss_units and arm in other_units)
            if not comparable:
                change = None
            if arm != experiment.baseline and column.tested and comparable:
                how = from_tiles.get(name)
                pair = (tiles.get(arm, {}), base_tiles, *how) if how and arm in tiles else None
                cells = compare(experiment, column, values, base_values, pair)
            cells.update(mean=mean, std=spread, count=count, delta_pct=change)
            cells["primary"] = 1.0 if questions.get(arm) == name else None
            for row in STAT_ROWS:
                stats[arm][row][name] = cells.get(row)
    level = corrected_level(experiment.alpha, len(questions), experiment.correction)
    for arm, name in questions.items():
        spread, count = stats[arm]["paired_diff_std"].get(name), stats[arm]["count"].get(name)
        if spread is not None and count:
            stats[arm]["detectable_80"][name] = detectable_change(spread, int(count), level, POWER)
    exclude = {reference_name, experiment.baseline} | {a.name for a in experiment.arms if a.control}
    correct(experiment, per_seed, stats, tables, questions, exclude)
    curve, base_runs = curve_metric(metrics), runs.get(experiment.baseline, {})
    shares = average_shares(
        [domain_shares(rows, base_tiles.get(seed), curve) for seed, rows in base_runs.items()]
    )
    by_region = average_shares([region_shares(base_tiles.get(seed), curve) for seed in base_runs])
    if by_region and has_region_gains(curve):
        gains = [region_gains(base_tiles[seed], curve) for seed in base_runs if seed in base_tiles]
        by_region[REGION_GAIN] = {  # over the seeds that have the region
            region: float(np.mean([run[region] for run in gains if region in run]))
            for region in dict.fromkeys(region for run in gains for region in run)
        }
    return Summary(
        per_seed,
        stats,
        tables,
        reference_name,
        questions,
        level,
        shares,
        region_shares=by_region,
        other_units=frozenset(other_units),
    )


def average_shares(runs: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The mean over runs of each measure's share per domain."""
    labels = dict.fromkeys(label for run in runs for label in run)
    return {
        label: {
            d: float(np.mean([run[label].get(d, 0.0) for run in runs if label in run]))
            for d in dict.fromkeys(d for run in runs for d in run.get(label, {}))
        }
        for label in labels
    }


def differences(
    per_seed: Mapping[str, Mapping[int, Mapping[str, Any]]], arm: str, baseline: str, name: str
) -> tuple[float, ...] | None:
    """The per-seed differences of a column, scaled to the largest (None for a censored
    value): two tests with the same tuple are the same test, one column a multiple of the
    other (spikes per epoch and per step; a column read at equal steps where that is the
    end). All zeros: a test that is null by construction."""
    seeds = sorted(per_seed[arm].keys() & per_seed.get(baseline, {}).keys())
    pairs = [(per_seed[arm][s].get(name), per_seed[baseline][s].get(name)) for s in seeds]
    if any(a is None or b is None for a, b in pairs):
        return None
    diffs = np.array([a - b for a, b in pairs], dtype=np.float64)
    largest = np.abs(diffs).max(initial=0.0)
    return tuple(np.round(diffs / largest, 9)) if largest > 0 else tuple(diffs * 0)


def correct(
    experiment: Experiment,
    per_seed: Mapping[str, Mapping[int, Mapping[str, Any]]],
    stats: dict[str, dict[str, dict[str, float | None]]],
    tables: Sequence[Table],
    questions: Mapping[str, str],
    exclude: set[str],
) -> None:
    """Fill ``adjusted_p``. The primary endpoints form one family, one test per question;
    every table's other tests form an exploratory family each. A family leaves out the
    controls and the reference row (they check the experiment, they are not its questions),
    tests null by construction (every per-seed difference zero) and duplicates (differences
    a multiple of those of a test already in this or an earlier family: a column read at
    equal steps where that is the run's end repeats the headline's)."""
    family = [
        (arm, name)
        for arm, name in questions.items()
        if stats[arm]["paired_p"].get(name) is not None
    ]
    families = [family]
    seen = {(arm, differences(per_seed, arm, experiment.baseline, name)) for arm, name in family}
    for table in tables:
        family = []
        for arm in stats:
            if arm in exclude:
                continue
            for column in table.columns:
                name = column.name
                if stats[arm]["paired_p"].get(name) is None or questions.get(arm) == name:
                    continue
                shape = differences(per_seed, arm, experiment.baseline, name)
                if shape is not None:
                    if not any(shape) or (arm, shape) in seen:
                        continue
                    seen.add((arm, shape))
                family.append((arm, name))
        families.append(family)
    for family in families:
        adjusted = adjust([stats[a]["paired_p"][c] for a, c in family], experiment.correction)
        for (arm, name), value in zip(family, adjusted, strict=True):
            stats[arm]["adjusted_p"][name] = value
