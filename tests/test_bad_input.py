"""Bad input and misbehaving code: each stops with a message naming the file, key or plugin,
or is skipped and counted, and never costs the last checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from affine import Affine

import plugins
from core.config import dump_config, load_config
from core.data.geotiff import read_dem, write_dem
from core.errors import ConfigError
from core.hookspecs import hookimpl
from core.plugins import Plugin
from core.predict import main as predict_main
from core.run import main
from core.run_folder import CHECKPOINT
from core.safe_io import load_checkpoint
from core.tasks.dem_sr.data.dataset import TileDataset
from core.tasks.dem_sr.data.labels import label_from_dem
from core.tasks.dem_sr.terrain import TERRAINS
from core.train import NonFiniteLossError, all_finite
from tests.conftest import FAST, read_metrics

REPO = Path(__file__).resolve().parent.parent
UTM = "EPSG:32613"
BOOM_ENV = "TERRAPLUG_TEST_BOOM_EPOCH"


def utm(cell: float = 30.0) -> Affine:
    return Affine(cell, 0.0, 500_000.0, 0.0, -cell, 4_400_000.0)


def fast_args(data: Path, out: Path, *extra: str) -> list[str]:
    args = ["--data", str(data), "--out", str(out), "--epochs", "1", *extra]
    for assignment in FAST:
        args += ["--set", assignment]
    return args


def steep_plane(shape: tuple[int, int] = (48, 48), slope_deg: float = 40.0) -> np.ndarray:
    x = np.arange(shape[1]) * 30.0
    return np.broadcast_to(500 + np.tan(np.radians(slope_deg)) * x, shape).copy()


# --- bad data through the CLI ----------------------------------------------------------------


def test_empty_folder_exits_2_naming_it(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "tiles"
    empty.mkdir()
    assert main(fast_args(empty, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no .tif" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_folder_of_only_bad_tiles_exits_2_and_warns_about_each(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "tiles"
    folder.mkdir()
    text = folder / "notes.tif"
    text.write_text("not a raster")
    void = write_dem(folder / "void.tif", np.full((48, 48), -9999.0), utm(), UTM, nodata=-9999)
    with pytest.warns(UserWarning) as caught:
        assert main(fast_args(folder, tmp_path / "run")) == 2
    warned = " ".join(str(w.message) for w in caught)
    assert str(text) in warned and str(void) in warned and "every pixel is nodata" in warned
    err = capsys.readouterr().err
    assert str(folder) in err and "none of the 2" in err


def test_lr_hr_size_mismatch_names_both_files(tmp_path: Path, capsys) -> None:
    for name, lr_size in (("a.tif", 16), ("b.tif", 15)):
        write_dem(tmp_path / "hr" / name, steep_plane(), utm(), UTM)
        write_dem(tmp_path / "lr" / name, steep_plane((lr_size, lr_size)), utm(90.0), UTM)
    assert main(fast_args(tmp_path, tmp_path / "run", "--strict-data")) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "hr" / "b.tif") in err and str(tmp_path / "lr" / "b.tif") in err


@pytest.fixture
def mixed_folder(procedural_dir: Path, tmp_path: Path) -> dict[str, Path]:
    """The procedural tiles plus a text file named .tif, an all-nodata tile, and a tile whose
    voids are marked with NaN and +-inf."""
    folder = tmp_path / "tiles"
    shutil.copytree(procedural_dir, folder)
    broken = folder / "broken.tif"
    broken.write_text("elevation,1000\n")
    void = write_dem(
        folder / "void.tif", np.full((48, 48), -32768.0), utm(), UTM, -32768, dtype="int16"
    )
    z = read_dem(procedural_dir / "flat_tile_0.tif").elevation.copy()
    z[3:6, 7:9], z[20, :] = np.nan, np.inf
    z[30, 30] = -np.inf
    holes = write_dem(folder / "flat_holes.tif", z, utm(), UTM)  # NaN: no nodata value at all
    return {"folder": folder, "broken": broken, "void": void, "holes": holes}


def test_bad_tiles_among_good_ones_are_skipped_and_counted(mixed_folder, tmp_path) -> None:
    out = tmp_path / "run"
    with pytest.warns(UserWarning) as caught:
        assert main(fast_args(mixed_folder["folder"], out)) == 0
    warned = [str(w.message) for w in caught if "skipping" in str(w.message)]
    assert len(warned) == 2
    assert str(mixed_folder["broken"]) in warned[0] and str(mixed_folder["void"]) in warned[1]
    summary = json.loads((out / "summary.json").read_text())
    skipped = [entry["path"] for entry in summary["skipped_tiles"]]
    assert skipped == [str(mixed_folder["broken"]), str(mixed_folder["void"])]
    assert all("not a readable" in entry["reason"] or "nodata" in entry["reason"]
               for entry in summary["skipped_tiles"])  # fmt: skip
    # NaN and inf are voids, masked out of the loss: nothing non-finite reaches training.
    row = read_metrics(out)[0]
    assert row["nonfinite_steps"] == 0
    assert np.isfinite([row["train_loss"], row["val_loss"], row["val_rmse_m"]]).all()


def test_strict_data_stops_at_the_first_bad_tile(mixed_folder, tmp_path, capsys) -> None:
    assert main(fast_args(mixed_folder["folder"], tmp_path / "run", "--strict-data")) == 2
    err = capsys.readouterr().err
    assert str(mixed_folder["broken"]) in err and "not a readable GeoTIFF" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_nan_and_inf_are_voids_in_the_data_layer(mixed_folder) -> None:
    dataset = TileDataset.from_folder(mixed_folder["folder"], 3)
    sample = dataset[dataset.tile_ids.index("flat_holes")]
    mask = sample["mask"][0].numpy()
    assert not mask[3:6, 7:9].any() and not mask[20].any() and not mask[30, 30]
    assert mask.sum() == 48 * 48 - 6 - 48 - 1
    assert torch.isfinite(sample["lr"]).all() and torch.isfinite(sample["hr"]).all()


# --- terrain labels ----------------------------------------------------------------------------


def test_a_tile_named_after_no_region_is_labelled_from_its_dem(tmp_path: Path) -> None:
    # "tundra" is no region and no category: the name says nothing, the DEM decides
    surfaces = {"tundra_tile_1": steep_plane(slope_deg=40.0), "scan_b": steep_plane(slope_deg=0.5)}
    for name, z in surfaces.items():
        write_dem(tmp_path / f"{name}.tif", z, utm(), UTM)
    dataset = TileDataset.from_folder(tmp_path, 3)
    for tile_id, terrain in zip(dataset.tile_ids, dataset.terrains, strict=True):
        assert TERRAINS[terrain] == label_from_dem(surfaces[tile_id], (30.0, 30.0))
    assert sorted(TERRAINS[t] for t in dataset.terrains) == ["extreme", "flat"]


@pytest.mark.parametrize(
    ("plugin", "assignment"),
    [
        ("terrain_loss", "plugins.terrain_loss.profiles.tundra={edge=1.0}"),
        ("terrain_loss", "plugins.terrain_loss.fallback='tundra'"),
        ("curriculum", "plugins.curriculum.phases=[{start=1, terrains=['flat', 'tundra']}]"),
        ("curriculum", "plugins.curriculum.order=['flat', 'tundra']"),
    ],
)
def test_unknown_terrain_in_a_plugin_config_exits_2(plugin, assignment, tmp_path, capsys):
    args = ["--plugins", plugin, "--set", assignment, "--out", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "tundra" in err and f"plugins.{plugin}" in err


def test_unknown_terrain_for_predict_exits_2(tmp_path: Path, capsys) -> None:
    """dem_sr's terrains are checked first, before the input or the checkpoint is read."""
    dump_config(load_config(), tmp_path / "config.toml")
    args = ["--checkpoint", str(tmp_path), "a.tif", str(tmp_path / "b.tif"), "--terrain", "tundra"]
    assert predict_main(args) == 2
    err = capsys.readouterr().err
    assert "--terrain 'tundra'" in err and "flat, moderate, alpine, desert, extreme" in err


# --- non-finite losses -----------------------------------------------------------------------


class NaNWeights(Plugin):
    """Test probe: NaN loss weights on chosen optimizer steps; records the parameters."""

    name = "nan_weights"

    def __init__(self, config: Any = None, nan_steps: frozenset[int] | None = None) -> None:
        super().__init__(config)
        self.nan_steps = nan_steps  # None: every step
        self.calls = 0
        self.before: list[list[torch.Tensor]] = []  # parameters at the start of each step

    @hookimpl
    def loss_weights(self, weights, batch, ctx):
        step = self.calls
        self.calls += 1
        self.before.append([p.detach().clone() for p in ctx.model.parameters()])
        if self.nan_steps is None or step in self.nan_steps:
            return torch.full_like(weights, float("nan"))
        return None


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_nonfinite_steps_are_skipped_and_counted(train_run) -> None:
    probe = NaNWeights(nan_steps=frozenset({1, 2}))
    rows = train_run(probe, overrides=("run.epochs=1",))
    steps = rows[0]["steps"]
    assert steps >= 4 and probe.calls == steps
    assert rows[0]["nonfinite_steps"] == 2
    changed = [not same(a, b) for a, b in zip(probe.before, probe.before[1:], strict=False)]
    assert changed[:3] == [True, False, False]  # steps 1 and 2 left the weights as they were
    assert all(changed[3:])
    assert np.isfinite([rows[0]["train_loss"], rows[0]["val_loss"]]).all()


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(train_run) -> None:
    probe = NaNWeights()
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row"):
        train_run(probe, overrides=("train.max_nonfinite_steps=3",))
    assert probe.calls == 3


class AlwaysNaN(NaNWeights):
    """Test probe: NaN loss weights on every step."""

    name = "always_nan"


def test_nonfinite_stop_through_the_cli_exits_1(procedural_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(plugins.BUILTIN_PLUGINS, "always_nan", f"{__name__}:AlwaysNaN")
    args = ["--plugins", "always_nan", "--set", "train.max_nonfinite_steps=2"]
    assert main(fast_args(procedural_dir, tmp_path / "run", *args)) == 1
    err = capsys.readouterr().err
    assert "2 optimizer steps in a row had a non-finite loss" in err and "optim.lr" in err


# --- misbehaving plugins -----------------------------------------------------------------------


class Boom(Plugin):
    """Test probe: raises in ``on_epoch_start`` of the epoch named by an environment variable."""

    name = "boom"

    @hookimpl
    def on_epoch_start(self, epoch, ctx):
        if os.environ.get(BOOM_ENV) == str(epoch):
            raise RuntimeError(f"boom in epoch {epoch}")


class ConfigCheck(Plugin):
    """Test probe: refuses the run in ``setup`` with a usage error, as a plugin checking its
    config against the data would."""

    name = "config_check"

    @hookimpl
    def setup(self, ctx):
        raise ConfigError("plugins.config_check.mode does not fit this data")


def test_plugin_exception_names_plugin_and_hook_and_keeps_the_checkpoint(
    procedural_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "run"
    target = f"{__name__}:Boom"
    # ``python -m core.run`` with the probe registered as a built-in, in a real interpreter
    # whose uncaught exception prints the traceback and exits 1.
    script = (
        "import runpy, plugins; "
        f"plugins.BUILTIN_PLUGINS['boom'] = {target!r}; "
        "runpy.run_module('core.run', run_name='__main__', alter_sys=True)"
    )
    args = fast_args(procedural_dir, out, "--plugins", "boom", "--epochs", "2", "--set",
                     "train.max_steps_per_epoch=1")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), BOOM_ENV: "2"}
    result = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=240, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" in result.stderr and "RuntimeError: boom in epoch 2" in result.stderr
    assert "raised by plugin 'boom' in hook 'on_epoch_start'" in result.stderr
    state = load_checkpoint(out / CHECKPOINT)
    assert state["epoch"] == 1 and len(read_metrics(out)) == 1

    monkeypatch.setitem(plugins.BUILTIN_PLUGINS, "boom", target)
    monkeypatch.delenv(BOOM_ENV, raising=False)
    assert main(["--resume", str(out)]) == 0
    assert [row["epoch"] for row in read_metrics(out)] == [1, 2]


def test_plugin_usage_error_names_plugin_and_hook(procedural_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(plugins.BUILTIN_PLUGINS, "config_check", f"{__name__}:ConfigCheck")
    args = fast_args(procedural_dir, tmp_path / "run", "--plugins", "config_check")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "does not fit this data" in err
    assert "raised by plugin 'config_check' in hook 'setup'" in err


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_bad_element_in_any_tensor_and_dtype(bad: float) -> None:
    tensors = [torch.randn(8, 8, 3, 3), torch.randn(8), torch.randn(5, dtype=torch.bfloat16)]
    tensors.append(torch.full((3,), 3.0e38))  # huge but finite: no overflow false alarm
    before = [t.clone() for t in tensors]
    assert all_finite(tensors)
    assert all(torch.equal(a, b) for a, b in zip(tensors, before, strict=True))  # untouched
    for tensor in tensors:
        saved = tensor.flatten()[-1].item()
        tensor.view(-1)[-1] = bad
        assert not all_finite(tensors), tensor.dtype
        tensor.view(-1)[-1] = saved
    assert all_finite([])
