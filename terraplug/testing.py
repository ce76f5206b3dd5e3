"""A plugin's or a task's test harness: the real trainer, in-process, on small data, in seconds.

What ``pytester`` is to pytest plugins::

    from terraplug.testing import run_training

    def test_my_plugin_trains(tmp_path):
        rows = run_training(tmp_path, plugins=["my_plugin"], overrides=["plugins.my_plugin.k=2"])
        assert rows[-1]["my_plugin_metric"] > 0

Plugins are given by name (discovered as ``--plugins`` does: built-ins and installed entry
points, configured from ``[plugins.<name>]`` overrides) or as objects (a probe instance that
records what its hooks see). Any task trains, a built-in or an installed one: its
``harness`` (:class:`terraplug.HarnessSettings`) gives its smallest model and writes its
small data set (dem_sr: a one-block RCAN on procedural tiles, two epochs in a few seconds on
one CPU core).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate.state import AcceleratorState, GradientState

from core.config import RunSection, load_config
from core.plugins import ActivePlugin, PluginManager
from core.run_folder import METRICS
from core.tasks import HarnessSettings, harness_settings, task_class
from core.train import Trainer

__all__ = [
    "FAST",
    "FAST_ANY_TASK",
    "fast_overrides",
    "read_metrics",
    "reset_accelerate_state",
    "run_training",
    "task_data",
]

FAST_ANY_TASK: tuple[str, ...] = ("data.batch_size=8", "train.progress='never'")
"""``--set`` overrides the harness applies to every task, before the task's own: small
batches, no progress bar."""


def harness(task: str | None) -> HarnessSettings:
    """The ``harness`` of ``task`` (None: the default task, ``run.task``'s default)."""
    return harness_settings(task_class(task or RunSection().task))


def fast_overrides(task: str | None = None) -> tuple[str, ...]:
    """``FAST_ANY_TASK``, then the task's own ``harness.overrides`` (its smallest model)."""
    return (*FAST_ANY_TASK, *harness(task).overrides)


FAST: tuple[str, ...] = fast_overrides()
"""``fast_overrides()`` of the default task (dem_sr), for runs through the command line."""


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run folder's ``metrics.jsonl``, one per epoch."""
    return [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]


def task_data(folder: Path, task: str | None = None) -> Path | None:
    """The small data set the task's ``harness.data`` writes, in ``folder``, written once
    (a folder that holds files is used as it is); None for a task without one, which trains
    on its own default data."""
    write = harness(task).data
    if write is None:
        return None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not any(folder.iterdir()):
        write(folder)
    return folder


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide state, so that the next run in this process sets it
    up afresh (its device, precision and process group, and the data loaders it tracks).

    Accelerate keeps that state in singletons (``PartialState``, ``AcceleratorState``,
    ``GradientState``) and offers no public call that clears them: its own test base class,
    ``accelerate.test_utils.testing.AccelerateTestCase``, calls the private ``_reset_state``
    methods used here, and so does every in-process caller that starts a second run. This
    function is the only place terraplug does so; a test fails when Accelerate changes them.
    """
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def active_plugins(plugins: Sequence[str | object], config: Any) -> list[ActivePlugin]:
    """Named plugins loaded and configured as the CLI does; objects registered as they are."""
    names = [plugin for plugin in plugins if isinstance(plugin, str)]
    loaded = {p.name: p for p in PluginManager.from_names(names, config.plugins).active}
    return [
        loaded[plugin]
        if isinstance(plugin, str)
        else ActivePlugin(
            getattr(plugin, "name", "") or type(plugin).__name__,
            "test",
            plugin,
            getattr(plugin, "config", None),
        )
        for plugin in plugins
    ]


def run_training(
    tmp_path: Path,
    plugins: Sequence[str | object] = (),
    overrides: Sequence[str] = (),
    *,
    epochs: int = 2,
    data_dir: Path | None = None,
    out: str = "run",
    task: str | None = None,
) -> list[dict[str, Any]]:
    """Train ``epochs`` epochs of ``task`` (None: the default task) in ``tmp_path / out``;
    returns the ``metrics.jsonl`` rows.

    ``overrides`` are ``--set`` assignments applied after ``fast_overrides(task)``;
    ``data_dir`` defaults to the task's ``task_data`` under ``tmp_path / "tiles"``, and to
    the task's own default data for a task without one.
    """
    if data_dir is None:
        data_dir = task_data(Path(tmp_path) / "tiles", task)
    run_dir = Path(tmp_path) / out
    names = [plugin for plugin in plugins if isinstance(plugin, str)]
    config = load_config(
        None,
        [
            *fast_overrides(task),
            *([f"run.task={json.dumps(task)}"] if task else []),
            f"data.dir={json.dumps(str(data_dir or ''))}",
            f"run.out={json.dumps(str(run_dir))}",
            f"run.epochs={epochs}",
            f"run.plugins={json.dumps(names)}",
            *overrides,
        ],
    )
    try:
        Trainer(config, PluginManager(active_plugins(plugins, config))).fit()
    finally:  # the next run in this process starts clean
        reset_accelerate_state()
    return read_metrics(run_dir)
