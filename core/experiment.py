"""``python -m core.experiment``: compare plugin combinations ("arms") over several seeds.

Every (arm, seed) is an ordinary ``python -m core.run`` in its own process and run folder,
``<out>/<arm-slug>/seed<k>/``, with the same data, model, budget and common overrides; so each
run resumes on its own, and a fresh process gives every run clean Accelerate state and RNG.
A restarted experiment skips the runs whose ``summary.json`` exists and resumes the ones that
left a checkpoint. The report (``results.md``, ``results.csv``, ``loss_curves_by_arm.png``,
``terrain_rmse_by_arm.png``) is written from whatever runs are complete, so an interrupted or
partly failed experiment still yields a partial table.

Exit status: 0 every run finished, 1 a run failed (the report covers the others), 2 a usage
error (the message names the arm, key or plugin), 130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from core.config import load_config, parse_override, unstructure
from core.errors import UsageError
from core.plugins import PluginManager
from core.terrain import TERRAINS

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
BASELINE = "baseline"
BICUBIC = "bicubic"
"""The reference row: bicubic interpolation of the same validation tiles."""


@attrs.frozen
class Arm:
    """One plugin combination, with the overrides that only this arm gets."""

    name: str
    plugins: tuple[str, ...]
    overrides: tuple[str, ...] = ()

    @property
    def slug(self) -> str:
        """The arm's folder name: ``a,b`` -> ``a+b``; characters unsafe in paths -> ``-``."""
        text = self.name.replace(",", "+").replace("|", "__").replace(" ", "")
        return re.sub(r"[^A-Za-z0-9._+=-]", "-", text)


@attrs.frozen
class Experiment:
    """What to run: arms x seeds, sharing data, epochs and the common overrides."""

    arms: tuple[Arm, ...]
    seeds: tuple[int, ...]
    epochs: int
    common: tuple[str, ...] = ()
    data: str | None = None
    baseline: str = BASELINE
    target_loss: float | None = None
    """A fixed val_loss target; None: each seed's baseline final val_loss (see docs)."""


# --- arms --------------------------------------------------------------------------------


def parse_arm(spec: str) -> Arm:
    """``baseline`` or ``a,b,c``, optionally followed by ``|section.key=value`` overrides."""
    name = spec.strip()
    head, *overrides = (part.strip() for part in name.split("|"))
    plugins = [p.strip() for p in head.split(",") if p.strip()]
    if not plugins:
        raise UsageError(f"--arms: arm {name!r} names no plugins (write 'baseline' for none)")
    if plugins == [BASELINE]:
        plugins = []
    elif BASELINE in plugins:
        raise UsageError(f"--arms: arm {name!r}: 'baseline' means no plugins; it stands alone")
    return Arm(name, tuple(plugins), tuple(overrides))


def parse_arms(text: str) -> list[Arm]:
    """``--arms "baseline;stratified;stratified,terrain_loss"``: arms separated by ``;``."""
    return [parse_arm(spec) for spec in text.split(";") if spec.strip()]


def arms_from_toml(path: Path) -> tuple[list[Arm], dict[str, Any]]:
    """``[[arms]]`` tables (``name``, ``plugins``, optional ``set``) and the top-level keys."""
    try:
        tree = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"experiment file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"experiment file {path} is not valid TOML: {error}") from None
    types = {
        "arms": list, "seeds": list, "epochs": int, "set": list, "data": str,
        "baseline": str, "target_loss": float | int,
    }  # fmt: skip
    for key, value in tree.items():
        if key not in types:
            raise UsageError(f"{path}: unknown key {key!r}; expected one of {sorted(types)}")
        if not isinstance(value, types[key]) or isinstance(value, bool):
            raise UsageError(f"{path}: {key!r} has the wrong type ({type(value).__name__})")
    if not all(isinstance(seed, int) for seed in tree.get("seeds", [])):
        raise UsageError(f"{path}: 'seeds' must be a list of integers")
    if not all(isinstance(item, str) for item in tree.get("set", [])):
        raise UsageError(f"{path}: 'set' must be a list of 'section.key=value' strings")
    arms = []
    for number, table in enumerate(tree.get("arms", []), start=1):
        where = f"{path}: arms[{number}]"
        if not isinstance(table, dict) or set(table) - {"name", "plugins", "set"}:
            raise UsageError(f"{where}: an arm has the keys name, plugins and set only")
        name, plugins, sets = table.get("name"), table.get("plugins", []), table.get("set", [])
        if not isinstance(name, str) or not name:
            raise UsageError(f"{where}: 'name' must be a non-empty string")
        for key, value in (("plugins", plugins), ("set", sets)):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UsageError(f"{where} ({name}): {key!r} must be a list of strings")
        arms.append(Arm(name, tuple(plugins), tuple(sets)))
    return arms, tree


def with_norm_rule(arm: Arm, common: Sequence[str]) -> Arm:
    """``domain_bn`` needs BatchNorm layers: its arms get ``model.norm=batch`` unless the arm
    or the common overrides set ``model.norm`` themselves."""
    sets_norm = any(parse_override(s)[0] == ["model", "norm"] for s in [*common, *arm.overrides])
    if "domain_bn" not in arm.plugins or sets_norm:
        return arm
    return attrs.evolve(arm, overrides=(*arm.overrides, "model.norm='batch'"))


def run_overrides(experiment: Experiment, arm: Arm, seed: int, run_dir: Path) -> list[str]:
    """The ``--set`` assignments that make up one (arm, seed) run's config."""
    shortcuts = {
        "run.plugins": list(arm.plugins),
        "run.seed": seed,
        "run.epochs": experiment.epochs,
        "run.out": str(run_dir),
    }
    if experiment.data is not None:
        shortcuts["data.dir"] = experiment.data
    return [
        *experiment.common,
        *arm.overrides,
        *(f"{key}={json.dumps(value)}" for key, value in shortcuts.items()),
    ]


def check_arms(experiment: Experiment, out: Path) -> None:
    """Load every arm's config and plugins now, so a typo stops the experiment before any
    run starts (exit 2, naming the arm)."""
    slugs: dict[str, str] = {}
    for arm in experiment.arms:
        if arm.name == BICUBIC:
            raise UsageError(f"arm name {BICUBIC!r} is reserved for the reference row")
        if arm.slug in slugs:
            raise UsageError(f"arms {slugs[arm.slug]!r} and {arm.name!r} share a folder name")
        slugs[arm.slug] = arm.name
        try:
            config = load_config(None, run_overrides(experiment, arm, 0, out))
            PluginManager.from_names(config.run.plugins, config.plugins)
        except UsageError as error:
            raise UsageError(f"arm {arm.name!r}: {error}") from None
    if experiment.baseline not in slugs.values():
        raise UsageError(f"--baseline {experiment.baseline!r} is not one of the arms")


# --- running -----------------------------------------------------------------------------


@attrs.define
class Job:
    arm: Arm
    seed: int
    run_dir: Path
    command: list[str] = attrs.Factory(list)
    process: subprocess.Popen | None = None
    started: float = 0.0
    epochs_seen: int = 0


def run_dir_of(out: Path, arm: Arm, seed: int) -> Path:
    return out / arm.slug / f"seed{seed}"


def is_complete(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def check_same_settings(experiment: Experiment, arm: Arm, seed: int, run_dir: Path) -> None:
    """A run folder from an earlier start must hold this run's config, or the comparison
    would mix budgets; everything but the folder itself must match."""
    saved = run_dir / "config.toml"
    if not saved.is_file():
        return
    config = load_config(None, run_overrides(experiment, arm, seed, run_dir))
    manager = PluginManager.from_names(config.run.plugins, config.plugins)
    config.plugins = manager.resolved_sections(config.plugins)  # as the run wrote them
    expected = unstructure(config)
    found = unstructure(load_config(saved))
    for tree in (expected, found):
        tree["run"].pop("out")
    if expected != found:
        keys = [
            f"{section}.{key}"
            for section in expected
            for key in set(expected[section]) | set(found.get(section, {}))
            if expected[section].get(key) != found.get(section, {}).get(key)
        ]
        raise UsageError(
            f"{run_dir} was run with other settings ({', '.join(sorted(keys))}); "
            "use another --out or the settings it was run with"
        )


def plan_jobs(experiment: Experiment, out: Path) -> tuple[list[Job], list[Job]]:
    """(finished, to run): a half-finished run resumes from its checkpoint."""
    finished, pending = [], []
    for arm in experiment.arms:
        for seed in experiment.seeds:
            run_dir = run_dir_of(out, arm, seed)
            check_same_settings(experiment, arm, seed, run_dir)
            job = Job(arm, seed, run_dir)
            if is_complete(run_dir):
                finished.append(job)
                continue
            if (run_dir / "checkpoint.pt").is_file():
                job.command = ["--resume", str(run_dir)]
            else:
                overrides = run_overrides(experiment, arm, seed, run_dir)
                job.command = [arg for s in overrides for arg in ("--set", s)]
            pending.append(job)
    return finished, pending


def child_env(jobs: int, threads: int) -> dict[str, str]:
    """Threads per run: ``--threads``, else OMP_NUM_THREADS if set, else the cores shared out.

    Small convolutions scale poorly over threads, and runs side by side that each take every
    core oversubscribe the CPU, so each run gets its share.
    """
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    elif "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Runner:
    """Runs the pending jobs, ``jobs`` at a time, printing progress as epochs finish."""

    def __init__(self, pending: list[Job], total_epochs: int, jobs: int, threads: int) -> None:
        self.queue = list(pending)
        self.total_epochs = total_epochs
        self.jobs = max(1, jobs)
        self.env = child_env(self.jobs, threads)
        self.running: list[Job] = []
        self.failed: list[Job] = []
        self.epochs_done = 0
        self.started = time.monotonic()

    def start(self, job: Job) -> None:
        job.run_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(job.run_dir.parent / f"seed{job.seed}.log", "a")  # noqa: SIM115
        job.epochs_seen = count_rows(job.run_dir)
        job.started = time.monotonic()
        job.process = subprocess.Popen(
            [sys.executable, "-m", "core.run", *job.command],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        log.close()
        how = "resuming" if job.command[0] == "--resume" else "starting"
        print(f"{self.stamp()} {how} {job.arm.name} seed {job.seed} -> {job.run_dir}", flush=True)

    def stamp(self) -> str:
        return f"[{clock(time.monotonic() - self.started)}]"

    def report_epochs(self, job: Job) -> None:
        """One line per newly finished epoch, with the experiment's progress and an ETA."""
        rows = read_rows(job.run_dir)
        for row in rows[job.epochs_seen :]:
            self.epochs_done += 1
            done = self.epochs_done / max(1, self.total_epochs)
            elapsed = time.monotonic() - self.started
            loss, rmse = row.get("val_loss"), row.get("val_rmse_m")
            print(
                f"{self.stamp()} {job.arm.name} seed {job.seed} epoch {row['epoch']}: "
                f"val_loss {'n/a' if loss is None else f'{loss:.4f}'} "
                f"val_rmse {'n/a' if rmse is None else f'{rmse:.2f}'} m; "
                f"experiment {done:.0%}, about {clock(elapsed / done - elapsed)} to go",
                flush=True,
            )
        job.epochs_seen = len(rows)

    def finish(self, job: Job, status: int) -> None:
        self.report_epochs(job)
        took = clock(time.monotonic() - job.started)
        if status == 0 and is_complete(job.run_dir):
            print(f"{self.stamp()} done {job.arm.name} seed {job.seed} in {took}", flush=True)
            return
        self.failed.append(job)
        log = job.run_dir.parent / f"seed{job.seed}.log"
        print(
            f"{self.stamp()} FAILED {job.arm.name} seed {job.seed} (exit {status}); see {log}",
            file=sys.stderr,
            flush=True,
        )

    def run(self) -> None:
        """Until the queue is empty; on an interruption every running job gets SIGINT (it
        saves a checkpoint) and KeyboardInterrupt propagates once they have stopped."""
        try:
            while self.queue or self.running:
                while self.queue and len(self.running) < self.jobs:
                    job = self.queue.pop(0)
                    self.start(job)
                    self.running.append(job)
                time.sleep(1.0)
                for job in list(self.running):
                    status = job.process.poll() if job.process else None
                    if status is None:
                        self.report_epochs(job)
                        continue
                    self.running.remove(job)
                    self.finish(job, status)
        except KeyboardInterrupt:
            for job in self.running:
                if job.process and job.process.poll() is None:
                    job.process.send_signal(signal.SIGINT)
            for job in self.running:
                if job.process:
                    job.process.wait()
            raise


def count_rows(run_dir: Path) -> int:
    return len(read_rows(run_dir))


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl`` rows; a line still being written is left for later."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


# --- the comparison ------------------------------------------------------------------------

Runs = dict[str, dict[int, list[dict[str, Any]]]]
"""arm name -> seed -> that run's metrics.jsonl rows (complete runs only)."""


def collect(experiment: Experiment, out: Path) -> Runs:
    runs: Runs = {}
    for arm in experiment.arms:
        for seed in experiment.seeds:
            run_dir = run_dir_of(out, arm, seed)
            if is_complete(run_dir):
                runs.setdefault(arm.name, {})[seed] = read_rows(run_dir)
    return runs


def spikes_per_100_epochs(rows: Sequence[Mapping[str, Any]]) -> float:
    """Loss spikes (``core.metrics.spike_steps``, counted per epoch by the trainer) per 100
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


def metric_names() -> list[str]:
    """CSV/table columns of one run, in order."""
    names = ["spikes_per_100_epochs", "spikes_per_1000_steps", "steps", "epochs_to_target"]
    names += ["target_loss", "final_val_loss"]
    for key in ("val_rmse_m", "val_slope_rmse_deg", "bicubic_rmse_m"):
        names += [key, *(f"{key}_{terrain}" for terrain in TERRAINS)]
    return names


def run_metrics(rows: Sequence[Mapping[str, Any]], target: float | None) -> dict[str, Any]:
    """One run's numbers (None where a value does not exist, e.g. a target not reached)."""
    final = rows[-1]
    values: dict[str, Any] = {
        "spikes_per_100_epochs": spikes_per_100_epochs(rows),
        "spikes_per_1000_steps": spikes_per_1000_steps(rows),
        "steps": sum(row["steps"] for row in rows),
        "epochs_to_target": None if target is None else epochs_to_target(rows, target),
        "target_loss": target,
        "final_val_loss": final.get("val_loss"),
    }
    sources = {
        "val_rmse_m": "val_rmse_m",
        "val_slope_rmse_deg": "val_slope_rmse_deg",
        "bicubic_rmse_m": "val_rmse_m_bicubic",
    }
    for name, key in sources.items():
        values[name] = final.get(key)
        by_terrain = final.get(f"{key}_by_terrain") or {}
        for terrain in TERRAINS:
            values[f"{name}_{terrain}"] = by_terrain.get(terrain)
    return values


def targets(experiment: Experiment, runs: Runs) -> dict[int, float | None]:
    """Per seed: ``--target-loss``, else the baseline's final val_loss with that seed (the
    same validation tiles, since the split follows the seed)."""
    baseline = runs.get(experiment.baseline, {})
    return {
        seed: experiment.target_loss
        if experiment.target_loss is not None
        else (baseline[seed][-1].get("val_loss") if seed in baseline else None)
        for seed in experiment.seeds
    }


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (0 for one value) and count of the values present."""
    present = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not present:
        return None, None, 0
    spread = statistics.stdev(present) if len(present) > 1 else 0.0
    return statistics.fmean(present), spread, len(present)


def delta_pct(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return (value - reference) / reference * 100


def t_two_sided_p(t: float, dof: int) -> float:
    """P(|T| >= |t|) for Student's t with ``dof`` degrees of freedom, exactly.

    Abramowitz & Stegun 26.7.3-4: finite sums in theta = atan(|t| / sqrt(dof)), so no
    statistics package is needed for the handful of seeds an experiment has.
    """
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(dof))
    cos2 = math.cos(theta) ** 2
    if dof % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, total = 1.0, 1.0 if dof > 1 else 0.0
        for k in range(1, (dof - 1) // 2):
            term *= 2 * k / (2 * k + 1) * cos2
            total += term
        inside = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    else:  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        term, total = 1.0, 1.0
        for k in range(1, dof // 2):
            term *= (2 * k - 1) / (2 * k) * cos2
            total += term
        inside = math.sin(theta) * total
    return min(1.0, max(0.0, 1.0 - inside))


def paired_test(
    values: Mapping[int, float | None], reference: Mapping[int, float | None]
) -> tuple[float | None, float | None, float | None]:
    """(mean, std, two-sided p of a paired t-test) of ``values - reference`` over the seeds
    both have. Pairing by seed removes what seeds share: the validation split and the init."""
    diffs = [
        float(values[s]) - float(reference[s])
        for s in values
        if values[s] is not None and reference.get(s) is not None
    ]
    if len(diffs) < 2:
        return None, None, None
    mean, spread = statistics.fmean(diffs), statistics.stdev(diffs)
    if spread == 0:
        return mean, spread, 1.0 if mean == 0 else 0.0
    t = mean / (spread / math.sqrt(len(diffs)))
    return mean, spread, t_two_sided_p(t, len(diffs) - 1)


@attrs.define
class Summary:
    """Per arm and metric: the per-seed numbers, their mean, std and count, the change of the
    mean against the baseline (%), and a paired test of the per-seed differences."""

    per_seed: dict[str, dict[int, dict[str, Any]]]
    stats: dict[str, dict[str, dict[str, float | None]]]
    """arm -> row (``mean``, ``std``, ``count``, ``delta_pct``, ``paired_diff_mean``,
    ``paired_diff_std``, ``paired_p``) -> metric -> value."""


STAT_ROWS = ("mean", "std", "count", "delta_pct", "paired_diff_mean", "paired_diff_std", "paired_p")


def bicubic_reference(per_seed: Mapping[str, Mapping[int, dict[str, Any]]]) -> dict[int, dict]:
    """Bicubic interpolation as a pseudo-arm: per seed (the split), from any run of it."""
    reference: dict[int, dict[str, Any]] = {}
    for seeds in per_seed.values():
        for seed, values in seeds.items():
            if values["bicubic_rmse_m"] is not None and seed not in reference:
                reference[seed] = {
                    name: values[name.replace("val_rmse_m", "bicubic_rmse_m")]
                    if name.startswith("val_rmse_m")
                    else None
                    for name in metric_names()
                }
    return dict(sorted(reference.items()))


def summarise(experiment: Experiment, runs: Runs) -> Summary:
    seed_targets = targets(experiment, runs)
    per_seed = {
        arm: {seed: run_metrics(rows, seed_targets[seed]) for seed, rows in sorted(seeds.items())}
        for arm, seeds in runs.items()
    }
    reference = bicubic_reference(per_seed)
    if reference:
        per_seed[BICUBIC] = reference
    base = per_seed.get(experiment.baseline, {})
    stats: dict[str, dict[str, dict[str, float | None]]] = {}
    for arm, seeds in per_seed.items():
        stats[arm] = {row: {} for row in STAT_ROWS}
        for name in metric_names():
            values = {seed: metrics[name] for seed, metrics in seeds.items()}
            mean, spread, count = mean_std(list(values.values()))
            base_values = [m[name] for m in base.values()]
            base_mean = mean_std(base_values)[0]
            paired = paired_test(values, {seed: m[name] for seed, m in base.items()})
            change = delta_pct(mean, base_mean)
            censored = name == "epochs_to_target" and None in (*values.values(), *base_values)
            if arm == experiment.baseline or censored:  # a target never reached has no number
                paired = (None, None, None)
            if arm == experiment.baseline:
                change = None
            cells = (mean, spread, count, change, *paired)
            for row, value in zip(STAT_ROWS, cells, strict=True):
                stats[arm][row][name] = value
    return Summary(per_seed, stats)


# --- writing the report ----------------------------------------------------------------------


def decimals_for(value: float) -> int:
    """About four significant digits: 2.651, 32.83, 148.4, 1234."""
    if value == 0:
        return 2
    return min(3, max(0, 3 - math.floor(math.log10(abs(value)))))


def cell(summary: Summary, arm: str, name: str) -> str:
    """``mean ± std (Δ%)``, with * when a paired t-test over seeds gives p < 0.05."""
    stats = summary.stats[arm]
    mean, spread = stats["mean"][name], stats["std"][name]
    seeds = len(summary.per_seed[arm])
    if mean is None:
        had_target = any(v["target_loss"] is not None for v in summary.per_seed[arm].values())
        return f"none reached (0/{seeds})" if name == "epochs_to_target" and had_target else "–"
    digits = 1 if name == "epochs_to_target" else decimals_for(mean)
    text = f"{mean:.{digits}f} ± {spread:.{digits}f}"
    if name == "epochs_to_target" and stats["count"][name] < seeds:
        text += f" ({stats['count'][name]:.0f}/{seeds} reached)"
    change, p = stats["delta_pct"][name], stats["paired_p"][name]
    if change is not None:
        mark = "*" if p is not None and p < 0.05 else ""
        text += f" ({change:+.1f}%{mark})"
    return text


def markdown(experiment: Experiment, summary: Summary) -> str:
    """Three tables (headline, per-terrain RMSE, per-terrain slope RMSE) and their legend."""
    order = [arm.name for arm in experiment.arms if arm.name in summary.per_seed]
    if BICUBIC in summary.per_seed:
        order.append(BICUBIC)
    overrides = {arm.name: ", ".join(f"`{s}`" for s in arm.overrides) for arm in experiment.arms}
    runs = sum(len(summary.per_seed[arm]) for arm in order if arm != BICUBIC)
    target = (
        f"val_loss {experiment.target_loss}"
        if experiment.target_loss is not None
        else "the baseline's final val_loss with the same seed"
    )
    common = ", ".join(f"`{s}`" for s in experiment.common) or "none"
    lines = [
        "# Experiment results",
        "",
        f"{runs} of {len(experiment.arms) * len(experiment.seeds)} runs complete: "
        f"{len(experiment.arms)} arms × {len(experiment.seeds)} seeds "
        f"({', '.join(map(str, experiment.seeds))}) × {experiment.epochs} epochs; "
        f"data: {experiment.data or 'the built-in data.source'}; common overrides: {common}.",
        "",
        "Each cell: mean ± sample std over seeds, then the change of the mean against "
        f"`{experiment.baseline}` in %; * marks a change whose paired t-test over seeds "
        "(same seed = same validation tiles and initialisation) gives p < 0.05. "
        f"Epochs to target: the first epoch whose val_loss is at or below {target}; "
        "its mean is over the seeds that reached it. Loss spikes: see docs/experiments.md.",
        "",
    ]

    def table(title: str, columns: list[tuple[str, str]]) -> None:
        lines.extend([f"## {title}", ""])
        lines.append("| arm | seeds | " + " | ".join(head for head, _ in columns) + " |")
        lines.append("| --- | --- | " + " | ".join("---" for _ in columns) + " |")
        for arm in order:
            extra = f" ({overrides[arm]})" if overrides.get(arm) else ""
            label = "bicubic (reference)" if arm == BICUBIC else f"`{arm}`{extra}"
            cells = " | ".join(cell(summary, arm, name) for _, name in columns)
            lines.append(f"| {label} | {len(summary.per_seed[arm])} | {cells} |")
        lines.append("")

    table(
        "Headline",
        [
            ("loss spikes / 100 epochs", "spikes_per_100_epochs"),
            ("loss spikes / 1000 steps", "spikes_per_1000_steps"),
            ("optimizer steps", "steps"),
            ("epochs to target", "epochs_to_target"),
            ("final val_loss", "final_val_loss"),
            ("val RMSE (m)", "val_rmse_m"),
            ("val slope RMSE (°)", "val_slope_rmse_deg"),
        ],
    )
    table("Validation RMSE per terrain (m)", [(t, f"val_rmse_m_{t}") for t in TERRAINS])
    table(
        "Validation slope RMSE per terrain (°)", [(t, f"val_slope_rmse_deg_{t}") for t in TERRAINS]
    )
    return "\n".join(lines)


def write_csv(path: Path, summary: Summary, arms: Sequence[Arm]) -> None:
    """One row per (arm, seed) with the raw numbers, then one row per statistic and arm
    (``seed`` column = ``mean``, ``std``, ``count``, ``delta_pct``, ``paired_diff_mean``, ...)."""
    info = {arm.name: (",".join(arm.plugins), "; ".join(arm.overrides)) for arm in arms}
    names = metric_names()
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["arm", "plugins", "overrides", "seed", *names])
        for arm, seeds in summary.per_seed.items():
            plugins, overrides = info.get(arm, ("", ""))
            rows = [(str(seed), values) for seed, values in seeds.items()]
            rows += [(stat, summary.stats[arm][stat]) for stat in STAT_ROWS]
            for seed, values in rows:
                cells = ("" if values[n] is None else values[n] for n in names)
                writer.writerow([arm, plugins, overrides, seed, *cells])


def write_report(experiment: Experiment, out: Path, report_dir: Path) -> Summary:
    """Tables, CSV and plots from the complete runs under ``out``."""
    from core.plots import plot_loss_curves_by_arm, plot_terrain_rmse_by_arm

    runs = collect(experiment, out)
    summary = summarise(experiment, runs)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "results.md").write_text(markdown(experiment, summary))
    write_csv(report_dir / "results.csv", summary, experiment.arms)
    plot_loss_curves_by_arm(
        runs, report_dir / "loss_curves_by_arm.png", baseline=experiment.baseline
    )
    plot_terrain_rmse_by_arm(
        runs, report_dir / "terrain_rmse_by_arm.png", baseline=experiment.baseline
    )
    return summary


# --- the command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m core.experiment",
        description="Run plugin combinations on the same data, model, budget and seeds, "
        "and compare them.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--arms",
        help="arms separated by ';', each 'baseline' or plugins 'a,b' with optional "
        "'|section.key=value' overrides",
    )
    source.add_argument("--config", type=Path, help="an experiment TOML file with [[arms]]")
    parser.add_argument("--seeds", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--epochs", type=int, help="epochs per run (default: run.epochs, 8)")
    parser.add_argument("--data", help="a folder of GeoTIFFs (default: the GLOBE tiles)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config key in every arm (repeatable)",
    )
    parser.add_argument("--out", type=Path, required=True, help="experiment folder")
    parser.add_argument("--report-dir", type=Path, help="where the report goes (default --out)")
    parser.add_argument("--baseline", help="the arm Δ is measured against (default: baseline)")
    parser.add_argument("--target-loss", type=float, help="fixed val_loss for epochs-to-target")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (default 1)")
    parser.add_argument("--threads", type=int, default=0, help="threads per run (0: auto)")
    parser.add_argument(
        "--report-only", action="store_true", help="write the report from finished runs only"
    )
    return parser


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--seeds expects comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds needs distinct seeds, got {text!r}")
    return seeds


def build_experiment(args: argparse.Namespace) -> Experiment:
    """Command-line options override the experiment file's keys; lists of sets add up."""
    tree: dict[str, Any] = {}
    if args.config:
        arms, tree = arms_from_toml(args.config)
    else:
        arms = parse_arms(args.arms)
    if not arms:
        raise UsageError("no arms given")
    seeds = parse_seeds(args.seeds or ",".join(map(str, tree.get("seeds", (0, 1, 2)))))
    common = (*tree.get("set", ()), *args.set)
    epochs = args.epochs if args.epochs is not None else tree.get("epochs")
    if epochs is None:
        epochs = load_config(None, list(common)).run.epochs
    if epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {epochs}")
    experiment = Experiment(
        arms=tuple(with_norm_rule(arm, common) for arm in arms),
        seeds=seeds,
        epochs=epochs,
        common=tuple(common),
        data=args.data or tree.get("data"),
        baseline=args.baseline or tree.get("baseline", BASELINE),
        target_loss=args.target_loss if args.target_loss is not None else tree.get("target_loss"),
    )
    if experiment.baseline == BASELINE and all(a.name != BASELINE for a in arms):
        experiment = attrs.evolve(experiment, baseline=arms[0].name)
    return experiment


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    try:
        experiment = build_experiment(args)
        check_arms(experiment, args.out)
        finished, pending = plan_jobs(experiment, args.out)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    report_dir = args.report_dir or args.out
    total = len(finished) + len(pending)
    status = 0
    if not args.report_only:
        print(
            f"experiment: {len(experiment.arms)} arms x {len(experiment.seeds)} seeds x "
            f"{experiment.epochs} epochs in {args.out}; {len(finished)} of {total} runs "
            f"already finished, {len(pending)} to run, {args.jobs} at a time",
            flush=True,
        )
        done_epochs = sum(count_rows(job.run_dir) for job in pending)
        runner = Runner(
            pending, len(pending) * experiment.epochs - done_epochs, args.jobs, args.threads
        )
        try:
            runner.run()
            status = EXIT_FAILED if runner.failed else 0
        except KeyboardInterrupt:
            print("interrupted: running jobs saved checkpoints; run again to continue")
            status = EXIT_INTERRUPTED
    summary = write_report(experiment, args.out, report_dir)
    complete = sum(len(seeds) for arm, seeds in summary.per_seed.items() if arm != BICUBIC)
    print(
        f"report: {report_dir / 'results.md'} ({complete} of {total} runs); "
        f"elapsed {clock(time.monotonic() - started)}",
        flush=True,
    )
    return status


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
