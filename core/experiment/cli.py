"""The command line of ``python -m core.experiment``."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from core.config import load_config
from core.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, UsageError, report_error
from core.experiment.report import write_report
from core.experiment.schedule import (
    Job,
    Runner,
    archive_runs,
    check_archive,
    clock,
    collect,
    count_rows,
    plan_jobs,
)
from core.experiment.spec import (
    BASELINE,
    DEFAULT_SEEDS,
    Experiment,
    SpecFile,
    check_arms,
    parse_arms,
    parse_seeds,
    read_spec,
)
from core.experiment.summary import check_primaries
from core.experiment.tune import (
    SEARCH,
    RunJobs,
    check_searches,
    resolve_searches,
    run_search,
    tuning_dir,
)
from core.tasks import get_task


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
    parser.add_argument("--data", help="a folder of GeoTIFFs (default: the task's default data)")
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
    parser.add_argument(
        "--jobs", type=int, help="runs side by side (default 1; --backend ray: all it can)"
    )
    parser.add_argument("--threads", type=int, default=0, help="threads per run (0: auto)")
    parser.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="where runs execute: processes here, or tasks on a Ray cluster (pip install "
        "'terraplug[ray]')",
    )
    parser.add_argument(
        "--address", help="--backend ray: the cluster's HOST:PORT (default: start Ray here)"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="write the report from finished runs only"
    )
    parser.add_argument(
        "--archive",
        type=Path,
        metavar="DIR",
        help="also copy every finished run's config.toml, summary.json, val_tiles.csv.gz and "
        "gzipped metrics.jsonl to DIR, which --report-only --out DIR reads back",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the arms, settings and folder, print the plan, and run nothing",
    )
    return parser


def build_experiment(args: argparse.Namespace) -> Experiment:
    """Command-line options override the experiment file's keys; lists of sets add up."""
    spec = read_spec(args.config) if args.config else SpecFile(arms=tuple(parse_arms(args.arms)))
    if not spec.arms:
        raise UsageError("no arms given")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else spec.seeds or DEFAULT_SEEDS
    common = (*spec.set, *args.set)
    defaults = load_config(None, list(common))
    epochs = args.epochs if args.epochs is not None else spec.epochs
    if epochs is None:
        epochs = defaults.run.epochs
    if epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {epochs}")
    data = args.data or spec.data
    if data and args.backend == "ray":  # the path every node is given
        data = os.path.abspath(data)
    baseline = args.baseline or spec.baseline or BASELINE
    if baseline == BASELINE and all(arm.name != BASELINE for arm in spec.arms):
        baseline = spec.arms[0].name
    return Experiment(
        arms=spec.arms,
        seeds=seeds,
        epochs=epochs,
        common=common,
        data=data,
        baseline=baseline,
        primary=spec.primary,
        correction=spec.correction,
        test=spec.test,
        alpha=spec.alpha,
        task=defaults.run.task,
        resources=spec.resources,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.backend == "ray":  # run folders on other nodes: the path every node is given
        args.out = args.out.absolute()
    started = time.monotonic()
    try:
        experiment = build_experiment(args)
        check_arms(experiment, args.out)
        task = get_task(experiment.task)
        check_primaries(experiment, task.report_metrics, task.terrains)
        check_searches(experiment, task)
        experiment, waiting = resolve_searches(experiment, args.out)
        finished, pending = plan_jobs(experiment, args.out, later=waiting)
        if args.archive is not None:
            check_archive(args.out, args.archive)
        if args.report_only and not finished and not args.check:
            raise UsageError(f"--report-only: no finished run in {args.out} to report on")
    except UsageError as error:
        return report_error(error)
    report_dir = args.report_dir or args.out
    total = len(experiment.arms) * len(experiment.seeds)
    status = 0
    if args.check or not args.report_only:
        at_a_time = args.jobs or ("as the cluster allows" if args.backend == "ray" else 1)
        searches = f"; first the search of {', '.join(waiting)}" if waiting else ""
        print(
            f"experiment: {len(experiment.arms)} arms x {len(experiment.seeds)} seeds x "
            f"{experiment.epochs} epochs in {args.out}; {len(finished)} of {total} runs "
            f"already finished, {len(pending)} to run, {at_a_time} at a time{searches}",
            flush=True,
        )
        if args.check:
            return EXIT_OK
        try:
            with backend(args, experiment) as run_jobs:
                failed = []
                for arm in (arm for arm in experiment.arms if arm.name in waiting):
                    failed += run_search(experiment, arm, args.out, task, run_jobs)
                experiment, waiting = resolve_searches(experiment, args.out)
                _, pending = plan_jobs(experiment, args.out, later=waiting)
                failed += run_jobs(pending, experiment.epochs)
            status = EXIT_FAILED if failed or waiting else EXIT_OK
        except KeyboardInterrupt:
            print("interrupted: running jobs saved checkpoints; run again to continue")
            status = EXIT_INTERRUPTED
        except UsageError as error:
            return report_error(error)
    if not collect(experiment, args.out):  # stopped before any run finished
        print(f"report: none yet, no run of {total} has finished", flush=True)
        return status
    summary = write_report(experiment, args.out, report_dir)
    print(
        f"report: {report_dir / 'results.md'} ({summary.complete_runs} of {total} runs); "
        f"elapsed {clock(time.monotonic() - started)}",
        flush=True,
    )
    if args.archive is not None:
        searches = [tuning_dir(Path(), arm) / SEARCH for arm in experiment.arms if arm.tune]
        archived = archive_runs(experiment, args.out, args.archive, searches)
        print(f"archive: {archived} runs in {args.archive}", flush=True)
    return status


@contextlib.contextmanager
def backend(args: argparse.Namespace, experiment: Experiment) -> Iterator[RunJobs]:
    """What runs the jobs: processes on this machine, or tasks on a Ray cluster
    (``--backend ray``) whose nodes all see ``--out``; either returns the failed jobs."""

    def run(runner: Runner) -> list[Job]:
        runner.run()
        return runner.failed

    if args.backend == "local":
        yield lambda jobs, epochs: run(
            Runner(jobs, epochs_left(jobs, epochs), args.jobs or 1, args.threads)
        )
        return
    from core.experiment.ray_backend import (
        RayRunner,
        check_resources,
        check_shared_storage,
        connect,
        disconnect,
    )

    connect(args.address)
    try:
        check_resources(experiment.resources, str(args.config or "--arms"))
        check_shared_storage(args.out)
        yield lambda jobs, epochs: run(
            RayRunner(
                jobs, epochs_left(jobs, epochs), args.jobs, args.threads, experiment.resources
            )
        )
    finally:
        disconnect()


def epochs_left(jobs: list[Job], epochs: int) -> int:
    return len(jobs) * epochs - sum(count_rows(job.run_dir) for job in jobs)
