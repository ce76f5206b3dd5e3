"""The ``ema`` plugin: validation scores the averaged weights, the task's export and
``core.predict`` use them (dem_sr's predict, and any task's through ``terraplug.TrainedRun``).
Resuming an ``ema`` run bit for bit is test_plugin_contract's, as for every plugin."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine

import core.tasks
from core.data.geotiff import write_dem
from core.predict import main as predict_main
from core.run import main as run_main
from core.run_folder import CHECKPOINT
from core.tasks.dem_sr.task import DemSuperResolution
from terraplug import (
    PredictOptions,
    RunContext,
    TrainedRun,
    atomic_write,
    geotiff_profile,
    hookimpl,
    load_checkpoint,
    read_run_config,
    write_geotiff,
)
from terraplug.data import read_dem
from terraplug.testing import FAST, run_training

DECAY = 0.5
STEPS = ("train.max_steps_per_epoch=3",)
EMA = (f"plugins.ema.decay={DECAY}", *STEPS)
"""A decay that moves the averages visibly in the few steps of a test run."""
UTM = "EPSG:32613"
UTM_TRANSFORM = Affine(90.0, 0.0, 500_000.0, 0.0, -90.0, 4_400_000.0)


class ManualEma:
    """The textbook average ``decay * average + (1 - decay) * weight``, in float64, of the
    trainable weights after every optimizer step; records the weights each validation ran
    on. With ``evaluate``, it also provides those averages as the ``evaluation_weights``."""

    def __init__(self, evaluate: bool = False) -> None:
        self.evaluate = evaluate
        self.validated: list[tuple[dict, dict, dict]] = []
        """Per validation: the model's weights then, the manual averages, the trained ones."""

    def trainable(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        self.model = ctx.model
        self.averages = {name: weight.double() for name, weight in self.trainable().items()}
        self.trained = self.trainable()

    @hookimpl
    def after_optimizer_step(self) -> None:
        self.trained = self.trainable()
        for name, weight in self.trained.items():
            self.averages[name] = DECAY * self.averages[name] + (1 - DECAY) * weight.double()

    @hookimpl
    def evaluation_weights(self, weights: dict) -> dict | None:
        if not self.evaluate:
            return None
        return {**weights, **{name: avg.float() for name, avg in self.averages.items()}}

    @hookimpl
    def validation_metrics(self) -> None:
        manual = {name: average.clone() for name, average in self.averages.items()}
        self.validated.append((self.trainable(), manual, self.trained))


def test_validation_scores_the_averaged_weights(tmp_path: Path, procedural_dir: Path) -> None:
    probe = ManualEma()
    rows = run_training(tmp_path, ["ema", probe], EMA, data_dir=procedural_dir)
    assert len(probe.validated) == 2
    for validated, manual, trained in probe.validated:
        for name, weight in validated.items():
            torch.testing.assert_close(weight.double(), manual[name], rtol=1e-6, atol=1e-7)
        assert any(not torch.equal(validated[name], trained[name]) for name in trained)

    reference = ManualEma(evaluate=True)  # the manual averages, validated the same way
    manual = run_training(tmp_path, [reference], STEPS, data_dir=procedural_dir, out="manual")
    for row, expected in zip(rows, manual, strict=True):
        assert row["train_loss"] == expected["train_loss"], "training never sees the averages"
        for key in ("val_loss", "val_rmse_m", "val_slope_rmse_deg"):
            assert row[key] == pytest.approx(expected[key], rel=1e-5), key
    saved = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    for name, average in saved["plugins"]["ema"]["averages"].items():
        torch.testing.assert_close(average.double(), reference.averages[name], rtol=1e-6, atol=1e-7)
        assert torch.equal(saved["model"][name], reference.trained[name]), "trained weights"


@pytest.mark.parametrize(
    ("decay", "problem"), [("1.0", "< 1.0"), ("0", "> 0.0"), ("nan", "finite")]
)
def test_decay_out_of_range_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture, decay: str, problem: str
) -> None:
    args = ["--plugins", "ema", "--set", f"plugins.ema.decay={decay}", "--out", str(tmp_path)]
    assert run_main(args) == 2
    err = capsys.readouterr().err
    assert "'decay' must be" in err and problem in err and "plugins.ema.decay" in err
    assert not any(tmp_path.iterdir()), "nothing trained"


def elevation(shape: tuple[int, int]) -> np.ndarray:
    """Hills between roughly 1200 and 1800 m."""
    y, x = np.mgrid[: shape[0], : shape[1]]
    return 1500 + 300 * np.sin(x / 5) * np.cos(y / 7)


def predicted(run: Path, source: Path, out: Path) -> np.ndarray:
    assert predict_main(["--checkpoint", str(run), str(source), str(out), "--cpu", "--quiet"]) == 0
    with rasterio.open(out) as dst:
        return dst.read(1)


def with_weights(run: Path, copy: Path, averaged: bool) -> Path:
    """A copy of ``run`` whose checkpoint holds the averages (or the trained weights) as its
    model and no ema state, so ema changes nothing in it."""
    shutil.copytree(run, copy)
    state = load_checkpoint(copy / CHECKPOINT)
    if averaged:
        state["model"] = {**state["model"], **state["plugins"]["ema"]["averages"]}
    state["plugins"] = {}
    torch.save(state, copy / CHECKPOINT)
    return copy


def test_dem_sr_predict_uses_the_averaged_weights(tmp_path: Path, procedural_dir: Path) -> None:
    run_training(tmp_path, ["ema"], EMA, data_dir=procedural_dir)
    source = write_dem(tmp_path / "in.tif", elevation((24, 24)), UTM_TRANSFORM, UTM)
    output = predicted(tmp_path / "run", source, tmp_path / "ema.tif")
    averaged = with_weights(tmp_path / "run", tmp_path / "averaged", averaged=True)
    np.testing.assert_array_equal(output, predicted(averaged, source, tmp_path / "averaged.tif"))
    trained = with_weights(tmp_path / "run", tmp_path / "trained", averaged=False)
    assert not np.array_equal(output, predicted(trained, source, tmp_path / "trained.tif"))


class PublicPredict(DemSuperResolution):
    """A task whose ``predict`` and ``export_model`` use only terraplug's public names."""

    name = "public_predict"

    def export_model(self, model: torch.nn.Module, ctx: RunContext) -> None:
        state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        atomic_write(ctx.run_dir / "export.pt", lambda handle: torch.save(state, handle))

    def predict(self, run_dir: Path, src: Path, dst: Path, options: PredictOptions) -> None:
        scale = read_run_config(run_dir).data.scale
        trained = TrainedRun.restore(run_dir, cpu=options.cpu)
        dem = read_dem(src)
        batch = {"lr": standardised(dem.elevation), "terrain": torch.zeros(1, dtype=torch.long)}
        with torch.no_grad():
            out = trained.model(trained.route(batch)["lr"])[0, 0].numpy()
        transform = dem.transform @ Affine.scale(1 / scale)
        profile = geotiff_profile(*out.shape, 1, "float32", dem.crs, transform)
        with write_geotiff(dst, profile) as writer:
            writer.write(out, 1)


def standardised(elevation: np.ndarray) -> torch.Tensor:
    """``[1, 1, H, W]``, zero mean and unit variance."""
    z = (elevation - elevation.mean()) / elevation.std()
    return torch.from_numpy(z.astype(np.float32))[None, None]


def test_a_tasks_own_predict_and_export_get_the_averaged_weights(
    tmp_path: Path, procedural_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(core.tasks.BUILTIN_TASKS, "public_predict", f"{__name__}:PublicPredict")
    overrides = [*FAST, "run.task='public_predict'", *EMA]
    run_training(tmp_path, ["ema"], overrides, data_dir=procedural_dir, task="public_predict")
    run = tmp_path / "run"
    saved = load_checkpoint(run / CHECKPOINT)
    averages = saved["plugins"]["ema"]["averages"]
    exported = torch.load(run / "export.pt", weights_only=True)
    assert all(torch.equal(exported[name], average) for name, average in averages.items())

    source = write_dem(tmp_path / "in.tif", elevation((16, 16)), UTM_TRANSFORM, UTM)
    output = predicted(run, source, tmp_path / "out.tif")
    model = DemSuperResolution().build_model(read_run_config(run))
    lr = standardised(read_dem(source).elevation)
    for weights, equal in ((averages, True), ({}, False)):
        model.load_state_dict({**saved["model"], **weights})
        with torch.no_grad():
            expected = model.eval()(lr)[0, 0].numpy()
        assert np.array_equal(output, expected) == equal
