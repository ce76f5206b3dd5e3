"""Tuned arms: a search chooses some of an arm's settings on a tuning split, then the arm
runs like every other arm.

The search is Optuna's TPE sampler, seeded. Three spatial sets stay apart: a trial run trains
on the experiment's data without the tuning regions and without the reported validation
regions (``data.exclude_regions``), and validates on the tuning regions only
(``data.val_regions``), so no trial trains or validates on the set the report scores. The
arm's own runs then train with the chosen settings and validate on the experiment's regions.

A trial's runs are ordinary runs in ``<out>/<arm>/tuning/trial<k>/seed<s>/``, run by the
experiment's backend, so a restarted search replays its finished trials into the sampler,
which asks for the same next settings. ``search.json`` beside them records every trial, the
chosen one and the budget spent; the report shows it.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from core.config import load_config, unstructure
from core.data.spatial_split import split_folders
from core.errors import RAY_INSTALL, UsageError
from core.experiment.schedule import Job, is_complete, plan_job, read_rows
from core.experiment.spec import Arm, Experiment, Param, Search, run_overrides
from core.plugins import PluginManager
from core.tasks import Task

SEARCH = "search.json"

RunJobs = Callable[[list[Job], int], list[Job]]
"""Runs the jobs (of that many epochs each) through the experiment's backend; returns the
failed ones."""


def tuning_dir(out: Path, arm: Arm) -> Path:
    return out / arm.slug / "tuning"


def assignments(search: Search, params: dict[str, Any]) -> tuple[str, ...]:
    """``--set`` assignments of a trial's settings; a choice is written as given."""
    return tuple(
        f"{key}={value if search.params[key].choices else json.dumps(value)}"
        for key, value in params.items()
    )


def reported_regions(experiment: Experiment, arm: Arm) -> list[str]:
    """The regions the report scores the arm on: its runs' ``data.val_regions``."""
    config = load_config(None, run_overrides(experiment, arm, 0, Path("unused")))
    return list(config.data.val_regions)


def trial_runs(
    experiment: Experiment, arm: Arm, number: int, params: dict[str, Any]
) -> tuple[Experiment, Arm]:
    """(experiment, arm) of trial ``number``'s runs: the arm's settings and the trial's,
    validated on the tuning regions, the reported ones left out."""
    search = arm.tune
    assert search is not None
    split = (
        f"data.val_regions={json.dumps(list(search.regions))}",
        f"data.exclude_regions={json.dumps(reported_regions(experiment, arm))}",
    )
    trial = attrs.evolve(
        arm,
        name=f"{arm.name} trial {number}",
        set=(*arm.set, *assignments(search, params), *split),
        tune=None,
    )
    return attrs.evolve(experiment, epochs=search.epochs or experiment.epochs), trial


def objective(search: Search, task: Task) -> tuple[str, bool]:
    """(metrics.jsonl key, higher is better) of what the search optimises."""
    directions = {metric.key: metric.higher_is_better for metric in task.report_metrics}
    directions["val_loss"] = False
    key = search.metric or next(iter(directions))
    if key not in directions:
        raise UsageError(f"tune.metric {key!r} is not one of {', '.join(directions)}")
    return key, directions[key]


def sample(param: Param) -> Any:
    """A value inside ``param``'s range, to check the key before any run."""
    if param.choices:
        return param.choices[0]
    return int(param.low) if param.integer else param.low


def check_searches(experiment: Experiment, task: Task) -> None:
    """Every tuned arm's search, checked before any run (exit 2 naming the arm): a tuning
    split apart from the reported one, keys that exist, a metric the runs write."""
    for arm in experiment.arms:
        if arm.tune is None:
            continue
        try:
            objective(arm.tune, task)
            reported = reported_regions(experiment, arm)
            if not reported:
                raise UsageError(
                    "a tuned arm needs the experiment to validate on named regions "
                    "(data.val_regions), so that its search can leave them unread"
                )
            if shared := sorted(set(reported) & set(arm.tune.regions)):
                raise UsageError(
                    f"tune.regions {shared} are reported validation regions too; the "
                    "tuning split must be apart from them"
                )
            params = {key: sample(param) for key, param in arm.tune.params.items()}
            trial_experiment, trial = trial_runs(experiment, arm, 0, params)
            config = load_config(None, run_overrides(trial_experiment, trial, 0, Path("unused")))
            PluginManager.from_names(config.run.plugins, config.plugins)
            if config.data.dir:  # a folder split into train/ and val/ cannot split by region
                split_folders(Path(config.data.dir), config.data)
        except UsageError as error:
            raise UsageError(f"arm {arm.name!r}: {error}") from None


def distributions(search: Search) -> dict[str, Any]:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    space: dict[str, Any] = {}
    for key, param in search.params.items():
        if param.choices:
            space[key] = CategoricalDistribution(param.choices)
        elif param.integer:
            space[key] = IntDistribution(int(param.low), int(param.high), log=param.log)
        else:
            space[key] = FloatDistribution(param.low, param.high, log=param.log)
    return space


def run_search(
    experiment: Experiment, arm: Arm, out: Path, task: Task, run_jobs: RunJobs
) -> list[Job]:
    """Run ``arm``'s search to its budget, batch by batch, writing ``search.json`` after
    each; returns the failed runs. Finished trials are read back, not run again."""
    try:
        import optuna
    except ImportError:
        raise UsageError(
            f"arm {arm.name!r} declares a search, which needs Optuna: {RAY_INSTALL}"
        ) from None
    search = arm.tune
    assert search is not None
    metric, higher = objective(search, task)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize" if higher else "minimize",
        sampler=optuna.samplers.TPESampler(seed=search.sampler_seed),
    )
    space, trials, failed = distributions(search), [], []
    for first in range(0, search.trials, search.batch):
        asked = [study.ask(space) for _ in range(first, min(first + search.batch, search.trials))]
        jobs = {
            trial.number: trial_jobs(experiment, arm, out, trial.number, trial.params)
            for trial in asked
        }
        todo = [job for batch in jobs.values() for job in batch if job.command]
        failed += run_jobs(todo, search.epochs or experiment.epochs)
        for trial in asked:
            record = score(trial.number, trial.params, jobs[trial.number], metric)
            if record["value"] is None:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(trial, record["value"])
            trials.append(record)
            value = "failed" if record["value"] is None else f"{record['value']:.4g}"
            print(
                f"search {arm.name}: trial {trial.number} {metric} {value} "
                f"({len(trials)} of {search.trials} trials)",
                flush=True,
            )
        write_search(experiment, arm, out, metric, higher, trials)
    if all(trial["value"] is None for trial in trials):
        print(f"search {arm.name}: no trial finished, so the arm cannot run", file=sys.stderr)
    return failed


def trial_jobs(
    experiment: Experiment, arm: Arm, out: Path, number: int, params: dict[str, Any]
) -> list[Job]:
    """Trial ``number``'s runs; a restart replays the same trials, and a folder holding other
    settings is refused as any run folder is."""
    assert arm.tune is not None
    trial_experiment, trial = trial_runs(experiment, arm, number, params)
    folder = tuning_dir(out, arm) / f"trial{number}"
    return [plan_job(trial_experiment, trial, s, folder / f"seed{s}") for s in arm.tune.seeds]


def score(number: int, params: dict[str, Any], jobs: list[Job], metric: str) -> dict[str, Any]:
    """A trial's record: its value (the mean over its runs of the metric at their last
    epoch; None if a run did not finish), optimizer steps and training seconds."""
    rows = [read_rows(job.run_dir) if is_complete(job.run_dir) else [] for job in jobs]
    complete = [run for run in rows if run]
    value = statistics.fmean(run[-1][metric] for run in rows) if all(rows) else None
    return {
        "trial": number,
        "params": params,
        "value": value,
        "runs": len(complete),
        "steps": sum(row.get("steps", 0) for run in complete for row in run),
        "seconds": sum(row.get("seconds", 0.0) for run in complete for row in run),
    }


def write_search(
    experiment: Experiment, arm: Arm, out: Path, metric: str, higher: bool, trials: list[dict]
) -> None:
    scored = [trial for trial in trials if trial["value"] is not None]
    best = max if higher else min
    chosen = best(scored, key=lambda trial: trial["value"]) if scored else None
    record = {
        "arm": arm.name,
        "search": unstructure(arm.tune),
        "reported_regions": reported_regions(experiment, arm),
        "metric": metric,
        "direction": "maximize" if higher else "minimize",
        "trials": trials,
        "chosen": chosen,
    }
    (tuning_dir(out, arm) / SEARCH).write_text(json.dumps(record, indent=1) + "\n")


def read_search(experiment: Experiment, arm: Arm, out: Path) -> dict[str, Any] | None:
    """``search.json`` of ``arm``, None before its first batch; a search run with other
    settings, or one whose trials left other reported regions out (they may have trained on
    today's), is refused (exit 2), as a run folder is."""
    path = tuning_dir(out, arm) / SEARCH
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record["search"] != unstructure(arm.tune):
        raise UsageError(
            f"{path} was searched with other settings; use another --out or the search's "
            "settings it was run with"
        )
    if record.get("reported_regions") != (reported := reported_regions(experiment, arm)):
        raise UsageError(
            f"{path} was searched leaving {record.get('reported_regions')} out, not the "
            f"reported validation regions {reported}; use another --out"
        )
    return record


def resolve_searches(experiment: Experiment, out: Path) -> tuple[Experiment, list[str]]:
    """The experiment with every finished search's chosen settings added to its arm, and
    the names of the tuned arms still waiting for theirs."""
    arms, waiting = [], []
    for arm in experiment.arms:
        record = read_search(experiment, arm, out) if arm.tune is not None else None
        if arm.tune is not None and not finished(record, arm.tune):
            waiting.append(arm.name)
        elif record is not None:
            chosen = assignments(arm.tune, record["chosen"]["params"])
            arm = attrs.evolve(arm, set=(*arm.set, *chosen))
        arms.append(arm)
    return attrs.evolve(experiment, arms=tuple(arms)), waiting


def finished(record: dict[str, Any] | None, search: Search) -> bool:
    return bool(record and len(record["trials"]) == search.trials and record["chosen"])


def tuning_section(experiment: Experiment, out: Path) -> str:
    """The report's section on the tuned arms: the settings chosen, on which split, every
    trial's value and the budget the search spent."""
    lines = []
    for arm in experiment.arms:
        record = read_search(experiment, arm, out) if arm.tune is not None else None
        if arm.tune is None or record is None:
            continue
        search, trials = arm.tune, record["trials"]
        chosen = record["chosen"]
        regions = ", ".join(search.regions)
        lines += [f"### `{arm.name}`", ""]
        if chosen is None:
            lines += ["No trial has finished yet.", ""]
        else:
            settings = ", ".join(f"`{a}`" for a in assignments(search, chosen["params"]))
            lines += [
                f"Chosen: {settings} (trial {chosen['trial']}, {record['metric']} "
                f"{chosen['value']:.4g} on the tuning regions {regions}).",
                "",
            ]
        runs = sum(trial["runs"] for trial in trials)
        steps = sum(trial["steps"] for trial in trials)
        seconds = sum(trial["seconds"] for trial in trials)
        lines += [
            f"Budget spent: {len(trials)} of {search.trials} trials, {runs} runs of "
            f"{len(search.seeds)} seed(s), {steps} optimizer steps, {seconds:.0f} s of "
            f"training. Optuna's TPE sampler (seed {search.sampler_seed}), "
            f"{search.batch} trial(s) at a time; every trial validated on the tuning regions "
            "and left the reported validation regions out of training and validation.",
            "",
            f"| trial | {' | '.join(f'`{key}`' for key in search.params)} | {record['metric']} |",
            f"| --- | {' | '.join('---' for _ in search.params)} | --- |",
        ]
        for trial in trials:
            values = " | ".join(str(trial["params"][key]) for key in search.params)
            value = "failed" if trial["value"] is None else f"{trial['value']:.4g}"
            lines.append(f"| {trial['trial']} | {values} | {value} |")
        lines.append("")
    if not lines:
        return ""
    return "\n## Tuned arms\n\n" + "\n".join(lines)
