"""Every hook spec is exercised by a real training run with a probe plugin.

``test_every_hook_has_a_test`` fails when a hook is added to ``core.hookspecs`` without a
``test_hook_<name>`` here (as datasette does for its plugin hooks).
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pytest
import torch
from torch import nn

from core.hookspecs import hookimpl
from core.plugins import NoConfig, hook_names
from core.run_folder import CHECKPOINT, INTERRUPTED, SUMMARY
from core.safe_io import load_checkpoint
from core.tasks.dem_sr.terrain import TERRAINS, terrain_index
from core.train import Interrupted
from plugins.gradients.balanced_grad import BalancedGrad


def test_every_hook_has_a_test():
    module = sys.modules[__name__]
    missing = [name for name in hook_names() if not hasattr(module, f"test_hook_{name}")]
    assert not missing, f"hooks without a test: {missing}"


def parameters_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_hook_configure_model(train_run):
    class AddBias:
        @hookimpl
        def configure_model(self, model, ctx):
            self.bias = nn.Parameter(torch.zeros(()))
            model.register_parameter("probe_bias", self.bias)
            forward = model.forward
            model.forward = lambda x: forward(x) + model.probe_bias
            return model

    probe = AddBias()
    train_run(probe)
    assert probe.bias.item() != 0.0, "a parameter added by configure_model must be trained"


def test_hook_setup(train_run):
    class Setup:
        calls: list = []

        @hookimpl
        def setup(self, ctx):
            self.calls.append((ctx.model is not None, len(ctx.train_dataset), ctx.total_epochs))

    probe = Setup()
    train_run(probe)
    assert len(probe.calls) == 1
    has_model, n_train, epochs = probe.calls[0]
    assert has_model and n_train > 0 and epochs == 2


def test_hook_on_epoch_start(train_run):
    class Starts:
        epochs: list = []

        @hookimpl
        def on_epoch_start(self, epoch, ctx):
            self.epochs.append((epoch, ctx.epoch))

    probe = Starts()
    train_run(probe, overrides=("run.epochs=3",))
    assert probe.epochs == [(1, 1), (2, 2), (3, 3)]


def test_hook_epoch_indices(train_run):
    class OnlyFlat:
        @hookimpl
        def epoch_indices(self, indices, epoch, ctx):
            terrains = ctx.train_dataset.terrains[indices]
            return indices[terrains == terrain_index("flat")]

    rows = train_run(OnlyFlat())
    for row in rows:
        assert row["active_terrains"] == ["flat"]
        assert set(row["terrain_counts"]) == {"flat"}


def test_hook_batch_plan(train_run):
    class FixedPlan:
        seen: list = []

        @hookimpl
        def batch_plan(self, dataset, indices, epoch, ctx):
            return [indices[:3], indices[3:5]]

        @hookimpl
        def route_batch(self, model, batch, ctx):
            if model.training:
                self.seen.append(batch["idx"].tolist())

    probe = FixedPlan()
    rows = train_run(probe)
    assert probe.seen == [[0, 1, 2], [3, 4]] * 2
    assert all(row["steps"] == 2 for row in rows)


def test_hook_route_batch(train_run):
    class Router:
        train_tiles: set = set()
        val_tiles: set = set()
        examples: list = []

        @hookimpl
        def route_batch(self, model, batch, ctx):
            assert batch["lr"].device == ctx.device
            target = self.train_tiles if model.training else self.val_tiles
            target.update(batch["tile_id"])
            if len(batch["tile_id"]) == 1:  # the plots' example tiles come one at a time
                self.examples.append(ctx.terrains[int(batch["terrain"][0])])

    probe = Router()
    train_run(probe, overrides=("train.probe_every=0",))  # the probe: training tiles, eval mode
    assert probe.train_tiles and probe.val_tiles
    assert not probe.train_tiles & probe.val_tiles, "validation tiles must not be trained on"
    # after the last epoch the hillshade plot draws one routed validation tile per terrain
    assert sorted(probe.examples) == sorted(TERRAINS)


def test_hook_training_forward(train_run):
    class ConstantLoss:
        @hookimpl
        def training_forward(self, model, batch, ctx):
            out = model(batch["lr"])
            per_sample = out.mean(dim=(1, 2, 3)) * 0 + 2.0
            return per_sample[:, None].expand(-1, len(ctx.task.components))

    rows = train_run(ConstantLoss())
    base = 1.0 + 0.5 + 0.2 + 0.2 + 0.1
    # approx's default rel 1e-6: float32 sums of five weighted constants, within ~1e-7
    assert rows[-1]["train_loss"] == pytest.approx(2.0 * base)
    assert rows[-1]["train_loss_edge"] == pytest.approx(2.0)


def test_hook_probe_losses(train_run):
    """The probe set is scored by the plugin's losses, in eval mode and without gradients,
    while training still goes through the task's forward."""

    class WindowIndexLoss:
        def __init__(self) -> None:
            self.modes: list[tuple[bool, bool]] = []

        @hookimpl
        def probe_losses(self, model, batch, ctx):
            self.modes.append((model.training, torch.is_grad_enabled()))
            return batch["idx"].float() + 1.0

    probe = WindowIndexLoss()
    plain = train_run(out="plain", overrides=("train.probe_every=2",))
    rows = train_run(probe, out="probed", overrides=("train.probe_every=2",))
    assert set(probe.modes) == {(False, False)}
    # the probe set's windows are fixed, so their positions give the same value every time
    first = rows[0]["probe_loss"][0]
    assert all(value == first for row in rows for value in row["probe_loss"])
    assert first != plain[0]["probe_loss"][0]
    assert [row["train_loss"] for row in rows] == [row["train_loss"] for row in plain]

    class Surrogate:  # a level that is no loss: refused, naming the plugin
        @hookimpl
        def probe_losses(self, model, batch, ctx):
            return -batch["idx"].float()

    with pytest.raises(RuntimeError, match=r"'Surrogate': probe_losses returned shape"):
        train_run(Surrogate(), out="surrogate", overrides=("train.probe_every=2",))


def test_hook_loss_weights(train_run):
    class ElevationOnly:
        @hookimpl
        def loss_weights(self, weights, batch, ctx):
            assert weights.shape == (len(batch["idx"]), len(ctx.task.components))
            keep = torch.zeros_like(weights)
            keep[:, 0] = 3.0
            return keep

    rows = train_run(ElevationOnly())
    for row in rows:  # the same float32 terms times 3: ~1e-7 relative, rel 1e-6
        assert row["train_loss"] == pytest.approx(3.0 * row["train_loss_elevation"], rel=1e-6)


def test_hook_auxiliary_loss(train_run):
    class ExtraTerm:
        """Adds ``2 + bias`` to every sample's loss; ``bias`` is a trained parameter."""

        @hookimpl
        def configure_model(self, model, ctx):
            self.bias = nn.Parameter(torch.zeros(()))
            model.register_parameter("probe_bias", self.bias)

        @hookimpl
        def auxiliary_loss(self, model, batch, ctx):
            return self.bias.expand(len(batch["idx"])) + 2.0

    probe = ExtraTerm()
    rows = train_run(probe)
    weights = {"elevation": 1.0, "gradient": 0.5, "curvature": 0.2, "edge": 0.2, "spectral": 0.1}
    for row in rows:
        task_loss = sum(w * row[f"train_loss_{name}"] for name, w in weights.items())
        # abs 0.02: the bias trains below 0 during the epoch, moving the term by up to 0.004
        assert row["train_loss"] == pytest.approx(task_loss + 2.0, abs=0.02)
        assert row["val_loss"] < 2.0, "validation scores the task's loss only"
    assert probe.bias.item() < -0.001, "the auxiliary term must reach the backward pass"


def test_auxiliary_loss_must_be_per_sample(train_run):
    class Scalar:
        @hookimpl
        def auxiliary_loss(self, model, batch, ctx):
            return torch.zeros(())

    with pytest.raises(RuntimeError, match=r"'Scalar': auxiliary_loss returned shape \(\)"):
        train_run(Scalar())


def test_hook_backward(train_run):
    class NoBackward:
        counts: list = []

        @hookimpl
        def setup(self, ctx):
            self.before = parameters_of(ctx.model)
            self.model = ctx.model

        @hookimpl
        def backward(self, per_sample_loss, batch, ctx):
            assert per_sample_loss.shape == (len(batch["idx"]),)
            self.counts.append((ctx.step.num_samples, len(batch["idx"])))
            return True

    probe = NoBackward()
    rows = train_run(probe)
    assert all(total == size for total, size in probe.counts)
    # an untrained RCAN-DEM is exactly bicubic interpolation, the baseline the metrics report
    # (the same values: rel 1e-6 only admits a last-bit difference in the float64 sums)
    assert rows[-1]["val_rmse_m"] == pytest.approx(rows[-1]["val_rmse_m_bicubic"], rel=1e-6)
    for before, after in zip(probe.before, parameters_of(probe.model), strict=True):
        assert torch.equal(before, after), "without a backward pass nothing may change"


def test_hook_per_sample_losses(train_run):
    class Silence:
        """Sees each sample's loss and weights it 0, under balanced_grad's backward."""

        def __init__(self) -> None:
            self.seen: list = []

        @hookimpl
        def setup(self, ctx):
            self.before = parameters_of(ctx.model)
            self.model = ctx.model

        @hookimpl
        def per_sample_losses(self, losses, batch, ctx):
            self.seen.append((losses.shape == (len(batch["idx"]),), losses.requires_grad))
            assert bool((losses > 0).all())
            return torch.zeros_like(losses)

    probe = Silence()
    rows = train_run(BalancedGrad(NoConfig()), probe)
    assert probe.seen and all(per_sample and not grad for per_sample, grad in probe.seen)
    assert [row["train_loss"] for row in rows] == [0.0, 0.0], "train_loss is the weighted loss"
    for before, after in zip(probe.before, parameters_of(probe.model), strict=True):
        assert torch.equal(before, after), "balanced_grad's backward saw the weighted losses"


def test_per_sample_losses_must_return_one_weight_per_sample(train_run):
    class Scalar:
        @hookimpl
        def per_sample_losses(self, losses):
            return losses.sum()

    with pytest.raises(RuntimeError, match=r"'Scalar': per_sample_losses returned shape \(\)"):
        train_run(Scalar())


def test_hook_transform_gradients(train_run):
    class ZeroGradients:
        @hookimpl
        def setup(self, ctx):
            self.before = parameters_of(ctx.model)
            self.model = ctx.model

        @hookimpl
        def transform_gradients(self, model, ctx):
            for p in model.parameters():
                assert p.grad is not None
                p.grad.zero_()

    probe = ZeroGradients()
    train_run(probe)
    for before, after in zip(probe.before, parameters_of(probe.model), strict=True):
        assert torch.equal(before, after)


def test_hook_after_optimizer_step(train_run):
    class AfterStep:
        """Records each call's step and whether the weights changed since the last call;
        makes the run's second step non-finite."""

        def __init__(self) -> None:
            self.calls: list = []
            self.poisoned = False

        @hookimpl
        def setup(self, ctx):
            self.last = parameters_of(ctx.model)

        @hookimpl
        def loss_weights(self, weights, ctx):
            if ctx.global_step == 1 and not self.poisoned:
                self.poisoned = True
                return weights * torch.nan

        @hookimpl
        def after_optimizer_step(self, model, ctx):
            now = parameters_of(model)
            changed = any(not torch.equal(a, b) for a, b in zip(self.last, now, strict=True))
            self.calls.append((ctx.global_step, changed))
            self.last = now

    probe = AfterStep()
    rows = train_run(probe, overrides=("train.max_steps_per_epoch=3",))
    assert [row["steps"] for row in rows] == [3, 3] and rows[-1]["nonfinite_steps"] == 1
    assert probe.calls == [(step, True) for step in range(1, 6)], "the skipped step is left out"


def test_hook_evaluation_weights(train_run, tmp_path):
    class Untrained:
        """Evaluates the weights the model started with."""

        @hookimpl
        def setup(self, ctx):
            self.model = ctx.model
            self.initial = {k: v.clone() for k, v in ctx.model.state_dict().items()}

        @hookimpl
        def evaluation_weights(self, weights, ctx):
            return {**weights, **self.initial}

    probe = Untrained()
    rows = train_run(probe)
    # an untrained RCAN-DEM is exactly bicubic interpolation
    for row in rows:
        assert row["val_rmse_m"] == pytest.approx(row["val_rmse_m_bicubic"], rel=1e-6)
    without = train_run(out="without")
    assert [row["train_loss"] for row in rows] == [row["train_loss"] for row in without]
    assert rows[-1]["val_rmse_m"] != without[-1]["val_rmse_m"]
    trained = probe.model.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in probe.initial.items())
    saved = load_checkpoint(tmp_path / "run" / CHECKPOINT)["model"]
    assert all(torch.equal(saved[k], v) for k, v in trained.items()), "the trained weights"


def test_hook_validation_metrics(train_run):
    class Extra:
        @hookimpl
        def validation_metrics(self, model, ctx):
            return {"probe_epoch": ctx.epoch}

    rows = train_run(Extra())
    assert [row["probe_epoch"] for row in rows] == [1, 2]


def test_validation_metrics_may_not_overwrite(train_run):
    class Clash:
        @hookimpl
        def validation_metrics(self, model, ctx):
            return {"val_loss": 0.0}

    with pytest.raises(RuntimeError, match="val_loss"):
        train_run(Clash())


def test_hook_on_epoch_end(train_run):
    class Ends:
        rows: list = []

        @hookimpl
        def on_epoch_end(self, epoch, metrics, ctx):
            self.rows.append(dict(metrics))

    probe = Ends()
    rows = train_run(probe)
    assert probe.rows == rows
    for row in rows:
        for key in (
            "epoch", "train_loss", "val_loss", "val_rmse_m", "val_rmse_m_by_terrain",
            "val_slope_rmse_deg_by_terrain", "terrain_counts", "batches_missing_a_terrain",
            "active_terrains", "lr", "seconds",
        ):  # fmt: skip
            assert key in row
        assert set(row["val_rmse_m_by_terrain"]) <= set(TERRAINS)
        assert np.isfinite(row["val_rmse_m"])


class RunEnd:
    """Records each ``on_run_end`` call and what the run folder held then; sends SIGINT
    after step ``stop_at``, or fails at the end of epoch ``fail_at``."""

    def __init__(self, stop_at: int | None = None, fail_at: int | None = None) -> None:
        self.stop_at, self.fail_at = stop_at, fail_at
        self.ends: list = []

    @hookimpl
    def after_optimizer_step(self, ctx):
        if ctx.global_step == self.stop_at:
            os.kill(os.getpid(), signal.SIGINT)

    @hookimpl
    def on_epoch_end(self, epoch):
        if epoch == self.fail_at:
            raise ValueError("probe failure")

    @hookimpl
    def on_run_end(self, status, error, ctx):
        written = [(ctx.run_dir / name).exists() for name in (SUMMARY, INTERRUPTED)]
        self.ends.append((status, error, *written))


def test_hook_on_run_end(train_run):
    completed = RunEnd()
    train_run(completed, out="completed")
    assert completed.ends == [("completed", None, True, False)]

    stopped = RunEnd(stop_at=2)
    with pytest.raises(Interrupted) as interrupt:
        train_run(stopped, out="stopped")
    assert stopped.ends == [("interrupted", interrupt.value, False, True)]

    class FailsToo:
        @hookimpl
        def on_run_end(self):
            raise OSError("logger gone")

    failed = RunEnd(fail_at=1)
    with pytest.raises(ValueError, match="probe failure") as failure:
        train_run(failed, FailsToo(), out="failed")
    assert failed.ends == [("failed", failure.value, False, False)]
    assert "on_run_end then failed: OSError('logger gone')" in "".join(failure.value.__notes__)
