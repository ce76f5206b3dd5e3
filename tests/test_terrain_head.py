"""terrain_head: an auxiliary terrain classifier whose loss shapes RCAN-DEM's body."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from core.config import Config
from core.context import RunContext
from core.errors import ConfigError
from core.hookspecs import hookimpl
from core.inference import TrainedRun
from core.plugins import PluginManager
from core.tasks import get_task
from core.tasks.dem_sr.rcan import build_rcan
from core.tasks.dem_sr.terrain import TERRAINS

LABELS = torch.tensor([0, 1, 2, 3, 4, 4, 1, 0])
WEIGHTS = {"elevation": 1.0, "gradient": 0.5, "curvature": 0.2, "edge": 0.2, "spectral": 0.1}


def configured(tmp_path: Path, model: nn.Module) -> tuple[nn.Module, PluginManager, RunContext]:
    manager = PluginManager.from_names(["terrain_head"])
    ctx = RunContext(Config(), Accelerator(cpu=True), get_task("dem_sr"), manager, tmp_path, 1)
    return manager.chain("configure_model", model, "model", ctx=ctx), manager, ctx


def test_the_auxiliary_term_alone_reaches_the_shared_body(tmp_path: Path):
    torch.manual_seed(0)
    model, manager, ctx = configured(tmp_path, build_rcan("small", 2))
    batch = {"lr": torch.randn(len(LABELS), 1, 8, 8), "terrain": LABELS}
    manager.call("route_batch", model=model, batch=batch, ctx=ctx)
    model(batch["lr"])
    [(_, term)] = manager.call("auxiliary_loss", model=model, batch=batch, ctx=ctx)
    assert term.shape == (len(LABELS),), "a per-sample term"
    assert (term > 0).all()
    term.sum().backward()
    # every 3x3 conv of the feature path (channel attention's tiny gates may have dead ReLUs)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    shared = [model.head, *(m for m in model.body.modules() if m in convs)]
    assert len(shared) == 1 + 2 * (2 * 3 + 1) + 1  # small: 2 groups of 3 RCABs
    for conv in shared:
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.tail.parameters()), "the tail is not on its path"
    assert ctx.pop_logged().keys() == {"train_terrain_head_accuracy"}


@torch.no_grad()
def test_validation_accuracy_counts_each_terrains_correct_predictions(tmp_path: Path):
    model, manager, ctx = configured(tmp_path, build_rcan("small", 2))
    model.eval()
    manager.call("on_epoch_start", epoch=1, ctx=ctx)
    predictions = []
    for _ in range(2):  # two validation batches
        batch = {"lr": torch.randn(len(LABELS), 1, 8, 8), "terrain": LABELS}
        manager.call("route_batch", model=model, batch=batch, ctx=ctx)
        model(batch["lr"])
        features = model.body(model.head(batch["lr"])).mean(dim=(2, 3))
        predictions.append(model.terrain_head(features).argmax(1))
    correct = (torch.cat(predictions) == LABELS.repeat(2)).float()
    # approx's default rel 1e-6: fractions k / n of a few samples, exact or 1 ulp apart
    [(_, metrics)] = manager.call("validation_metrics", model=model, ctx=ctx)
    assert metrics["val_terrain_head_accuracy"] == pytest.approx(correct.mean().item())
    for index, name in enumerate(TERRAINS):
        own = correct[LABELS.repeat(2) == index]
        assert metrics["val_terrain_head_accuracy_by_terrain"][name] == pytest.approx(
            own.mean().item()
        )


def test_a_model_other_than_rcan_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"terrain_head.*--task dem_sr"):
        configured(tmp_path, nn.Sequential(nn.Conv2d(1, 1, 3)))


@pytest.mark.parametrize("backward", [None, "balanced_grad", "pcgrad"])
def test_trains_end_to_end_and_reports_its_accuracy(train_run, tmp_path, backward):
    class Keep:
        @hookimpl
        def setup(self, ctx):
            self.model = ctx.accelerator.unwrap_model(ctx.model)
            self.initial = self.model.terrain_head.weight.detach().clone()

    probe = Keep()
    plugins = ["terrain_head", *([backward] if backward else []), probe]
    rows = train_run(*plugins, overrides=("plugins.terrain_head.weight=0.5",))
    for row in rows:
        assert 0 <= row["train_terrain_head_accuracy"] <= 1
        assert 0 <= row["val_terrain_head_accuracy"] <= 1
        assert set(row["val_terrain_head_accuracy_by_terrain"]) == set(TERRAINS)
        task_loss = sum(w * row[f"train_loss_{name}"] for name, w in WEIGHTS.items())
        # the objective holds the weighted cross-entropy, about ln 5 for an untrained head
        # (rel 0.25: random initial logits and the epoch's training move it, measured 2 %)
        assert row["train_loss"] - task_loss == pytest.approx(0.5 * math.log(5), rel=0.25)
    head = probe.model.terrain_head.weight
    assert not torch.equal(head, probe.initial), "the head trains"
    loaded = TrainedRun.restore(tmp_path / "run", cpu=True).model
    torch.testing.assert_close(loaded.terrain_head.weight, head.detach())  # saved bit for bit
