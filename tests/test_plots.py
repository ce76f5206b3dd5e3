"""Plots write readable, non-empty PNGs from metrics rows and example tiles."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from core.plots import plot_loss_curves
from core.tasks.dem_sr.losses import COMPONENTS
from core.tasks.dem_sr.plots import hillshade, plot_hillshade_triptych, plot_terrain_rmse


def assert_png(path: Path) -> None:
    assert path.stat().st_size > 5_000
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # something was drawn


def metric_rows(epochs: int, with_steps: bool) -> list[dict]:
    rows = []
    for epoch in range(1, epochs + 1):
        row: dict = {"epoch": epoch, "train_loss": 2.0 / epoch, "val_loss": 2.2 / epoch}
        row |= {f"train_loss_{c}": (k + 1) * 0.1 / epoch for k, c in enumerate(COMPONENTS)}
        if with_steps:
            steps = [1.0 / epoch + 0.01 * (s % 3) for s in range(30)]
            steps[20] *= 3
            row["step_losses"] = steps
        rows.append(row)
    return rows


@pytest.mark.parametrize("with_steps", [False, True])
def test_loss_curves(tmp_path: Path, with_steps: bool) -> None:
    path = tmp_path / "loss.png"
    rows = metric_rows(4, with_steps)
    rows[2]["val_loss"] = math.nan  # a missing value is skipped, not plotted
    plot_loss_curves(rows, path, COMPONENTS)
    assert_png(path)


def test_loss_curves_of_a_single_epoch(tmp_path: Path) -> None:
    path = tmp_path / "loss.png"
    plot_loss_curves([{"epoch": 1, "train_loss": 1.0}], path)
    assert_png(path)


def test_terrain_rmse(tmp_path: Path) -> None:
    path = tmp_path / "terrain.png"
    row = {
        "epoch": 3,
        "val_rmse_m_by_terrain": {"extreme": 12.5, "flat": 0.8, "desert": 2.1},
        "val_mae_m_by_terrain": {"extreme": 9.0, "flat": 0.5, "desert": 1.6},
        "val_slope_rmse_deg_by_terrain": {"extreme": 4.2, "flat": 0.3, "desert": 1.1},
    }
    plot_terrain_rmse(row, path)
    assert_png(path)


def test_terrain_rmse_without_data(tmp_path: Path) -> None:
    path = tmp_path / "terrain.png"
    plot_terrain_rmse({"val_rmse_m_by_terrain": {}}, path)
    assert_png(path)


def test_hillshade_lights_from_the_northwest() -> None:
    rows, cols = np.mgrid[:6, :6].astype(float)
    flat = hillshade(np.zeros((6, 6)), (30.0, 30.0))
    np.testing.assert_allclose(flat, math.sin(math.radians(45)))
    facing_west = hillshade(cols * 30.0, (30.0, 30.0))  # rises eastwards, faces the sun
    facing_east = hillshade(-cols * 30.0, (30.0, 30.0))
    assert (facing_west > flat).all() and (facing_east < flat).all()
    facing_north = hillshade(rows * 30.0, (30.0, 30.0))  # rows run south: rises southwards
    assert (facing_north > flat).all()


def test_hillshade_triptych(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    examples = {}
    for name, relief in (("flat", 2.0), ("alpine", 300.0), ("extreme", 900.0)):
        hr = relief * rng.standard_normal((48, 48)).cumsum(0).cumsum(1) / 48
        lr = hr.reshape(16, 3, 16, 3).mean((1, 3))
        pred = np.kron(lr, np.ones((3, 3)))
        pred[:3, :3] = np.nan  # nodata stays blank
        examples[name] = (lr, pred, hr, (30.0, 22.0))
    path = tmp_path / "hillshade.png"
    plot_hillshade_triptych(examples, path)
    assert_png(path)
