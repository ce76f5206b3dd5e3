"""The report: Markdown tables, the controls' verdict, a CSV of every number, and plots."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from core.config import Config, load_config
from core.experiment.schedule import Runs, collect, collect_tiles, is_complete, run_dir_of
from core.experiment.spec import Arm, Experiment
from core.experiment.stats import smallest_p
from core.experiment.summary import (
    EQUAL_STEPS,
    REGION_GAIN,
    STAT_ROWS,
    Column,
    Summary,
    curve_metric,
    has_region_gains,
    per_1000_steps,
    probe_series,
    region_gains,
    summarise,
)
from core.experiment.tune import tuning_section
from core.run_folder import CONFIG
from core.spikes import probe_rise
from core.tasks import ReportMetric, get_task

QUESTIONS_PNG = "questions.png"
"""Each question's primary endpoint: the seeds' paired differences and both intervals."""
REGION_GAINS_PNG = "region_gains_by_arm.png"
"""Each validation region's gain over the reference, per arm: the cross-terrain row."""
CORRECTED = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "no"}
TEST_NAMES = {
    "signflip": "exact paired sign-flip test",
    "t": "paired t-test",
    "wilcoxon": "Wilcoxon signed-rank test",
}


def decimals_for(value: float) -> int:
    """About four significant digits: 2.651, 32.83, 148.4, 1234."""
    if value == 0:
        return 2
    return min(3, max(0, 3 - math.floor(math.log10(abs(value)))))


def marks(experiment: Experiment, summary: Summary, arm: str, name: str) -> str:
    """``*``: the paired test gives p < alpha; ``†``: it still does after its family's
    correction (the primary endpoints', or the table's exploratory tests')."""
    stats = summary.stats[arm]
    p, adjusted = stats["paired_p"].get(name), stats["adjusted_p"].get(name)
    text = "*" if p is not None and p < experiment.alpha else ""
    if text and adjusted is not None and adjusted < experiment.alpha:
        text += "†"
    return text


def censored_median(values: Sequence[float | None]) -> float:
    """The median where None (never reached) is later than any value: ``inf`` when half
    the runs or more never got there."""
    ordered = sorted(math.inf if value is None else value for value in values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def cell(experiment: Experiment, summary: Summary, arm: str, column: Column) -> str:
    """``mean ± std (Δ%)`` followed by the test's marks; bold for the arm's primary
    endpoint. A censored column gives the median over the seeds, a run that never got
    there counting as later than any, and ``(k/n reached)``."""
    name, stats, runs = column.name, summary.stats[arm], summary.per_seed[arm]
    mean, spread = stats["mean"].get(name), stats["std"].get(name)
    mark = marks(experiment, summary, arm, name)
    if column.censored and any(name in run for run in runs.values()):
        values = [run.get(name) for run in runs.values()]
        median = censored_median(values)
        text = "never" if math.isinf(median) else f"{median:.0f}"
        reached = sum(value is not None for value in values)
        text = f"median {text} ({reached}/{len(values)} reached)"
    elif mean is None:
        return "–"
    else:
        digits = 1 if name == f"epoch{EQUAL_STEPS}" else decimals_for(mean)
        text = f"{mean:.{digits}f} ± {spread:.{digits}f}"
    change = stats["delta_pct"].get(name)
    if change is not None:
        text += f" ({change:+.1f}%{mark})"
    elif mark:
        text += f" ({mark})"
    return f"**{text}**" if summary.questions.get(arm) == name else text


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


def spike_verdict(
    experiment: Experiment, runs: Runs, injected: Sequence[int], probe_every: int
) -> list[str]:
    """Whether the model-spike measure behaved on its controls: none on the ``frozen`` arm
    (a model that does not learn, fed the arm's batches) and one within ``probe_every``
    steps of each of the ``unstable`` arm's ``injected`` steps, in every seed."""
    lines = []
    frozen, unstable = experiment.control("frozen"), experiment.control("unstable")
    if frozen is not None and runs.get(frozen.name):
        seeds = runs[frozen.name]
        spikes = sum(row["model_spikes"] for rows in seeds.values() for row in rows)
        rise = max(probe_rise(probe_series(rows)[1]) for rows in seeds.values())
        outliers = [per_1000_steps(rows, "batch_loss_outliers") for rows in seeds.values()]
        state = "as it must" if spikes == 0 else "**so the measure moves without learning**"
        lines.append(
            f"The frozen control `{frozen.name}` shows {spikes} model spikes over "
            f"{len(seeds)} seeds (largest probe loss rise {rise:.3g}), {state}; its batches "
            f"still give {sum(outliers) / len(outliers):.1f} batch-loss outliers / 1000 "
            "steps, which the batches' spread alone makes."
        )
    if unstable is not None and runs.get(unstable.name):
        seeds = runs[unstable.name]
        missed = [
            (seed, step)
            for seed, rows in seeds.items()
            for step in injected
            if not any(
                step <= found < step + probe_every
                for row in rows
                for found in row.get("model_spike_steps", [])
            )
        ]
        where = ", ".join(map(str, injected)) or "none"
        misses = ", ".join(f"step {step} of seed {seed}" for seed, step in missed)
        found = f"**but misses** {misses}" if missed else "in every seed, as it must"
        lines.append(
            f"The unstable control `{unstable.name}` (learning rate multiplied at steps "
            f"{where}) has a model spike within {probe_every} step{'s' if probe_every > 1 else ''} "
            "of each injected step "
            f"{found}."
        )
    return lines


def questions_section(
    experiment: Experiment, summary: Summary, tables_columns: dict[str, Column]
) -> list[str]:
    """One row per question: its primary endpoint's test, intervals, corrected p, the change
    it could detect and what it says."""
    if not summary.questions:
        return []
    family = len(summary.questions)
    level = summary.level
    lines = [
        "## Questions",
        "",
        f"Each arm asks one question of `{experiment.baseline}`, decided on its primary "
        f"endpoint (bold in the tables below); every other cell is exploratory. The "
        f"family of primary endpoints holds {family} test{'s' if family > 1 else ''} "
        f"({TEST_NAMES[experiment.test]}), under the {CORRECTED[experiment.correction]} "
        "correction: the smallest p must clear "
        f"{level:.3g}. Intervals: 95 % of the mean paired difference, over seeds (Student t) "
        "and over seeds and validation tiles (hierarchical bootstrap over seeds and regions "
        "of tiles). Detectable: the change a test at the corrected level finds with 80 % "
        "power, from the arm's paired spread (normal approximation).",
        "",
        "| arm | primary endpoint | paired change | over seeds | over seeds and tiles | p | "
        "adjusted p | detectable | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def number(value: float | None, spec: str = "+") -> str:
        return "–" if value is None else f"{value:{spec}.{decimals_for(value)}f}"

    def p_text(value: float | None) -> str:
        return "–" if value is None else f"{value:.3g}"

    def interval(low: float | None, high: float | None) -> str:
        return "–" if low is None or high is None else f"[{number(low)}, {number(high)}]"

    for arm, name in summary.questions.items():
        stats = {row: summary.stats[arm][row].get(name) for row in STAT_ROWS}
        column = tables_columns[name]
        n = int(stats["count"] or 0)
        floor = smallest_p(n, experiment.test)
        adjusted = stats["adjusted_p"]
        if stats["paired_p"] is None:
            verdict = "no test (fewer than 2 paired seeds)"
        elif floor > level:
            verdict = f"cannot be decided: with {n} seeds the smallest p is {floor:.3g}"
        elif adjusted is not None and adjusted < experiment.alpha:
            better = ((stats["paired_diff_mean"] or 0) > 0) == column.higher_is_better
            verdict = "**better**" if better else "**worse**"
        else:
            verdict = "no difference shown"
        change = "" if stats["delta_pct"] is None else f" ({stats['delta_pct']:+.2f} %)"
        lines.append(
            f"| `{arm}` | {column.label} | {number(stats['paired_diff_mean'])}{change} | "
            f"{interval(stats['ci_low'], stats['ci_high'])} | "
            f"{interval(stats['boot_low'], stats['boot_high'])} | "
            f"{p_text(stats['paired_p'])} | {p_text(adjusted)} | "
            f"{number(stats['detectable_80'], '')} | {verdict} |"
        )
    lines.append("")
    return lines


def shares_section(experiment: Experiment, summary: Summary) -> list[str]:
    """Which domain carries how much of each measure, for the baseline (mean over seeds)."""
    return shares_table(
        f"Which terrain carries each measure (`{experiment.baseline}`)",
        "Each terrain's share in %, mean over the seeds: of the training windows and the "
        "training loss (last epoch, `[loss]` base weights), of the validation tiles, of "
        "val_loss and of the sum behind the primary metric (its numerator over the tiles).",
        "terrain",
        summary.shares,
        summary.reference_name,
    )


def regions_section(experiment: Experiment, summary: Summary) -> list[str]:
    """Which held-out region carries how much of each measure, and its gain over the
    reference, for the baseline (mean over seeds): a pooled metric is mostly its regions with
    the largest errors."""
    return shares_table(
        f"Which region carries each measure (`{experiment.baseline}`)",
        "Each validation region's share in %, mean over the seeds: of the validation tiles, "
        "of val_loss and of the sum behind the primary metric; and its gain over the "
        "reference in the primary metric, pooled over its tiles (region_gains_by_arm.png).",
        "region",
        summary.region_shares,
        summary.reference_name,
    )


def shares_table(
    title: str,
    legend: str,
    row: str,
    shares: Mapping[str, Mapping[str, float]],
    reference: str,
) -> list[str]:
    """A section of one row per ``row`` (terrain, region) and one column per measure, each
    cell its share in %, or for ``REGION_GAIN`` its gain over ``reference`` in %; nothing
    without shares."""
    if not shares:
        return []
    labels = list(shares)
    names = list(dict.fromkeys(name for values in shares.values() for name in values))
    header = [label.replace("the reference", reference) for label in labels]
    lines = [
        f"## {title}",
        "",
        legend,
        "",
        f"| {row} | " + " | ".join(header) + " |",
        "| --- | " + " | ".join("---" for _ in labels) + " |",
    ]
    for name in names:
        cells = (
            f"{shares[label].get(name, 0.0):+.1f}"
            if label == REGION_GAIN
            else f"{100 * shares[label].get(name, 0.0):.1f}"
            for label in labels
        )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def other_units_note(experiment: Experiment, summary: Summary) -> list[str]:
    """Which arms' losses are normalised otherwise than the baseline's: their val_loss
    cells are shown without a comparison, and the loss panels of the plots leave them out."""
    if not summary.other_units:
        return []
    arms = ", ".join(f"`{arm}`" for arm in sorted(summary.other_units))
    return [
        "",
        f"{arms} normalise the elevations otherwise than `{experiment.baseline}` "
        "(`data.normalisation`): their losses are in other units, so their val_loss cells "
        "carry no change or test, and loss_curves_by_arm.png leaves them out of the loss "
        "panels.",
    ]


def fractions_note(experiment: Experiment, summary: Summary, curve: Column) -> str:
    """How the steps-to-a-fraction columns read, as a sentence of the legend (nothing for a
    task without them). A baseline that ends no better than the reference on the curve's
    metric has no gain to take fractions of: the columns stay empty, and the note says why."""
    reference, baseline = summary.reference_name, experiment.baseline
    columns = [c.name for table in summary.tables for c in table.columns]
    if not any(name.startswith("steps_to_") for name in columns):
        return ""  # no reference on the curve: no such columns, nothing to say
    reached = any(
        name.startswith("steps_to_")
        for seeds in summary.per_seed.values()
        for run in seeds.values()
        for name in run
    )
    base = summary.stats.get(baseline, {}).get("mean", {}).get(curve.name)
    ref = summary.stats.get(reference, {}).get("mean", {}).get(curve.name)
    if not reached and base is not None and ref is not None:
        return (
            f"Steps to a fraction of the gain: none, since `{baseline}` ends no better than "
            f"{reference} in {curve.label} ({base:.4g} against {ref:.4g}): there is no gain "
            "to take fractions of, and the mean over the curve is the convergence measure. "
        )
    return (
        "Steps to a fraction of the gain: the first validation step at which the run has "
        "that fraction of the baseline's mean final gain over the reference, the median over "
        "seeds (a run that never got there counts as later than any), tested by the exact "
        "sign test. "
    )


def markdown(
    experiment: Experiment, summary: Summary, primary: Column, spikes: Sequence[str] = ()
) -> str:
    """The controls' verdict (``spikes``: :func:`spike_verdict`'s lines), the questions, the
    domains' shares and one table per ``summary.tables``, after a legend."""
    reference = summary.reference_name
    order = [arm.name for arm in experiment.arms if arm.name in summary.per_seed]
    if reference in summary.per_seed:
        order.append(reference)
    arms = {arm.name: arm for arm in experiment.arms}
    common = ", ".join(f"`{s}`" for s in experiment.common) or "none"
    columns = {c.name: c for table in summary.tables for c in table.columns}
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
        "correction over its family: the primary endpoints (bold), or the table's other, "
        "exploratory tests (controls, budgets, tests null by construction and duplicates "
        f"left out). {fractions_note(experiment, summary, primary)}"
        "At equal optimizer steps: each run read at its last epoch within the fewest steps "
        "any arm took with that seed. Batch-loss outliers and model spikes: see "
        "docs/experiments.md, step_losses_by_arm.png and probe_losses_by_arm.png.",
        *other_units_note(experiment, summary),
        "",
        "## Controls",
        "",
        *control_verdict(experiment, summary, primary),
        *spikes,
        "",
        *questions_section(experiment, summary, columns),
        *shares_section(experiment, summary),
        *regions_section(experiment, summary),
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
            cells = " | ".join(cell(experiment, summary, name, c) for c in table.columns)
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


def first_run_config(experiment: Experiment, out: Path, arm: Arm) -> Config | None:
    """The config.toml of ``arm``'s first complete run: what every seed of it shares."""
    for seed in experiment.seeds:
        run_dir = run_dir_of(out, arm, seed)
        if is_complete(run_dir):
            return load_config(run_dir / CONFIG)
    return None


def injected_steps(experiment: Experiment, out: Path) -> tuple[tuple[int, ...], int]:
    """The ``unstable`` control's ``optim.lr_spike_steps`` and ``train.probe_every``, from
    its runs' config (every seed has the same)."""
    arm = experiment.control("unstable")
    config = first_run_config(experiment, out, arm) if arm is not None else None
    if config is None:
        return (), 0
    return tuple(config.optim.lr_spike_steps), config.train.probe_every


def loss_scales(experiment: Experiment, out: Path) -> dict[str, float | None]:
    """Each arm's elevation scale, from its runs' config (``DataSection.global_scale``, None
    for per-window scales): the units of its losses."""
    scales = {}
    for arm in experiment.arms:
        if (config := first_run_config(experiment, out, arm)) is not None:
            scales[arm.name] = config.data.global_scale
    return scales


def write_report(experiment: Experiment, out: Path, report_dir: Path) -> Summary:
    """Tables, CSV and plots from the complete runs under ``out``."""
    from core.experiment.plots import (
        arm_colours,
        plot_domain_metrics_by_arm,
        plot_loss_curves_by_arm,
        plot_probe_losses_by_arm,
        plot_questions,
        plot_region_gains,
        plot_step_losses_by_arm,
    )

    task = get_task(experiment.task)
    runs: Runs = collect(experiment, out)
    tiles = collect_tiles(experiment, out)
    scales = loss_scales(experiment, out)
    base_scale = scales.get(experiment.baseline)
    other_units = {arm for arm, scale in scales.items() if scale != base_scale}
    summary = summarise(
        experiment,
        runs,
        task.report_metrics,
        task.terrains,
        task.reference_name,
        tiles,
        other_units,
    )
    report_dir.mkdir(parents=True, exist_ok=True)
    primary = primary_column(task.report_metrics)
    spikes = spike_verdict(experiment, runs, *injected_steps(experiment, out))
    text = markdown(experiment, summary, primary, spikes) + tuning_section(experiment, out)
    (report_dir / "results.md").write_text(text)
    write_csv(report_dir / "results.csv", experiment, summary)
    baseline = experiment.baseline
    plot_loss_curves_by_arm(
        runs, report_dir / "loss_curves_by_arm.png", baseline=baseline, other_units=other_units
    )
    plot_step_losses_by_arm(runs, report_dir / "step_losses_by_arm.png")
    plot_probe_losses_by_arm(runs, report_dir / "probe_losses_by_arm.png")
    colours = dict(zip(runs, arm_colours(len(runs)), strict=True))  # as every figure has them
    if summary.questions and baseline in summary.per_seed:
        plot_questions(summary, baseline, experiment.alpha, colours, report_dir / QUESTIONS_PNG)
    curve = curve_metric(task.report_metrics)
    if tiles and has_region_gains(curve):
        shown = {arm.name for arm in experiment.arms if arm.control in (None, "sham")}
        gains = {  # the frozen, unstable and harmful controls would only stretch the axis
            arm: {seed: region_gains(columns, curve) for seed, columns in seeds.items()}
            for arm, seeds in tiles.items()
            if arm in shown
        }
        plot_region_gains(
            gains, colours, task.reference_name, curve.label, report_dir / REGION_GAINS_PNG
        )
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
