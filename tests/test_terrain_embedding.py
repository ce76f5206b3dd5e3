"""terrain_embedding: per-sample FiLM from a learned embedding per terrain."""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from core.config import Config
from core.context import RunContext, StepInfo
from core.errors import ConfigError
from core.hookspecs import hookimpl
from core.inference import TrainedRun
from core.plugins import PluginManager
from core.tasks import get_task
from core.tasks.dem_sr.rcan import build_rcan
from core.tasks.dem_sr.terrain import TERRAINS
from plugins.conditioning.terrain_embedding import TerrainFiLM
from tests.conftest import FAST, read_metrics
from tests.distributed.two_processes import launch

MIXED = torch.tensor([0, 1, 2, 0, 3, 1])


def configured(tmp_path: Path, model: nn.Module) -> tuple[nn.Module, PluginManager, RunContext]:
    manager = PluginManager.from_names(["terrain_embedding"])
    ctx = RunContext(Config(), Accelerator(cpu=True), get_task("dem_sr"), manager, tmp_path, 1)
    return manager.chain("configure_model", model, "model", ctx=ctx), manager, ctx


def film_of(model: nn.Module) -> TerrainFiLM:
    return next(m for m in model.modules() if isinstance(m, TerrainFiLM))


def run(model: nn.Module, manager: PluginManager, ctx: RunContext, lr, terrain) -> torch.Tensor:
    manager.call("route_batch", model=model, batch={"terrain": terrain}, ctx=ctx)
    return model(lr)


@torch.no_grad()
def test_mixed_batch_is_modulated_per_sample_by_its_terrain(tmp_path: Path):
    torch.manual_seed(0)
    # float64: oneDNN picks convolution kernels by batch size, so a batch and a sample alone
    # sum in different orders; in float32 that moves outputs by ~1e-6 relative, and by 1e-2
    # where a process computes float32 convolutions in bfloat16 (AVX512-BF16/AMX CPUs).
    # float64 rounding (~1e-16) keeps assert_close's float64 default (rtol 1e-7) and
    # allclose's rtol 1e-5 far from both the rounding and the terrains' differences
    plain = build_rcan("small", 2).double()
    model, manager, ctx = configured(tmp_path, copy.deepcopy(plain))
    film = film_of(model)
    assert len(film.film) == 2, "one modulation point per residual group (small: 2)"
    lr = torch.randn(1, 1, 8, 8, dtype=torch.float64).expand(len(MIXED), -1, -1, -1)
    assert torch.equal(run(model, manager, ctx, lr, MIXED), plain(lr)), "starts as identity"

    for layer in film.film:  # as after training: the maps are no longer zero
        nn.init.normal_(layer.weight, std=0.3)
    nn.init.normal_(model.tail[-1].weight, std=0.1)  # so the features reach the output
    out = run(model, manager, ctx, lr, MIXED)
    for i, t in enumerate(MIXED.tolist()):
        alone = run(model, manager, ctx, lr[:1], torch.tensor([t]))
        torch.testing.assert_close(out[i : i + 1], alone)  # its own terrain, not the batch's
        for j, u in enumerate(MIXED.tolist()):
            same = torch.allclose(out[i], out[j])
            assert same == (t == u), f"samples {i} ({TERRAINS[t]}) and {j} ({TERRAINS[u]})"


@torch.no_grad()
def test_untrained_terrain_uses_the_mean_embedding_of_trained_ones_in_evaluation(tmp_path):
    model = configured(tmp_path, build_rcan("small", 2))[0]
    film = film_of(model)
    for layer in film.film:
        nn.init.normal_(layer.weight, std=0.3)
    film.mark_trained(torch.tensor([True, True, False, False, False]))
    lr = torch.randn(1, 1, 8, 8).expand(3, -1, -1, -1)
    terrain = torch.tensor([0, 1, 4])
    x = torch.randn(3, 32, 8, 8)  # small preset: 32 features
    film.route(terrain)
    own = film.modulate(0, x)  # training: every terrain its own embedding
    film.eval()
    fallback = film.modulate(0, x)
    # float32 defaults (atol 1e-5 + rtol 1.3e-6): gamma and beta are dot products of 16
    # terms; outputs up to ~8 lie within 1e-6 of float64 in any summation order: 10x margin
    torch.testing.assert_close(fallback[:2], own[:2])
    mean = film.embedding.weight[:2].mean(0)
    gamma, beta = film.film[0](mean).chunk(2)
    torch.testing.assert_close(fallback[2], x[2] * (1 + gamma[:, None, None]) + beta[:, None, None])
    assert not torch.allclose(fallback[2], own[2])
    assert model.eval()(lr).shape == (3, 1, 16, 16)  # routed above: the model runs


def test_labels_are_checked_and_required(tmp_path: Path):
    model, manager, ctx = configured(tmp_path, build_rcan("small", 2))
    with pytest.raises(ValueError, match=r"terrain_embedding: terrain labels \[0, 5\]"):
        run(model, manager, ctx, torch.randn(2, 1, 8, 8), torch.tensor([0, 5]))
    film_of(model).route(torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match=r"terrain_embedding.*batch of 2"):
        model(torch.randn(2, 1, 8, 8))


def test_a_model_without_residual_groups_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"terrain_embedding.*--task dem_sr"):
        configured(tmp_path, nn.Sequential(nn.Conv2d(1, 1, 3)))


def test_trains_end_to_end_and_the_checkpoint_keeps_the_modulation(train_run, tmp_path):
    class Keep:
        @hookimpl
        def setup(self, ctx):
            self.model = ctx.accelerator.unwrap_model(ctx.model)

    probe = Keep()
    rows = train_run("terrain_embedding", probe)
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in rows)
    trained = film_of(probe.model)
    assert (trained.trained > 0).all(), "every terrain of the training tiles is marked"
    assert all(layer.weight.abs().sum() > 0 for layer in trained.film), "FiLM maps trained"

    restored = TrainedRun.restore(tmp_path / "run", cpu=True)
    loaded, ctx = restored.model, restored.ctx
    lr = torch.randn(1, 1, 16, 16).expand(len(MIXED), -1, -1, -1)
    with torch.no_grad():
        out = run(loaded, ctx.plugins, ctx, lr, MIXED)
        expected = run(probe.model.eval(), ctx.plugins, ctx, lr, MIXED)
    # float32 defaults: the same weights on the same batch in one process run the same
    # kernels, and rows 0 and 3 are the same input and terrain in that batch, so each pair is
    # equal up to at most a last-bit difference, far below atol 1e-5
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out[0], out[1]), "terrains modulate differently after training"
    torch.testing.assert_close(out[0], out[3])


def test_terrains_of_the_whole_step_are_marked_trained(tmp_path: Path):
    """Marked from the step's counts over all processes, not from this process's batch."""
    model, manager, ctx = configured(tmp_path, build_rcan("small", 2))
    ctx.step = StepInfo(torch.tensor([3.0, 0.0, 1.0, 0.0, 2.0]), 0, 1)
    run(model.train(), manager, ctx, torch.randn(2, 1, 8, 8), torch.tensor([0, 2]))
    assert film_of(model).trained.tolist() == [1, 0, 1, 0, 1]
    run(model.eval(), manager, ctx, torch.randn(2, 1, 8, 8), torch.tensor([1, 3]))
    assert film_of(model).trained.tolist() == [1, 0, 1, 0, 1], "evaluation marks nothing"


@pytest.mark.slow
def test_two_processes_train_both_plugins(procedural_dir: Path, tmp_path: Path):
    """Under DDP the FiLM module and the head are part of the prepared model: the run ends,
    reports the head's accuracy, and the checkpoint holds the trained modulation."""
    out = tmp_path / "ddp"
    args = ["--data", str(procedural_dir), "--out", str(out), "--epochs", "2"]
    args += [item for setting in FAST for item in ("--set", setting)]
    command = [*launch(), "-m", "core.run", "--plugins", "terrain_embedding,terrain_head", *args]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    rows = read_metrics(out)
    assert all(0 <= row["val_terrain_head_accuracy"] <= 1 for row in rows)
    loaded = TrainedRun.restore(out, cpu=True).model
    assert (film_of(loaded).trained > 0).all()
    assert all(layer.weight.abs().sum() > 0 for layer in film_of(loaded).film)
