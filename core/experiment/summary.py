"""From the runs' ``metrics.jsonl`` rows to the numbers of the report.

The trainer's columns (spikes, steps, epochs to target, val_loss) exist for every task; the
task adds its own through ``report_metrics`` (``core.tasks.ReportMetric``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import accumulate
from typing import Any

import attrs

from core.experiment.schedule import Runs
from core.experiment.spec import Experiment
from core.experiment.stats import adjust, delta_pct, mean_std, paired_test
from core.tasks import ReportMetric

EQUAL_STEPS = "@equal_steps"
"""Suffix of the columns read at the epoch where every arm has had the same steps."""
STAT_ROWS = (
    "mean", "std", "count", "delta_pct", "paired_diff_mean", "paired_diff_std",
    "ci_low", "ci_high", "paired_p", "adjusted_p",
)  # fmt: skip


@attrs.frozen
class Column:
    name: str
    label: str
    higher_is_better: bool = False


@attrs.frozen
class Table:
    """One table of the report; its paired tests form one family for the correction."""

    title: str
    columns: tuple[Column, ...]


def tables_for(metrics: Sequence[ReportMetric], domains: Sequence[str]) -> list[Table]:
    """The headline (trainer and task columns), the view at equal steps, one per domain."""
    headline = [
        Column("spikes_per_100_epochs", "loss spikes / 100 epochs"),
        Column("spikes_per_1000_steps", "loss spikes / 1000 steps"),
        Column("steps", "optimizer steps"),
        Column("epochs_to_target", "epochs to target"),
        Column("final_val_loss", "final val_loss"),
        *(Column(m.key, m.label, m.higher_is_better) for m in metrics),
    ]
    equal = [
        Column(f"epoch{EQUAL_STEPS}", "epoch"),
        Column(f"steps{EQUAL_STEPS}", "optimizer steps"),
        Column(f"val_loss{EQUAL_STEPS}", "val_loss"),
        *(Column(f"{m.key}{EQUAL_STEPS}", m.label, m.higher_is_better) for m in metrics),
    ]
    tables = [Table("Headline", tuple(headline)), Table("At equal optimizer steps", tuple(equal))]
    for m in metrics:
        if m.by_domain:
            columns = tuple(Column(f"{m.key}_{d}", d, m.higher_is_better) for d in domains)
            tables.append(Table(f"{m.label[0].upper()}{m.label[1:]} per terrain", columns))
    return tables


def spikes_per_100_epochs(rows: Sequence[Mapping[str, Any]]) -> float:
    """Loss spikes (``core.spikes.spike_steps``, counted per epoch by the trainer) per 100
    epochs: the unit of the seed's §7.2."""
    return sum(row["loss_spikes"] for row in rows) / len(rows) * 100


def spikes_per_1000_steps(rows: Sequence[Mapping[str, Any]]) -> float:
    """Loss spikes per 1000 optimizer steps: fair where arms differ in steps per epoch
    (``curriculum`` trains on fewer tiles, so fewer steps, in its early epochs)."""
    return (
        sum(row["loss_spikes"] for row in rows) / max(1, sum(row["steps"] for row in rows)) * 1000
    )


def epochs_to_target(rows: Sequence[Mapping[str, Any]], target: float) -> int | None:
    """The first epoch whose val_loss is at or below ``target``; None if none is."""
    for row in rows:
        value = row.get("val_loss")
        if value is not None and value <= target:
            return int(row["epoch"])
    return None


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
    target: float | None,
    budget: int,
    metrics: Sequence[ReportMetric],
    domains: Sequence[str],
) -> dict[str, Any]:
    """One run's numbers (None where a value does not exist, e.g. a target not reached)."""
    final, equal = rows[-1], row_at_steps(rows, budget)
    values: dict[str, Any] = {
        "spikes_per_100_epochs": spikes_per_100_epochs(rows),
        "spikes_per_1000_steps": spikes_per_1000_steps(rows),
        "steps": sum(row["steps"] for row in rows),
        "epochs_to_target": None if target is None else epochs_to_target(rows, target),
        "target_loss": target,
        "final_val_loss": final.get("val_loss"),
        f"epoch{EQUAL_STEPS}": equal["epoch"],
        f"steps{EQUAL_STEPS}": sum(row["steps"] for row in rows if row["epoch"] <= equal["epoch"]),
        f"val_loss{EQUAL_STEPS}": equal.get("val_loss"),
    }
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


@attrs.define
class Summary:
    """Per arm and metric: the per-seed numbers, their mean, std and count, the change of the
    mean against the baseline (%), a paired test of the per-seed differences and its p-value
    after the table's correction."""

    per_seed: dict[str, dict[int, dict[str, Any]]]
    stats: dict[str, dict[str, dict[str, float | None]]]
    """arm -> row (``STAT_ROWS``) -> metric -> value."""
    tables: list[Table]
    reference_name: str
    """The task's reference row (dem_sr: bicubic); empty for a task without one."""

    @property
    def complete_runs(self) -> int:
        """The arms' finished runs; the task's reference row (``reference_name``) is none."""
        return sum(len(seeds) for arm, seeds in self.per_seed.items() if arm != self.reference_name)


def targets(experiment: Experiment, runs: Runs) -> dict[int, float | None]:
    """Per seed: ``--target-loss``, else the baseline's final val_loss with that seed."""
    baseline = runs.get(experiment.baseline, {})
    return {
        seed: experiment.target_loss
        if experiment.target_loss is not None
        else (baseline[seed][-1].get("val_loss") if seed in baseline else None)
        for seed in experiment.seeds
    }


def step_budgets(runs: Runs) -> dict[int, int]:
    """Per seed: the fewest optimizer steps any arm's run took, the budget of the equal-steps
    view (``curriculum`` takes fewer steps per epoch than the others)."""
    budgets: dict[int, int] = {}
    for seeds in runs.values():
        for seed, rows in seeds.items():
            steps = sum(row["steps"] for row in rows)
            budgets[seed] = min(budgets.get(seed, steps), steps)
    return budgets


def summarise(
    experiment: Experiment,
    runs: Runs,
    metrics: Sequence[ReportMetric],
    domains: Sequence[str],
    reference_name: str,
) -> Summary:
    seed_targets, budgets = targets(experiment, runs), step_budgets(runs)
    per_seed = {
        arm: {
            seed: run_metrics(rows, seed_targets[seed], budgets[seed], metrics, domains)
            for seed, rows in sorted(seeds.items())
        }
        for arm, seeds in runs.items()
    }
    reference = {
        seed: values
        for seeds in runs.values()
        for seed, rows in seeds.items()
        if (values := reference_metrics(rows[-1], metrics, domains)) is not None
    }
    if reference and reference_name:
        per_seed[reference_name] = dict(sorted(reference.items()))
    tables = tables_for(metrics, domains)
    base = per_seed.get(experiment.baseline, {})
    stats: dict[str, dict[str, dict[str, float | None]]] = {}
    for arm, seeds in per_seed.items():
        stats[arm] = {row: {} for row in STAT_ROWS}
        for column in (column for table in tables for column in table.columns):
            name = column.name
            values = {seed: run.get(name) for seed, run in seeds.items()}
            base_values = {seed: run.get(name) for seed, run in base.items()}
            mean, spread, count = mean_std(list(values.values()))
            censored = name == "epochs_to_target" and None in (
                *values.values(),
                *base_values.values(),
            )
            paired = None
            if arm != experiment.baseline and not censored:  # a target never reached: no number
                paired = paired_test(values, base_values, experiment.test)
            base_mean = mean_std(list(base_values.values()))[0]
            change = None if arm == experiment.baseline else delta_pct(mean, base_mean)
            cells = (mean, spread, count, change)
            cells += (
                (paired.mean, paired.std, paired.low, paired.high, paired.p, None)
                if paired
                else (None,) * 6
            )
            for row, value in zip(STAT_ROWS, cells, strict=True):
                stats[arm][row][name] = value
    correct(experiment, stats, tables, exclude={reference_name})
    return Summary(per_seed, stats, tables, reference_name)


def correct(
    experiment: Experiment,
    stats: dict[str, dict[str, dict[str, float | None]]],
    tables: Sequence[Table],
    exclude: set[str],
) -> None:
    """Fill ``adjusted_p`` with the table-wise corrected p-values. The family of a table is
    every tested (arm, column) in it, the control arms and the reference row excepted: they
    check the experiment, they are not its questions (their ``adjusted_p`` stays empty)."""
    controls = {arm.name for arm in experiment.arms if arm.control} | exclude
    for table in tables:
        family = [
            (arm, column.name)
            for arm in stats
            if arm not in controls
            for column in table.columns
            if stats[arm]["paired_p"].get(column.name) is not None
        ]
        adjusted = adjust([stats[a]["paired_p"][c] for a, c in family], experiment.correction)
        for (arm, name), value in zip(family, adjusted, strict=True):
            stats[arm]["adjusted_p"][name] = value
