"""Shared fixtures: procedural tiles and a fast training helper."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from core.data import window_index
from core.tasks.dem_sr.data.procedural import write_procedural_tiles
from terraplug.testing import FAST, read_metrics, reset_accelerate_state, run_training

__all__ = ["FAST", "read_metrics"]

# One thread per process: the suite starts multi-process runs on small CPU machines, where
# torch's default of one thread per core makes processes contend for every core.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _own_window_indexes(tmp_path_factory: pytest.TempPathFactory):
    """The suite's window indexes in a folder of its own: the user's cache keeps its 256
    most recently used indexes, which the suite's hundreds of folders would push out."""
    folder = tmp_path_factory.mktemp("window-indexes")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(window_index, "index_folder", lambda: folder)
        yield


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Accelerate keeps process-wide singletons; each in-process run starts clean."""
    yield
    reset_accelerate_state()


@pytest.fixture
def train_run(tmp_path: Path, procedural_dir: Path) -> Callable[..., list[dict[str, Any]]]:
    """Train in-process on procedural tiles with probe plugin objects; returns metric rows."""

    def run(*plugin_objects: Any, out: str = "run", overrides: tuple[str, ...] = ()) -> list:
        return run_training(tmp_path, plugin_objects, overrides, data_dir=procedural_dir, out=out)

    return run


@pytest.fixture(scope="session")
def procedural_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Procedural tiles, 8 per terrain (48 x 48 at 30 m, UTM), written once per session."""
    return write_procedural_tiles(tmp_path_factory.mktemp("procedural"))


def install_distribution(source: Path, target: Path) -> Path:
    """pip-install the distribution in ``source`` for real (no dependencies) into ``target``,
    a folder of its own, and return it: put it on ``sys.path`` (``monkeypatch.syspath_prepend``)
    or ``PYTHONPATH`` to see its entry points. The running environment stays as it was, so
    tests running side by side never see the distribution; it is built from a copy, so the
    source tree gets no ``build/`` or ``*.egg-info``."""
    build = target.with_name(f"{target.name}-source")
    leftovers = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    shutil.copytree(source, build, ignore=leftovers)
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install",
         "--no-deps", "--no-build-isolation", "--target", str(target), str(build)],
        check=True, capture_output=True,
    )  # fmt: skip
    return target
