"""Shared fixtures: procedural tiles and a fast training helper."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.state import AcceleratorState, PartialState

from core.config import load_config
from core.data.procedural import write_procedural_tiles
from core.plugins import ActivePlugin, PluginManager
from core.train import Trainer

# One thread per process: the suite starts multi-process runs on small CPU machines, where
# torch's default of one thread per core makes processes contend for every core.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

FAST = [
    "model.n_resgroups=1",
    "model.n_resblocks=1",
    "model.n_feats=8",
    "data.batch_size=8",
    "train.progress='never'",
]


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Accelerate keeps process-wide singletons; each in-process run starts clean."""
    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def train_run(tmp_path: Path, procedural_dir: Path) -> Callable[..., list[dict[str, Any]]]:
    """Train in-process on procedural tiles with probe plugin objects; returns metric rows."""

    def run(*plugin_objects: Any, out: str = "run", overrides: tuple[str, ...] = ()) -> list:
        config = load_config(
            None,
            [
                *FAST,
                f"data.dir='{procedural_dir}'",
                f"run.out='{tmp_path / out}'",
                "run.epochs=2",
                *overrides,
            ],
        )
        active = [
            ActivePlugin(getattr(obj, "name", type(obj).__name__), "test", obj, None)
            for obj in plugin_objects
        ]
        Trainer(config, PluginManager(active)).fit()
        return read_metrics(tmp_path / out)

    return run


@pytest.fixture(scope="session")
def procedural_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Procedural tiles, 8 per terrain (48 x 48 at 30 m, UTM), written once per session."""
    return write_procedural_tiles(tmp_path_factory.mktemp("procedural"))
