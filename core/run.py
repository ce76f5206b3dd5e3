"""``python -m core.run``: train with a chosen mix of strategy plugins.

Exit status: 0 success, 2 usage or input error (the message names the bad key, file or
plugin), 1 anything else (130 after an interruption that saved a checkpoint; with several
processes each exits 130, and the launcher reports their failure with its own status).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from core.config import Config, absolute_data, load_config
from core.errors import EXIT_INTERRUPTED, StorageError, UsageError, report_error
from core.plugins import PluginManager, describe_all
from core.provenance import version_line
from core.registry import print_listing
from core.resume import check_data, check_resume, check_task, record_resume, trained_run
from core.run_folder import CHECKPOINT, CONFIG, METRICS
from core.tasks import check_installed_tasks, describe_tasks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m core.run",
        description="Train a geospatial model with a mix of training-strategy plugins.",
    )
    parser.add_argument(
        "--version",
        action="store_true",
        help="terraplug's version and the folders core and plugins were imported from",
    )
    parser.add_argument("--plugins", help="plugins to activate, in this order: a,b,c")
    parser.add_argument("--list-plugins", action="store_true", help="list plugins and exit")
    parser.add_argument("--list-tasks", action="store_true", help="list tasks and exit")
    parser.add_argument(
        "--task", help="dem_sr (default), sar2opt, or a task an installed distribution adds"
    )
    parser.add_argument("--config", type=Path, help="a TOML config file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config key (repeatable); the value is read as TOML",
    )
    parser.add_argument(
        "--data", help="a GeoTIFF of any size or a folder of them (default: data.source)"
    )
    parser.add_argument("--epochs", type=int, help="shortcut for run.epochs")
    parser.add_argument("--out", help="run folder (shortcut for run.out)")
    parser.add_argument("--seed", type=int, help="shortcut for run.seed")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run")
    parser.add_argument(
        "--strict-plugins",
        action="store_true",
        help="stop when any installed third-party plugin or task fails to load, even one the "
        "run does not name (a named one must always load)",
    )
    parser.add_argument(
        "--strict-data",
        action="store_true",
        help="stop at the first bad tile instead of skipping it (shortcut for data.strict=true)",
    )
    return parser


def shortcut_overrides(args: argparse.Namespace) -> list[str]:
    """The shortcut options as ``--set`` assignments, in JSON (which ``--set`` reads)."""
    pairs = {
        "run.task": args.task,
        "run.epochs": args.epochs,
        "run.seed": args.seed,
        "run.out": args.out,
        "data.dir": args.data,
        "data.strict": True if args.strict_data else None,
        "run.plugins": None if args.plugins is None else plugin_names(args.plugins),
    }
    return [f"{key}={json.dumps(value)}" for key, value in pairs.items() if value is not None]


def plugin_names(option: str) -> list[str]:
    """``--plugins a,b`` as a list; an empty name is a mistake, not "no plugin"."""
    if not option.strip():
        raise UsageError("--plugins '' names no plugin; omit --plugins to train without plugins")
    names = [name.strip() for name in option.split(",")]
    if not all(names):
        raise UsageError(f"--plugins {option!r} has an empty plugin name; separate names by commas")
    return names


def resolve_config(args: argparse.Namespace) -> tuple[Config, dict[str, Any] | None]:
    """The run's config and, with ``--resume``, the checkpoint it continues from, read once
    here (the resume checks need it) and handed to the trainer."""
    overrides = [*shortcut_overrides(args), *args.set]
    if args.resume is None:
        config = absolute_data(load_config(args.config, overrides))
        config.resumed = []  # a run repeated from another's config.toml starts its own history
        return config, None
    saved = args.resume / CONFIG
    problem = resume_problem(args.resume)
    if problem:
        raise UsageError(f"--resume {args.resume}: {problem}")
    if args.config:
        raise UsageError("--resume uses the run's own config.toml; drop --config")
    trained, checkpoint = trained_run(args.resume)
    check_task(args.resume, trained, overrides)
    run_out = f"run.out={json.dumps(str(args.resume))}"
    config = absolute_data(load_config(saved, [*overrides, run_out]))
    check_resume(args.resume, trained, config, edited=absolute_data(load_config(saved)))
    check_data(args.resume, checkpoint["data"], config.data.dir)
    record_resume(trained, config, after_epoch=checkpoint["epoch"])
    return config, checkpoint


def resume_problem(run_dir: Path) -> str | None:
    """What ``run_dir`` lacks to be resumed, and what to run instead; None if nothing."""
    if not run_dir.is_dir():
        return "no such run folder"
    config = run_dir / CONFIG
    if not config.is_file():
        return "no config.toml there: not a run folder, or its run never started"
    if (run_dir / CHECKPOINT).is_file():
        return None
    # config.toml is written at start-up, the checkpoint after the first epoch (or after
    # train.checkpoint_every epochs), so the run stopped before it: start it again.
    if (run_dir / METRICS).exists():  # epochs ran, but none was checkpointed
        again = run_dir.with_name(run_dir.name + "-again")
        where = f"in a new folder: python -m core.run --config {config} --out {again}"
    else:
        where = f"with: python -m core.run --config {config} --out {run_dir}"
    return (
        "config.toml is there but checkpoint.pt is not: the run stopped before its first "
        f"checkpoint, so there is nothing to resume. Start it again {where}"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.version:
        print(version_line())
        return 0
    try:
        if args.list_plugins:
            return print_listing("plugin", describe_all(), args.strict_plugins)
        if args.list_tasks:
            return print_listing("task", describe_tasks(), args.strict_plugins)
        if args.strict_plugins:
            check_installed_tasks()
        config, checkpoint = resolve_config(args)
        plugins = PluginManager.from_names(
            config.run.plugins, config.plugins, strict=args.strict_plugins
        )
        from core.train import Interrupted, NonFiniteLossError, Trainer

        trainer = Trainer(config, plugins, resume=checkpoint)
        try:
            trainer.fit()
        except Interrupted as signal_name:
            if trainer.accelerator.is_main_process:
                print(
                    f"{signal_name}: checkpoint saved; continue with {trainer.resume_command()}",
                    file=sys.stderr,
                )
            return EXIT_INTERRUPTED
        except (NonFiniteLossError, StorageError) as error:
            return report_error(error)
        finally:
            trainer.release_run_dir()
            for tracker in trainer.accelerator.trackers:  # flushed however the run ended:
                tracker.finish()  # a rank of several leaves without finalization
    except UsageError as error:
        return report_error(error)
    finally:
        close_process_group()
    return 0


def close_process_group() -> None:
    """Destroy the process group a run started, however it ended (a refused run folder
    included): one left to the interpreter's exit can abort it, as gloo's worker threads
    still hold work then ("terminate called without an active exception", SIGABRT)."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_initialized():
        distributed.destroy_process_group()


def exit_process(status: int) -> None:
    """Exit with ``status``. After an interruption the checkpoint is saved and every process
    is leaving: a launcher that stops the remaining workers once one has exited (torchrun
    sends SIGTERM) must not turn their status 130 into a kill.

    A process of a multi-process run leaves without the interpreter's finalization, its
    output flushed and every file closed by then: gloo's C++ threads can abort it
    ("terminate called without an active exception", SIGABRT) even after the process
    group is destroyed, which turned a finished or stopped rank's status into -6.
    """
    if status == EXIT_INTERRUPTED:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    exit_process(main())
