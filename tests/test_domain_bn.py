"""domain_bn: per-terrain batch normalisation against one plain BatchNorm per terrain."""

from __future__ import annotations

import copy
import json
import math
import subprocess
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from core.config import Config, load_config
from core.context import RunContext
from core.errors import ConfigError
from core.hookspecs import hookimpl
from core.plugins import PluginManager
from core.tasks import get_task
from core.tasks.dem_sr.rcan import build_rcan
from core.tasks.dem_sr.terrain import TERRAINS
from plugins.norms.domain_bn import (
    SYNC_MODES,
    DomainBN,
    DomainBNConfig,
    TerrainBatchNorm2d,
    swap_batchnorms,
)
from tests.distributed.domain_bn_ddp import reference
from tests.distributed.two_processes import launch

CHANNELS = 4
BATCHES = [  # terrain labels of successive training batches: mixed, one sample, one absent
    [0, 1, 1, 2, 0, 2, 2, 1],
    [2, 2, 0, 3, 0, 3],
    [1, 3, 0, 1, 1],
]


def trained_bn(momentum: float | None = 0.1) -> nn.BatchNorm2d:
    """A BatchNorm2d whose affine and running statistics are not the defaults."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(CHANNELS, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def features(terrain: list[int], seed: int) -> torch.Tensor:
    """A batch whose statistics differ by terrain, as real terrains' features do."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(terrain), CHANNELS, 5, 6, generator=generator)
    label = torch.tensor(terrain, dtype=torch.float32)[:, None, None, None]
    return x * (1 + label) + 3 * label


class PerTerrainReference:
    """The seed's layout: one BatchNorm per terrain, fed only its terrain's sub-batch, with
    the affine shared (the same weight and bias tensors for every terrain)."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        self.bn = bn
        self.mean = [bn.running_mean.clone() for _ in TERRAINS]
        self.var = [bn.running_var.clone() for _ in TERRAINS]
        self.batches = [0 for _ in TERRAINS]

    def __call__(self, x: torch.Tensor, terrain: torch.Tensor, training: bool) -> torch.Tensor:
        out = torch.empty_like(x)
        for t in terrain.unique().tolist():
            rows = terrain == t
            momentum = self.bn.momentum
            if training:
                self.batches[t] += 1
                momentum = momentum if momentum is not None else 1 / self.batches[t]
            out[rows] = F.batch_norm(
                x[rows], self.mean[t], self.var[t], self.bn.weight, self.bn.bias,
                training, momentum, self.bn.eps,
            )  # fmt: skip
        return out


def train_both(momentum: float | None) -> tuple[TerrainBatchNorm2d, PerTerrainReference]:
    """Run BATCHES through the layer and the reference; check outputs and gradients on the way."""
    layer = TerrainBatchNorm2d.from_batchnorm(trained_bn(momentum), len(TERRAINS))
    reference = PerTerrainReference(trained_bn(momentum))
    for seed, labels in enumerate(BATCHES):
        terrain = torch.tensor(labels)
        x = features(labels, seed).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        layer.route(terrain)
        out, expected = layer(x), reference(x_ref, terrain, training=True)
        # 1e-5: both sides are float32 BN in different summation orders; outputs (up to 6),
        # input gradients (up to 5), affine gradients (sums of 570 terms, up to 73) and
        # running statistics (up to 17) differ by 1/10 of atol + rtol * |value| or less
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        upstream = torch.randn_like(out)
        (out * upstream).sum().backward()
        (expected * upstream).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.weight.grad, reference.bn.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.bias.grad, reference.bn.bias.grad, atol=1e-5, rtol=1e-5)
    return layer, reference


@pytest.mark.parametrize("momentum", [0.1, None])
def test_mixed_batch_is_normalised_like_each_terrains_own_batchnorm(momentum):
    layer, reference = train_both(momentum)
    for t in range(len(TERRAINS)):  # float32 rounding of BN moments: 1e-5 as in train_both
        torch.testing.assert_close(layer.running_mean[t], reference.mean[t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.running_var[t], reference.var[t], atol=1e-5, rtol=1e-5)
    assert layer.num_batches_tracked.tolist() == reference.batches
    assert layer.seen.tolist() == [True, True, True, True, False]


def test_eval_uses_each_terrains_running_statistics():
    layer, reference = train_both(0.1)
    layer.eval()
    labels = [3, 0, 2, 1, 0, 3]
    terrain = torch.tensor(labels)
    x = features(labels, seed=99)
    layer.route(terrain)
    with torch.no_grad():  # float32 x * scale + shift against (x - mean) / std: as train_both
        torch.testing.assert_close(
            layer(x), reference(x, terrain, training=False), atol=1e-5, rtol=1e-5
        )
    assert layer.num_batches_tracked.tolist() == reference.batches, "eval must not update"


def test_unseen_terrain_uses_the_mixture_of_the_seen_terrains():
    layer, reference = train_both(0.1)
    layer.eval()
    seen = [t for t, n in enumerate(reference.batches) if n]
    unseen = [t for t, n in enumerate(reference.batches) if not n]
    assert unseen == [4]
    means = torch.stack([reference.mean[t] for t in seen])
    second = torch.stack([reference.var[t] + reference.mean[t] ** 2 for t in seen])
    mix_mean, mix_var = means.mean(0), second.mean(0) - means.mean(0) ** 2
    x = features([4, 4, 4], seed=7)
    layer.route(torch.tensor([4, 4, 4]))
    expected = F.batch_norm(
        x, mix_mean, mix_var, reference.bn.weight, reference.bn.bias, eps=reference.bn.eps
    )
    with torch.no_grad():  # the mixture in float32 in another order: 1e-5 as in train_both
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_before_training_the_swapped_layer_is_the_original_batchnorm():
    bn = trained_bn()
    model = nn.Sequential(nn.Conv2d(1, CHANNELS, 3), bn, nn.ReLU())
    original = copy.deepcopy(model)
    assert swap_batchnorms(model, len(TERRAINS)) == 1
    layer = model[1]
    assert isinstance(layer, TerrainBatchNorm2d)
    assert (layer.eps, layer.momentum) == (bn.eps, bn.momentum)
    x = torch.randn(6, 1, 7, 7)
    layer.route(torch.tensor([0, 1, 2, 3, 4, 0]))
    # float32 defaults (atol 1e-5): the same convolution, then BN in another summation order
    # on outputs up to ~4, which rounds by ~2e-7
    model.eval()
    original.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x))
    model.train()
    original.train()
    layer.route(torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(model(x), original(x))  # one terrain: plain BN on the batch


def test_shared_batchnorm_stays_shared_and_every_one_is_swapped():
    shared = nn.BatchNorm2d(3)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 3, 1), shared), shared, nn.Sequential(nn.BatchNorm2d(3))
    )
    assert swap_batchnorms(model, len(TERRAINS)) == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model[0][1] is model[1]


def test_state_dict_round_trip_keeps_per_terrain_statistics_and_seen_flags():
    layer, _ = train_both(0.1)
    model = nn.Sequential(nn.Conv2d(CHANNELS, CHANNELS, 1), layer)
    state = model.state_dict()
    assert state["1.running_mean"].shape == (len(TERRAINS), CHANNELS)
    fresh = nn.Sequential(nn.Conv2d(CHANNELS, CHANNELS, 1), nn.BatchNorm2d(CHANNELS))
    swap_batchnorms(fresh, len(TERRAINS))
    fresh.load_state_dict(state)
    assert fresh[1].seen.tolist() == layer.seen.tolist()
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, state[name]), name
    model.eval()
    fresh.eval()
    x = features([0, 4, 2, 1], seed=5)
    for m in (model, fresh):
        m[1].route(torch.tensor([0, 4, 2, 1]))
    with torch.no_grad():  # exact: the same weights, input and kernels in one process
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_unrouted_or_misrouted_layer_names_the_plugin():
    layer = TerrainBatchNorm2d(CHANNELS, len(TERRAINS))
    with pytest.raises(RuntimeError, match=r"domain_bn.*route_batch"):
        layer(torch.randn(2, CHANNELS, 3, 3))
    layer.route(torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match=r"domain_bn.*batch of 2"):
        layer(torch.randn(2, CHANNELS, 3, 3))


def test_route_batch_routes_every_layer_and_rejects_unknown_labels(tmp_path: Path):
    model = build_rcan("small", 3, norm="batch")
    manager = PluginManager.from_names(["domain_bn"])
    ctx = RunContext(Config(), Accelerator(cpu=True), get_task("dem_sr"), manager, tmp_path, 1)
    model = manager.chain("configure_model", model, "model", ctx=ctx)
    layers = [m for m in model.modules() if isinstance(m, TerrainBatchNorm2d)]
    assert len(layers) == 6  # small preset: 2 groups x 3 RCABs
    batch = {"terrain": torch.tensor([4, 0, 2])}
    manager.call("route_batch", model=model, batch=batch, ctx=ctx)
    assert all(layer.terrain is batch["terrain"] for layer in layers)
    assert model(torch.randn(3, 1, 6, 6)).shape == (3, 1, 18, 18)
    with pytest.raises(ValueError, match=r"domain_bn: terrain labels \[0, 5\]"):
        manager.call("route_batch", model=model, batch={"terrain": torch.tensor([0, 5])}, ctx=ctx)


def test_model_without_batchnorm_is_a_config_error(train_run):
    with pytest.raises(ConfigError, match=r"domain_bn.*model\.norm=batch"):
        train_run(DomainBN(DomainBNConfig()))


def test_a_task_without_a_norm_option_is_refused_naming_the_task(tmp_path: Path):
    """domain_bn states its own need: for a task whose ``[model]`` has no ``norm`` key
    (sar2opt) it names the task, not a key that task does not have."""
    config = load_config(None, ["run.task='sar2opt'"])
    manager = PluginManager.from_names(["domain_bn"])
    ctx = RunContext(config, Accelerator(cpu=True), get_task("sar2opt"), manager, tmp_path, 1)
    no_batchnorm = nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU())
    with pytest.raises(ConfigError) as error:
        manager.chain("configure_model", no_batchnorm, "model", ctx=ctx)
    assert str(error.value) == (
        "plugin 'domain_bn': the model of task 'sar2opt' has no nn.BatchNorm2d to make "
        "terrain-adaptive"
    )


def test_training_run_with_batch_norm_is_finite_and_learns_per_terrain_statistics(train_run):
    class Probe:
        @hookimpl
        def setup(self, ctx):
            self.model = ctx.accelerator.unwrap_model(ctx.model)
            self.counts = torch.bincount(
                torch.as_tensor(ctx.train_dataset.terrains), minlength=len(TERRAINS)
            )

    probe = Probe()
    rows = train_run(DomainBN(DomainBNConfig()), probe, overrides=("model.norm='batch'",))
    for row in rows:
        assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])
        assert all(math.isfinite(v) for v in row["val_rmse_m_by_terrain"].values())
    layers = [m for m in probe.model.modules() if isinstance(m, TerrainBatchNorm2d)]
    assert layers
    for layer in layers:
        assert layer.seen.tolist() == (probe.counts > 0).tolist()
        trained = layer.running_mean[layer.seen]  # differ by ~1e-2, allclose's bound is 1e-6
        assert not torch.allclose(trained, trained[:1].expand_as(trained)), (
            "terrains with different features must end with different statistics"
        )


@pytest.mark.slow
def test_two_processes_where_one_lacks_terrains(tmp_path: Path, procedural_dir):
    """Process 1's batches lack terrains: nothing hangs, statistics agree on both processes
    and equal the one-process computation (``global``: outputs and gradients as on the
    global batch; ``running``: as on each process's own batch)."""
    script = Path(__file__).parent / "distributed" / "domain_bn_ddp.py"
    command = [*launch(), str(script), "--data", str(procedural_dir), "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # 1e-5: values up to ~2.5 whose float32 sums (over processes, or over the global batch in
    # one) differ in order only, by a few float32 epsilons: under 1/100 of atol + rtol * |value|
    close = partial(torch.testing.assert_close, atol=1e-5, rtol=1e-5)
    for sync in SYNC_MODES:
        expected = reference(sync)
        for rank, recorded in enumerate(r[sync] for r in ranks):
            close(torch.tensor(recorded["out"]), expected["out"][rank])
            for grad, expected_grad in zip(recorded["grads"], expected["grads"], strict=True):
                close(torch.tensor(grad), expected_grad)
            for key in ("running_mean", "running_var"):
                close(torch.tensor(recorded[key]), torch.tensor(expected[key]))
            assert recorded["num_batches_tracked"] == expected["num_batches_tracked"]
            assert recorded["seen"] == [True] * len(TERRAINS)
    for run in ("train_global", "train_running_pcgrad", "train_global_pcgrad"):
        first, second = (r[run] for r in ranks)
        assert first["world_size"] == 2 and first["missing"][0] > 0
        assert all(math.isfinite(v) for v in first["losses"])
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            assert first[key] == second[key], f"{run}: {key} differs between processes"
        assert second["seen"] == [True] * len(TERRAINS), "process 1 never saw extreme"
