"""The command line of ``python -m core.experiment``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from core.config import load_config
from core.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, UsageError, report_error
from core.experiment.report import write_report
from core.experiment.schedule import Runner, clock, count_rows, plan_jobs
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
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (default 1)")
    parser.add_argument("--threads", type=int, default=0, help="threads per run (0: auto)")
    parser.add_argument(
        "--report-only", action="store_true", help="write the report from finished runs only"
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
    baseline = args.baseline or spec.baseline or BASELINE
    if baseline == BASELINE and all(arm.name != BASELINE for arm in spec.arms):
        baseline = spec.arms[0].name
    return Experiment(
        arms=spec.arms,
        seeds=seeds,
        epochs=epochs,
        common=common,
        data=args.data or spec.data,
        baseline=baseline,
        primary=spec.primary,
        correction=spec.correction,
        test=spec.test,
        alpha=spec.alpha,
        task=defaults.run.task,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    try:
        experiment = build_experiment(args)
        check_arms(experiment, args.out)
        task = get_task(experiment.task)
        check_primaries(experiment, task.report_metrics, task.terrains)
        finished, pending = plan_jobs(experiment, args.out)
        if args.report_only and not finished and not args.check:
            raise UsageError(f"--report-only: no finished run in {args.out} to report on")
    except UsageError as error:
        return report_error(error)
    report_dir = args.report_dir or args.out
    total = len(finished) + len(pending)
    status = 0
    if args.check or not args.report_only:
        print(
            f"experiment: {len(experiment.arms)} arms x {len(experiment.seeds)} seeds x "
            f"{experiment.epochs} epochs in {args.out}; {len(finished)} of {total} runs "
            f"already finished, {len(pending)} to run, {args.jobs} at a time",
            flush=True,
        )
        if args.check:
            return EXIT_OK
        done_epochs = sum(count_rows(job.run_dir) for job in pending)
        runner = Runner(
            pending, len(pending) * experiment.epochs - done_epochs, args.jobs, args.threads
        )
        try:
            runner.run()
            status = EXIT_FAILED if runner.failed else EXIT_OK
        except KeyboardInterrupt:
            print("interrupted: running jobs saved checkpoints; run again to continue")
            status = EXIT_INTERRUPTED
    summary = write_report(experiment, args.out, report_dir)
    print(
        f"report: {report_dir / 'results.md'} ({summary.complete_runs} of {total} runs); "
        f"elapsed {clock(time.monotonic() - started)}",
        flush=True,
    )
    return status
