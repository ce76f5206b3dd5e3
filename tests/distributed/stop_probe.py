"""``python -m core.run`` with a probe that holds one process at a chosen step until a
signal reaches it, so a test can signal a multi-process run at a known step.

Run under ``accelerate launch`` as the script, followed by ``core.run``'s arguments::

    accelerate launch --multi_gpu --num_processes 2 tests/distributed/stop_probe.py \\
        --plugins stop_probe --set plugins.stop_probe.rank=1 --set plugins.stop_probe.step=2 ...

Process ``rank``, after the backward pass of the step that starts with ``step`` optimizer
steps done, writes ``RUN_DIR/paused.json`` (its pid) and waits until SIGTERM or SIGINT
arrives. Every step logs its number (``stop_probe_step``, whose epoch mean a resumed run
gets right only if the interrupted epoch's logged values were kept). Every process writes
the status ``core.run`` exits with to ``RUN_DIR/exit_rank<r>``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import attrs

import plugins
from core.context import RunContext
from core.hookspecs import hookimpl
from core.plugins import Plugin
from core.run import build_parser, exit_process
from core.run import main as run_main

PAUSED = "paused.json"
LOG_KEY = "stop_probe_step"
WAIT_SECONDS = 120.0
"""How long the paused process waits for the signal before it goes on (and the run ends
uninterrupted, which the test reports)."""


def wait_for_signal(announce: Path) -> None:
    """Write this process's pid to ``announce``, return once SIGTERM or SIGINT has reached it
    and the handler in place (the trainer's) has run."""
    received: list[int] = []
    handlers: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler = handlers[sig] = signal.getsignal(sig)

        def note(signum: int, frame: Any, handler: Any = handler) -> None:
            received.append(signum)
            handler(signum, frame)

        signal.signal(sig, note)
    partial = announce.with_name(announce.name + ".partial")
    partial.write_text(json.dumps({"pid": os.getpid()}))
    partial.replace(announce)
    deadline = time.monotonic() + WAIT_SECONDS
    while not received and time.monotonic() < deadline:
        time.sleep(0.01)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


class StopProbe(Plugin):
    """Test probe: logs each step's number; holds one process at one step until a signal
    reaches it."""

    name = "stop_probe"

    @attrs.frozen
    class Config:
        rank: int = -1
        """The process to hold; -1: none."""
        step: int = 0
        """Hold it in the step that starts with this many optimizer steps done."""

    @hookimpl
    def transform_gradients(self, model: Any, ctx: RunContext) -> None:
        ctx.log(LOG_KEY, ctx.global_step)
        here = (ctx.accelerator.process_index, ctx.global_step)
        if here == (self.config.rank, self.config.step):
            wait_for_signal(ctx.run_dir / PAUSED)


def main() -> None:
    args, _ = build_parser().parse_known_args()
    run_dir = Path(args.resume or args.out)
    plugins.BUILTIN_PLUGINS[StopProbe.name] = "stop_probe:StopProbe"
    status = run_main()
    (run_dir / f"exit_rank{os.environ['RANK']}").write_text(str(status))
    exit_process(status)


if __name__ == "__main__":
    main()
