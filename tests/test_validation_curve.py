"""What the trainer records for the experiment's measures: the validation curve every N
steps, the probe set's loss, the per-tile validation errors and the training loss per
terrain; none of it changes the training, and a resumed run records the same."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from core.hookspecs import hookimpl
from core.run_folder import CHECKPOINT, VAL_TILES_CSV
from core.safe_io import load_checkpoint
from core.val_tiles import read_val_tiles
from tests.conftest import read_metrics
from tests.test_plugin_contract import assert_identical, stopped_and_resumed
from tests.test_run import without_timing

MEASURED = ("train.probe_every=1", "train.validate_every_steps=2")


def test_probes_and_step_validations_leave_the_training_unchanged(train_run, tmp_path: Path):
    plain = train_run(out="plain", overrides=("train.probe_every=0",))
    measured = train_run(out="measured", overrides=MEASURED)
    for key in ("step_losses", "train_loss", "val_rmse_m", "val_loss_by_terrain"):
        assert [row[key] for row in measured] == [row[key] for row in plain], key
    weights = [
        load_checkpoint(tmp_path / run / CHECKPOINT)["model"] for run in ("plain", "measured")
    ]
    assert_identical(*weights, "model")
    assert all(row["probe_steps"] == [] and row["val_curve"][-1]["step"] for row in plain)


class Noisy:
    """Test probe: a training forward that draws a random number and logs it."""

    @hookimpl
    def training_forward(self, model, batch, ctx):
        draw = torch.rand(())
        ctx.log("noisy_draw", float(draw))
        return ctx.task.forward_losses(model, batch) * (1 + 0.1 * draw)


def test_the_probe_goes_through_a_plugins_forward_and_changes_nothing(train_run):
    """The probe runs the loss the run trains with, so a plugin's ``training_forward``: its
    draws come from generators seeded for the probe and restored after it, and what it logs
    there is dropped."""
    plain = train_run(Noisy(), out="plain", overrides=("train.probe_every=0",))
    probed = train_run(Noisy(), out="probed", overrides=("train.probe_every=1",))
    for key in ("step_losses", "noisy_draw", "val_rmse_m"):
        assert [row[key] for row in probed] == [row[key] for row in plain], key
    assert len({v for row in probed for v in row["probe_loss"]}) > 1


class ProbeSizes:
    """Test probe: records the size of every batch the model sees in eval mode through the
    training forward (the probe set's; validation does not go through it)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    @hookimpl
    def training_forward(self, model, batch, ctx):
        if not model.training:
            self.sizes.append(len(batch["lr"]))
        return ctx.task.forward_losses(model, batch)


def test_the_probe_set_is_scored_in_batches_no_larger_than_training_ones(train_run):
    """Scoring the probe set needs no more memory than a training step, and its loss does
    not depend on how it is cut: the probe before step 1 (the same initial weights whatever
    the batch size) reads the same in batches of 6, 6 and 4 as in one batch of 16."""
    small, whole = ProbeSizes(), ProbeSizes()
    rows = train_run(small, out="small", overrides=("train.probe_every=4", "data.batch_size=6"))
    one = train_run(whole, out="whole", overrides=("train.probe_every=4", "data.batch_size=16"))
    assert small.sizes[:3] == [6, 6, 4] and max(small.sizes) == 6
    assert whole.sizes[0] == 16
    # float32 convolutions summed in another order for another batch size: 1e-5 relative
    assert rows[0]["probe_loss"][0] == pytest.approx(one[0]["probe_loss"][0], rel=1e-5)


def test_the_validation_curve_and_the_probe_follow_the_optimizer_steps(train_run):
    every3 = ("train.probe_every=1", "train.validate_every_steps=3", "data.batch_size=4")
    rows = train_run(overrides=every3)  # 30 training tiles: 8 steps per epoch
    assert [row["steps"] for row in rows] == [8, 8]
    curve = [point["step"] for row in rows for point in row["val_curve"]]
    assert curve == [3, 6, 8, 9, 12, 15, 16]  # every 3 steps and each epoch's end
    for row in rows:  # the epoch's own validation is its curve's last point
        last = row["val_curve"][-1]
        assert set(last) == {"step", "val_loss", "val_rmse_m", "val_slope_rmse_deg",
                             "val_tile_median_rmse_m"}  # fmt: skip
        assert all(last[key] == row[key] for key in last if key != "step")
    assert [step for row in rows for step in row["probe_steps"]] == list(range(17))


def test_val_tiles_hold_the_errors_the_metrics_are_made_of(train_run, tmp_path: Path):
    """Per-tile sums give back the pooled RMSE per terrain; the per-tile median is the
    median of the tiles' RMSE; the training loss per terrain, weighted by its windows, is
    the training loss (no plugin reweights it here)."""
    rows = train_run()
    final = rows[-1]
    tiles = read_val_tiles(tmp_path / "run")
    assert set(tiles["epoch"]) == {2.0} and len(tiles["tile"]) == 10
    assert set(tiles) >= {"tile", "terrain", "region", "rmse_m", "bicubic_rmse_m", "loss"}
    pooled = math.sqrt(tiles["sq_err_m2"].sum() / tiles["pixels"].sum())
    assert pooled == pytest.approx(final["val_rmse_m"], rel=1e-12)  # float64 sums, reordered
    assert statistics.fmean(tiles["loss"]) == pytest.approx(final["val_loss"], rel=1e-6)
    for terrain, rmse in final["val_rmse_m_by_terrain"].items():
        inside = tiles["terrain"] == terrain
        assert math.sqrt(
            tiles["sq_err_m2"][inside].sum() / tiles["pixels"][inside].sum()
        ) == pytest.approx(rmse, rel=1e-12)
        median = final["val_tile_median_rmse_m_by_terrain"][terrain]
        assert median == pytest.approx(float(np.median(tiles["rmse_m"][inside])))
    assert np.all(tiles["rmse_m"] <= tiles["bicubic_rmse_m"] * 2)  # a model near bicubic
    counts, losses = final["terrain_counts"], final["train_loss_by_terrain"]
    weighted = sum(counts[t] * losses[t] for t in losses) / sum(counts.values())
    assert weighted == pytest.approx(final["train_loss"], rel=1e-6)  # float32 losses


def test_a_run_stopped_between_step_validations_resumes_exactly(
    procedural_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Stopped after step 3 (in epoch 2, past a probe and a step validation of that epoch):
    the resumed run ends with the rows, per-tile errors and weights of the uninterrupted one."""
    args = ["--plugins", "stop", "--set", "train.max_steps_per_epoch=2"]
    for assignment in ("train.probe_every=1", "train.validate_every_steps=1"):
        args += ["--set", assignment]
    interrupted, straight = stopped_and_resumed(procedural_dir, tmp_path, monkeypatch, args)
    reference = without_timing(read_metrics(straight))
    assert without_timing(read_metrics(interrupted)) == reference
    assert [p["step"] for row in reference for p in row["val_curve"]] == [1, 2, 3, 4]
    assert [s for row in reference for s in row["probe_steps"]] == [0, 1, 2, 3, 4]
    written = [(run / VAL_TILES_CSV).read_bytes() for run in (interrupted, straight)]
    assert written[0] == written[1]
    resumed, uninterrupted = (load_checkpoint(run / CHECKPOINT) for run in (interrupted, straight))
    assert_identical(resumed["model"], uninterrupted["model"], "model")
    assert [p["probe_last"] for p in resumed["processes"]] == [
        p["probe_last"] for p in uninterrupted["processes"]
    ]
