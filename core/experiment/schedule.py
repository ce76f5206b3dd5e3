"""Running the (arm, seed) runs: one ``python -m core.run`` process each, restartable.

A restarted experiment skips the runs whose ``summary.json`` exists and resumes the ones that
left a checkpoint; a run folder written with other settings is refused.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any, Protocol

import attrs

from core.config import load_config
from core.errors import UsageError
from core.experiment.spec import Arm, Experiment, run_overrides
from core.plugins import PluginManager
from core.resume import changed_keys
from core.run_folder import CHECKPOINT, CONFIG, METRICS, SUMMARY, VAL_TILES_CSV
from core.safe_io import atomic_write
from core.val_tiles import read_val_tiles

Runs = dict[str, dict[int, list[dict[str, Any]]]]
"""arm name -> seed -> that run's metrics.jsonl rows (complete runs only)."""


class Process(Protocol):
    """A running ``core.run``: a local subprocess, or a run on a Ray node."""

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    def wait(self) -> int: ...


@attrs.define
class Job:
    arm: Arm
    seed: int
    run_dir: Path
    command: list[str] = attrs.Factory(list)
    """``core.run``'s arguments; empty for a complete run."""
    process: Process | None = None
    started: float = 0.0
    epochs_seen: int = 0


def run_dir_of(out: Path, arm: Arm, seed: int) -> Path:
    return out / arm.slug / f"seed{seed}"


def is_complete(run_dir: Path) -> bool:
    return (run_dir / SUMMARY).is_file()


def check_same_settings(experiment: Experiment, arm: Arm, seed: int, run_dir: Path) -> None:
    """A run folder from an earlier start must hold this run's config, or the comparison
    would mix budgets; everything but the folder itself must match."""
    saved = run_dir / CONFIG
    if not saved.is_file():
        return
    config = load_config(None, run_overrides(experiment, arm, seed, run_dir))
    manager = PluginManager.from_names(config.run.plugins, config.plugins)
    config.plugins = manager.resolved_sections(config.plugins)  # as the run wrote them
    changes = changed_keys(load_config(saved), config)  # a resume's notes are no setting
    changes.pop("run.out", None)
    if changes:
        raise UsageError(
            f"{run_dir} was run with other settings ({', '.join(changes)}); "
            "use another --out or the settings it was run with"
        )


def resume_args(run_dir: Path) -> list[str]:
    """``core.run``'s arguments to resume a run that left a checkpoint, else none: read when
    an experiment starts again, and when a Ray task starts again after its node died."""
    return ["--resume", str(run_dir)] if (run_dir / CHECKPOINT).is_file() else []


def plan_job(experiment: Experiment, arm: Arm, seed: int, run_dir: Path) -> Job:
    """One run's job: none to do when complete, a resume when it left a checkpoint."""
    check_same_settings(experiment, arm, seed, run_dir)
    job = Job(arm, seed, run_dir)
    if is_complete(run_dir):
        return job
    overrides = run_overrides(experiment, arm, seed, run_dir)
    job.command = resume_args(run_dir) or [arg for s in overrides for arg in ("--set", s)]
    return job


def plan_jobs(
    experiment: Experiment, out: Path, later: Collection[str] = ()
) -> tuple[list[Job], list[Job]]:
    """(finished, to run) of every arm but those named in ``later`` (tuned arms whose search
    has not ended): a half-finished run resumes from its checkpoint."""
    finished, pending = [], []
    for arm in experiment.arms:
        if arm.name in later:
            continue
        for seed in experiment.seeds:
            job = plan_job(experiment, arm, seed, run_dir_of(out, arm, seed))
            (pending if job.command else finished).append(job)
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

    verbs = ("starting", "resuming")
    """What a start line says of a new run and of a resumed one."""

    def __init__(self, pending: list[Job], total_epochs: int, jobs: int, threads: int) -> None:
        self.queue = list(pending)
        self.total_epochs = total_epochs
        self.jobs = max(1, jobs)
        self.threads = threads
        self.running: list[Job] = []
        self.failed: list[Job] = []
        self.epochs_done = 0
        self.started = time.monotonic()

    def start(self, job: Job) -> None:
        job.run_dir.parent.mkdir(parents=True, exist_ok=True)
        job.epochs_seen = count_rows(job.run_dir)
        job.started = time.monotonic()
        job.process = self.launch(job)
        how = self.verbs[job.command[0] == "--resume"]
        print(f"{self.stamp()} {how} {job.arm.name} seed {job.seed} -> {job.run_dir}", flush=True)

    def launch(self, job: Job) -> Process:
        """``python -m core.run`` on this machine, its output appended to the run's log."""
        with open(log_of(job), "a") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "core.run", *job.command],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(self.jobs, self.threads),
            )

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
                f"val_loss {'n/a' if loss is None else f'{loss:.4f}'}"
                f"{'' if rmse is None else f' val_rmse {rmse:.2f} m'}; "
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
        print(
            f"{self.stamp()} FAILED {job.arm.name} seed {job.seed} (exit {status}); "
            f"see {log_of(job)}",
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


def log_of(job: Job) -> Path:
    """Where a run's output goes: ``seed<k>.log`` beside its folder."""
    return job.run_dir.parent / f"seed{job.seed}.log"


def count_rows(run_dir: Path) -> int:
    return len(read_rows(run_dir))


ARCHIVED_METRICS = f"{METRICS}.gz"
"""An archived run's ``metrics.jsonl``, gzipped (:func:`archive_runs`)."""


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl`` rows (or an archived run's, gzipped); a line still being
    written is left for later."""
    path, archived = run_dir / METRICS, run_dir / ARCHIVED_METRICS
    if path.is_file():
        text = path.read_text()
    elif archived.is_file():
        text = gzip.decompress(archived.read_bytes()).decode()
    else:
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def collect(experiment: Experiment, out: Path) -> Runs:
    """The metrics rows of every complete run under ``out``."""
    runs: Runs = {}
    for arm in experiment.arms:
        for seed in experiment.seeds:
            run_dir = run_dir_of(out, arm, seed)
            if is_complete(run_dir):
                runs.setdefault(arm.name, {})[seed] = read_rows(run_dir)
    return runs


def copy_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: an archive is read back as it is."""
    atomic_write(path, lambda handle: handle.write(data))


def check_archive(out: Path, archive: Path) -> None:
    """Refuse an archive folder that is the experiment folder: the runs are its inputs."""
    if archive.resolve() == out.resolve():
        raise UsageError(f"--archive {archive} is the experiment folder itself; name another")


def archive_runs(
    experiment: Experiment, out: Path, archive: Path, records: Collection[Path] = ()
) -> int:
    """Copy what the report is made of, for every complete run under ``out``, to the same
    layout under ``archive``: ``config.toml``, ``summary.json``, ``val_tiles.csv.gz`` and
    ``metrics.jsonl`` gzipped (no checkpoint, no plots), a folder small enough to commit
    that ``--report-only --out ARCHIVE`` reads back into the same report, and the
    experiment's own ``records`` (paths relative to ``out``, such as a tuned arm's search).
    Returns the runs archived."""
    check_archive(out, archive)
    for record in records:
        if (out / record).is_file():
            (archive / record).parent.mkdir(parents=True, exist_ok=True)
            copy_atomically(archive / record, (out / record).read_bytes())
    count = 0
    for arm in experiment.arms:
        for seed in experiment.seeds:
            run_dir, target = run_dir_of(out, arm, seed), run_dir_of(archive, arm, seed)
            if not is_complete(run_dir):
                continue
            target.mkdir(parents=True, exist_ok=True)
            for name in (CONFIG, SUMMARY, VAL_TILES_CSV):
                if (run_dir / name).is_file():
                    copy_atomically(target / name, (run_dir / name).read_bytes())
            metrics = (run_dir / METRICS).read_bytes()
            copy_atomically(target / ARCHIVED_METRICS, gzip.compress(metrics, mtime=0))
            count += 1
    return count


def collect_tiles(experiment: Experiment, out: Path) -> dict[str, dict[int, Any]]:
    """The per-tile validation errors (``val_tiles.csv.gz``) of every complete run that
    has them: arm name -> seed -> columns."""
    tiles: dict[str, dict[int, Any]] = {}
    for arm in experiment.arms:
        for seed in experiment.seeds:
            run_dir = run_dir_of(out, arm, seed)
            if is_complete(run_dir) and (columns := read_val_tiles(run_dir)) is not None:
                tiles.setdefault(arm.name, {})[seed] = columns
    return tiles
