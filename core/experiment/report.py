"""The report: Markdown tables, the controls' verdict, a CSV of every number, and plots."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from core.experiment.schedule import Runs, collect
from core.experiment.spec import Experiment
from core.experiment.summary import EQUAL_STEPS, STAT_ROWS, Column, Summary, summarise
from core.tasks import ReportMetric, get_task

CORRECTED = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "no"}
TEST_NAMES = {"t": "paired t-test", "wilcoxon": "Wilcoxon signed-rank test"}


def decimals_for(value: float) -> int:
    """About four significant digits: 2.651, 32.83, 148.4, 1234."""
    if value == 0:
        return 2
    return min(3, max(0, 3 - math.floor(math.log10(abs(value)))))


def marks(experiment: Experiment, summary: Summary, arm: str, name: str) -> str:
    """``*``: the paired test gives p < alpha; ``†``: it still does after the correction."""
    stats = summary.stats[arm]
    p, adjusted = stats["paired_p"].get(name), stats["adjusted_p"].get(name)
    text = "*" if p is not None and p < experiment.alpha else ""
    if text and adjusted is not None and adjusted < experiment.alpha:
        text += "†"
    return text


def cell(experiment: Experiment, summary: Summary, arm: str, name: str) -> str:
    """``mean ± std (Δ%)`` followed by the test's marks."""
    stats = summary.stats[arm]
    mean, spread = stats["mean"].get(name), stats["std"].get(name)
    seeds = len(summary.per_seed[arm])
    if mean is None:
        had_target = any(v.get("target_loss") is not None for v in summary.per_seed[arm].values())
        return f"none reached (0/{seeds})" if name == "epochs_to_target" and had_target else "–"
    digits = 1 if name in ("epochs_to_target", f"epoch{EQUAL_STEPS}") else decimals_for(mean)
    text = f"{mean:.{digits}f} ± {spread:.{digits}f}"
    if name == "epochs_to_target" and stats["count"][name] < seeds:
        text += f" ({stats['count'][name]:.0f}/{seeds} reached)"
    change = stats["delta_pct"].get(name)
    if change is not None:
        text += f" ({change:+.1f}%{marks(experiment, summary, arm, name)})"
    return text


def control_verdict(experiment: Experiment, summary: Summary, primary: Column) -> list[str]:
    """Whether the controls behaved: the sham arm with no significant difference and the
    harmful arm significantly worse, in the primary column at the uncorrected level. When
    either fails, the experiment has no power to tell effects from noise, and says so."""
    sham, harmful = experiment.control("sham"), experiment.control("harmful")
    if sham is None and harmful is None:
        return ["No control arms: the experiment's power is unchecked."]
    alpha, lines, failed = experiment.alpha, [], []

    def paired(arm: str) -> tuple[float | None, float | None]:
        stats = summary.stats.get(arm)
        if stats is None:
            return None, None
        return stats["paired_diff_mean"].get(primary.name), stats["paired_p"].get(primary.name)

    if sham is not None:
        diff, p = paired(sham.name)
        if p is None:
            failed.append(f"the sham arm `{sham.name}` has fewer than 2 seeds paired")
        elif p < alpha:
            failed.append(
                f"the sham arm `{sham.name}` differs significantly from the baseline in "
                f"{primary.label} (p = {p:.3g}), so differences of that size arise by chance"
            )
        else:
            lines.append(
                f"The sham arm `{sham.name}` shows no significant difference in {primary.label} "
                f"(p = {p:.3g}), as it must."
            )
    if harmful is not None:
        diff, p = paired(harmful.name)
        worse = diff is not None and (diff < 0 if primary.higher_is_better else diff > 0)
        if p is None:
            failed.append(f"the harmful arm `{harmful.name}` has fewer than 2 seeds paired")
        elif p >= alpha or not worse:
            failed.append(
                f"the harmful arm `{harmful.name}` is not significantly worse in {primary.label} "
                f"(p = {p:.3g}, mean paired difference {diff:+.4g})"
            )
        else:
            lines.append(
                f"The harmful arm `{harmful.name}` is significantly worse in {primary.label} "
                f"(p = {p:.3g}, mean paired difference {diff:+.4g}), as it must."
            )
    missing = [kind for kind, arm in (("sham", sham), ("harmful", harmful)) if arm is None]
    if failed:
        lines.append(
            "**The experiment has no power:** " + "; ".join(failed) + ". Read no difference "
            "in these tables as an effect."
        )
    elif missing:
        lines.append(f"No {missing[0]} control arm: the power is checked only in part.")
    else:
        lines.append("The controls hold: the experiment tells a gross effect from noise.")
    return lines


def markdown(experiment: Experiment, summary: Summary, primary: Column) -> str:
    """One table per ``summary.tables``, after a legend and the controls' verdict."""
    reference = summary.reference_name
    order = [arm.name for arm in experiment.arms if arm.name in summary.per_seed]
    if reference in summary.per_seed:
        order.append(reference)
    arms = {arm.name: arm for arm in experiment.arms}
    target = (
        f"val_loss {experiment.target_loss}"
        if experiment.target_loss is not None
        else "the baseline's final val_loss with the same seed"
    )
    common = ", ".join(f"`{s}`" for s in experiment.common) or "none"
    lines = [
        "# Experiment results",
        "",
        f"{summary.complete_runs} of {len(experiment.arms) * len(experiment.seeds)} runs complete: "
        f"{len(experiment.arms)} arms × {len(experiment.seeds)} seeds "
        f"({', '.join(map(str, experiment.seeds))}) × {experiment.epochs} epochs; "
        f"data: {experiment.data or 'the built-in data.source'}; common overrides: {common}.",
        "",
        "Each cell: mean ± sample std over seeds, then the change of the mean against "
        f"`{experiment.baseline}` in %; * marks a change whose {TEST_NAMES[experiment.test]} over "
        f"seeds (pairs of runs with the same seed; every run validates on the same tiles) gives "
        f"p < {experiment.alpha}, † one that survives the {CORRECTED[experiment.correction]} "
        "correction over the table's tests (control arms excepted). "
        f"Epochs to target: the first epoch whose val_loss is at or below {target}; "
        "its mean is over the seeds that reached it. At equal optimizer steps: each run read "
        "at its last epoch within the fewest steps any arm took with that seed. "
        "Loss spikes: see docs/experiments.md and step_losses_by_arm.png.",
        "",
        "## Controls",
        "",
        *control_verdict(experiment, summary, primary),
        "",
    ]
    for table in summary.tables:
        lines.extend([f"## {table.title}", ""])
        lines.append("| arm | seeds | " + " | ".join(c.label for c in table.columns) + " |")
        lines.append("| --- | --- | " + " | ".join("---" for _ in table.columns) + " |")
        for name in order:
            arm = arms.get(name)
            extra = f" ({', '.join(f'`{s}`' for s in arm.set)})" if arm and arm.set else ""
            role = f" [{arm.control}]" if arm and arm.control else ""
            label = f"{name} (reference)" if name == reference else f"`{name}`{extra}{role}"
            cells = " | ".join(cell(experiment, summary, name, c.name) for c in table.columns)
            lines.append(f"| {label} | {len(summary.per_seed[name])} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def write_csv(path: Path, experiment: Experiment, summary: Summary) -> None:
    """One row per (arm, seed) with the raw numbers, then one row per statistic and arm
    (``seed`` column = ``mean``, ``std``, ``count``, ``delta_pct``, ``paired_diff_mean``, ...)."""
    info = {arm.name: (",".join(arm.plugins), "; ".join(arm.set)) for arm in experiment.arms}
    names = list(
        dict.fromkeys(
            n for seeds in summary.per_seed.values() for run in seeds.values() for n in run
        )
    )
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["arm", "plugins", "overrides", "seed", *names])
        for arm, seeds in summary.per_seed.items():
            plugins, overrides = info.get(arm, ("", ""))
            rows = [(str(seed), values) for seed, values in seeds.items()]
            rows += [(stat, summary.stats[arm][stat]) for stat in STAT_ROWS]
            for seed, values in rows:
                cells = ("" if values.get(n) is None else values[n] for n in names)
                writer.writerow([arm, plugins, overrides, seed, *cells])


def primary_column(metrics: Sequence[ReportMetric]) -> Column:
    """The column the controls' verdict reads: the task's first metric, else val_loss."""
    if metrics:
        return Column(metrics[0].key, metrics[0].label, metrics[0].higher_is_better)
    return Column("final_val_loss", "final val_loss")


def write_report(experiment: Experiment, out: Path, report_dir: Path) -> Summary:
    """Tables, CSV and plots from the complete runs under ``out``."""
    from core.experiment.plots import (
        plot_domain_metrics_by_arm,
        plot_loss_curves_by_arm,
        plot_step_losses_by_arm,
    )

    task = get_task(experiment.task)
    runs: Runs = collect(experiment, out)
    summary = summarise(experiment, runs, task.report_metrics, task.terrains, task.reference_name)
    report_dir.mkdir(parents=True, exist_ok=True)
    primary = primary_column(task.report_metrics)
    (report_dir / "results.md").write_text(markdown(experiment, summary, primary))
    write_csv(report_dir / "results.csv", experiment, summary)
    baseline = experiment.baseline
    plot_loss_curves_by_arm(runs, report_dir / "loss_curves_by_arm.png", baseline=baseline)
    plot_step_losses_by_arm(runs, report_dir / "step_losses_by_arm.png")
    if any(metric.by_domain for metric in task.report_metrics):
        plot_domain_metrics_by_arm(
            runs,
            report_dir / "terrain_rmse_by_arm.png",
            task.report_metrics,
            task.terrains,
            task.reference_name,
            baseline=baseline,
        )
    return summary
