"""A plugin's test harness: the real trainer, in-process, on procedural tiles, in seconds.

What ``pytester`` is to pytest plugins::

    from terraplug.testing import run_training

    def test_my_plugin_trains(tmp_path):
        rows = run_training(tmp_path, plugins=["my_plugin"], overrides=["plugins.my_plugin.k=2"])
        assert rows[-1]["my_plugin_metric"] > 0

Plugins are given by name (discovered as ``--plugins`` does: built-ins and installed entry
points, configured from ``[plugins.<name>]`` overrides) or as objects (a probe instance that
records what its hooks see). The model is RCAN-DEM at its smallest, so two epochs take a
few seconds on one CPU core.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate.state import AcceleratorState, PartialState

from core.config import load_config
from core.plugins import ActivePlugin, PluginManager
from core.run_folder import METRICS
from core.tasks.dem_sr.data.procedural import write_procedural_tiles
from core.train import Trainer

FAST_ANY_TASK: tuple[str, ...] = ("data.batch_size=8", "train.progress='never'")
"""``--set`` overrides every task takes: small batches, no progress bar."""
FAST: tuple[str, ...] = (
    "model.n_resgroups=1",
    "model.n_resblocks=1",
    "model.n_feats=8",
    *FAST_ANY_TASK,
)
"""``FAST_ANY_TASK`` and the smallest RCAN-DEM: dem_sr's fast settings (another task's
``[model]`` keys are its own)."""


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run folder's ``metrics.jsonl``, one per epoch."""
    return [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]


def procedural_tiles(folder: Path) -> Path:
    """Procedural DEM tiles (8 per terrain, 48 x 48 at 30 m) in ``folder``, written once."""
    if not any(Path(folder).glob("*.tif")):
        write_procedural_tiles(folder)
    return Path(folder)


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
    task: str = "dem_sr",
) -> list[dict[str, Any]]:
    """Train ``epochs`` epochs of ``task`` in ``tmp_path / out``; returns the
    ``metrics.jsonl`` rows.

    ``overrides`` are ``--set`` assignments applied after the fast settings (``FAST``);
    ``data_dir`` defaults to procedural DEM tiles written once under ``tmp_path / "tiles"``
    for dem_sr, and to the task's own default data for another task.
    """
    fast = FAST if task == "dem_sr" else FAST_ANY_TASK
    if data_dir is None and task == "dem_sr":
        data_dir = procedural_tiles(Path(tmp_path) / "tiles")
    run_dir = Path(tmp_path) / out
    names = [plugin for plugin in plugins if isinstance(plugin, str)]
    config = load_config(
        None,
        [
            *fast,
            f"run.task={json.dumps(task)}",
            f"data.dir={json.dumps(str(data_dir or ''))}",
            f"run.out={json.dumps(str(run_dir))}",
            f"run.epochs={epochs}",
            f"run.plugins={json.dumps(names)}",
            *overrides,
        ],
    )
    try:
        Trainer(config, PluginManager(active_plugins(plugins, config))).fit()
    finally:  # Accelerate keeps process-wide singletons; the next run starts clean
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
    return read_metrics(run_dir)
