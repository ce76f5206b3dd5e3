"""terrain_loss: every sample weighted with its own terrain's profile (seed Solution C).

Weights are compared with assert_close's float32 defaults (atol 1e-5, rtol 1.3e-6): each is a
config value, a product or ratio of two, or a sum of five products, of order 1, so within a
few float32 ulps (6e-8 each) of the expected value whatever the order of operations.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from core.config import load_config
from core.context import RunContext
from core.errors import ConfigError
from core.hookspecs import hookimpl
from core.plugins import ActivePlugin, PluginManager
from core.tasks import get_task
from core.tasks.dem_sr.losses import COMPONENTS
from core.tasks.dem_sr.task import DemSuperResolution
from core.tasks.dem_sr.terrain import TERRAINS, terrain_index
from plugins.losses.terrain_loss import LOG_KEY, SEED_PROFILES, TerrainLoss
from tests.conftest import FAST
from tests.test_run import run_cli

MIXED = [4, 0, 2, 0, 3, 1, 2, 4]  # terrain labels of a mixed batch


class DoubleEdge:
    """Another loss_weights plugin: doubles the edge weight of every sample."""

    name = "double_edge"

    @hookimpl
    def loss_weights(self, weights, batch, ctx):
        doubled = weights.clone()
        doubled[:, COMPONENTS.index("edge")] *= 2
        return doubled


def make_ctx(tmp_path: Path, overrides: list[str], extra: tuple = ()) -> RunContext:
    """A real run context whose plugins are ``terrain_loss`` (configured by ``overrides``)
    and the given plugin objects, in that order unless the objects come first; set up, as
    the trainer does before the first step."""
    config = load_config(None, overrides)
    names = config.run.plugins or ["terrain_loss"]
    loaded = PluginManager.from_names(["terrain_loss"], config.plugins).active[0]
    by_name = {
        "terrain_loss": loaded,
        **{o.name: ActivePlugin(o.name, "test", o, None) for o in extra},
    }
    manager = PluginManager([by_name[name] for name in names])
    ctx = RunContext(config, Accelerator(cpu=True), get_task("dem_sr"), manager, tmp_path, 1)
    manager.call("setup", ctx=ctx)
    return ctx


def weights_for(ctx: RunContext, labels: list[int]) -> torch.Tensor:
    """The trainer's loss_weights chain for a batch with these terrain labels."""
    base = torch.tensor([getattr(ctx.config.loss, c) for c in COMPONENTS])
    batch = {"terrain": torch.tensor(labels)}
    return ctx.plugins.chain(
        "loss_weights", base.expand(len(labels), -1).clone(), "weights", batch=batch, ctx=ctx
    )


def seed_weights(terrain: str, profiles: dict = SEED_PROFILES) -> torch.Tensor:
    """The seed's lookup: ``terrain_weights.get(terrain_type, terrain_weights["moderate"])``."""
    profile = profiles.get(terrain, profiles["moderate"])
    return torch.tensor([profile[c] for c in COMPONENTS])


def test_mixed_batch_gets_each_samples_own_profile(tmp_path):
    ctx = make_ctx(tmp_path, [])
    losses = torch.rand(len(MIXED), len(COMPONENTS))
    per_sample = (weights_for(ctx, MIXED) * losses).sum(1)
    # The seed's forward, once per sample with that sample's terrain as the batch's terrain.
    expected = torch.stack(
        [(seed_weights(TERRAINS[t]) * losses[i]).sum() for i, t in enumerate(MIXED)]
    )
    torch.testing.assert_close(per_sample, expected)
    assert ctx.pop_logged() == {LOG_KEY: 0.0}


def test_default_loss_section_is_the_moderate_profile(tmp_path):
    """So moderate samples train exactly as without the plugin, in both modes."""
    for mode in ("replace", "scale"):
        ctx = make_ctx(tmp_path, [f"plugins.terrain_loss.mode='{mode}'"])
        moderate = terrain_index("moderate")
        base = torch.tensor([getattr(ctx.config.loss, c) for c in COMPONENTS])
        torch.testing.assert_close(weights_for(ctx, [moderate, moderate]), base.expand(2, -1))


def test_partial_profiles_keep_the_seed_values_they_do_not_list(tmp_path):
    # The seed's default_v3.yaml terrain_loss_weights, written as TOML, plus one change.
    toml = tmp_path / "terrain.toml"
    toml.write_text(
        "[plugins.terrain_loss.profiles.flat]\nelevation = 1.0\ngradient = 0.3\nedge = 0.1\n"
        "[plugins.terrain_loss.profiles.extreme]\nelevation = 1.0\ngradient = 0.7\nedge = 0.9\n"
    )
    config = load_config(toml)
    plugin = PluginManager.from_names(["terrain_loss"], config.plugins).active[0]
    ctx = RunContext(
        config, Accelerator(cpu=True), get_task("dem_sr"), PluginManager([plugin]), tmp_path, 1
    )
    ctx.plugins.call("setup", ctx=ctx)
    expected_profiles = {**SEED_PROFILES, "extreme": {**SEED_PROFILES["extreme"], "edge": 0.9}}
    expected = torch.stack([seed_weights(TERRAINS[t], expected_profiles) for t in MIXED])
    torch.testing.assert_close(weights_for(ctx, MIXED), expected)


def test_scale_mode_multiplies_the_incoming_weights_by_the_profile_ratio(tmp_path):
    ctx = make_ctx(
        tmp_path, ["plugins.terrain_loss.mode='scale'", "loss.edge=0.8", "loss.spectral=0.3"]
    )
    base = torch.tensor([getattr(ctx.config.loss, c) for c in COMPONENTS])
    ratio = torch.stack([seed_weights(TERRAINS[t]) / seed_weights("moderate") for t in MIXED])
    torch.testing.assert_close(weights_for(ctx, MIXED), base * ratio)


@pytest.mark.parametrize("mode", ["replace", "scale"])
def test_chained_with_another_loss_weights_plugin(tmp_path, mode):
    edge = COMPONENTS.index("edge")
    profiles = torch.stack([seed_weights(TERRAINS[t]) for t in MIXED])
    base = torch.tensor([getattr(load_config().loss, c) for c in COMPONENTS])
    expected = profiles if mode == "replace" else base * profiles / seed_weights("moderate")
    doubled = expected.clone()
    doubled[:, edge] *= 2
    setting = f"plugins.terrain_loss.mode='{mode}'"

    after = make_ctx(
        tmp_path, [setting, "run.plugins=['terrain_loss', 'double_edge']"], (DoubleEdge(),)
    )
    torch.testing.assert_close(weights_for(after, MIXED), doubled)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = make_ctx(
            tmp_path, [setting, "run.plugins=['double_edge', 'terrain_loss']"], (DoubleEdge(),)
        )
    replaced = [
        w for w in caught if "discards the loss weights set by double_edge" in str(w.message)
    ]
    if mode == "replace":  # the profile replaces what double_edge did, and says so at start-up
        assert len(replaced) == 1
        torch.testing.assert_close(weights_for(before, MIXED), expected)
    else:  # multiplication commutes
        assert not replaced
        torch.testing.assert_close(weights_for(before, MIXED), doubled)


def test_terrains_without_a_profile_fall_back_and_are_counted(tmp_path):
    ctx = make_ctx(
        tmp_path,
        [
            "plugins.terrain_loss.seed_profiles=false",
            "plugins.terrain_loss.fallback='flat'",
            "plugins.terrain_loss.profiles.alpine={edge=0.6}",
        ],
    )
    labels = [terrain_index("alpine"), 7, terrain_index("flat"), terrain_index("extreme"), -1]
    without_profile = [1, 3, 4]
    with pytest.warns(UserWarning, match=r"no profile for label -1, extreme, label 7") as caught:
        weights = weights_for(ctx, labels)
    assert len(caught) == 1
    torch.testing.assert_close(
        weights[0],
        seed_weights(
            "alpine", {**SEED_PROFILES, "alpine": {**SEED_PROFILES["alpine"], "edge": 0.6}}
        ),
    )
    for row in [2, *without_profile]:
        torch.testing.assert_close(weights[row], seed_weights("flat"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the next batch is quiet
        weights_for(ctx, [terrain_index("desert"), terrain_index("alpine")])
    assert ctx.pop_logged() == {LOG_KEY: (len(without_profile) + 1) / 2}


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("profiles.alpine={edg=0.3}", r"\(edg\) @ plugins\.terrain_loss\.profiles\['alpine'\]$"),
        (
            "profiles.alpine={edge='x'}",
            r"str 'x' @ plugins\.terrain_loss\.profiles\['alpine'\]\.edge",
        ),
        ("profiles.alpine={edge=-1.0}", r"'edge' must be >= 0.* @ plugins\.terrain_loss\.profiles"),
        ("mode='scaled'", r"'mode' must be in .*'scaled'.* @ plugins\.terrain_loss"),
        ("mod='scale'", r"\(mod\) @ plugins\.terrain_loss$"),
    ],
)
def test_config_errors_name_the_key(setting, message):
    config = load_config(None, [f"plugins.terrain_loss.{setting}"])
    with pytest.raises(ConfigError, match=message):
        PluginManager.from_names(["terrain_loss"], config.plugins)


def test_scale_mode_needs_a_positive_reference_profile(tmp_path):
    settings = [
        "plugins.terrain_loss.mode='scale'",
        "plugins.terrain_loss.profiles.moderate={spectral=0.0}",
    ]
    with pytest.raises(ConfigError, match=r"plugins\.terrain_loss\.profiles\.moderate\.spectral"):
        make_ctx(tmp_path, settings)


class CoastalDem(DemSuperResolution):
    """dem_sr's data, model and loss components over two other domains, as another task
    might define them."""

    name = "coastal_dem"
    terrains = ("coast", "inland")


COASTAL = [
    "plugins.terrain_loss.fallback='inland'",
    "plugins.terrain_loss.profiles.coast={elevation=1.0, gradient=0.2, curvature=0.1, "
    "edge=0.9, spectral=0.3}",
    "plugins.terrain_loss.profiles.inland={elevation=1.0, gradient=0.5, curvature=0.2, "
    "edge=0.2, spectral=0.1}",
]


def coastal_ctx(tmp_path: Path, overrides: list[str]) -> RunContext:
    """A context of :class:`CoastalDem` with ``terrain_loss``, set up as the trainer does."""
    config = load_config(None, overrides)
    manager = PluginManager.from_names(["terrain_loss"], config.plugins)
    ctx = RunContext(config, Accelerator(cpu=True), CoastalDem(), manager, tmp_path, 1)
    manager.call("setup", ctx=ctx)
    return ctx


def test_a_task_with_other_domains_is_weighted_with_the_profiles_of_its_domains(tmp_path):
    ctx = coastal_ctx(tmp_path, COASTAL)
    coast, inland = [1.0, 0.2, 0.1, 0.9, 0.3], [1.0, 0.5, 0.2, 0.2, 0.1]  # COMPONENTS order
    expected = torch.tensor([coast, inland, inland, coast])
    torch.testing.assert_close(weights_for(ctx, [0, 1, 1, 0]), expected)
    assert ctx.pop_logged() == {LOG_KEY: 0.0}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            [],
            "plugins.terrain_loss.fallback: task 'coastal_dem' has no domain 'moderate'; "
            "its domains are coast, inland",
        ),
        (
            [*COASTAL, "plugins.terrain_loss.profiles.alpine={edge=0.5}"],
            "plugins.terrain_loss.profiles.alpine: task 'coastal_dem' has no domain 'alpine'; "
            "its domains are coast, inland",
        ),
        (
            [
                "plugins.terrain_loss.fallback='coast'",
                "plugins.terrain_loss.profiles.coast={edge=0.5}",
            ],
            "plugins.terrain_loss.profiles.coast.elevation: the seed has no profile for "
            "'coast', so its profile lists every component",
        ),
        (
            ["plugins.terrain_loss.fallback='coast'"],
            "plugins.terrain_loss.fallback: 'coast' has no profile; give it one under "
            "[plugins.terrain_loss.profiles.coast]",
        ),
    ],
)
def test_profiles_and_fallback_must_name_the_tasks_domains(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as error:
        coastal_ctx(tmp_path, overrides)
    assert str(error.value) == message


def test_a_profile_for_a_domain_the_task_lacks_stops_the_run_naming_the_key(
    tmp_path, procedural_dir
):
    """Exit 2 before training, naming the plugin's key and the task's domains."""
    fast = [arg for setting in FAST for arg in ("--set", setting)]
    result = run_cli(sys.executable, "-m", "core.run", "--plugins", "terrain_loss", *fast,
                     "--set", "plugins.terrain_loss.profiles.alpin={edge=0.3}",
                     "--data", str(procedural_dir), "--out", str(tmp_path / "run"))  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        "error: plugins.terrain_loss.profiles.alpin: task 'dem_sr' has no domain 'alpin'; "
        "its domains are flat, moderate, alpine, desert, extreme" in result.stderr
    )


def test_training_run_weights_every_sample_with_its_profile(train_run):
    class Recorder:
        name = "recorder"

        def __init__(self) -> None:
            self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        @hookimpl
        def loss_weights(self, weights, batch, ctx):
            self.seen.append((batch["terrain"].cpu(), weights.detach().cpu()))

    recorder = Recorder()
    rows = train_run(TerrainLoss(TerrainLoss.Config()), recorder)
    assert recorder.seen and all(math.isfinite(row["train_loss"]) for row in rows)
    mixed = 0
    for terrain, weights in recorder.seen:
        expected = torch.stack([seed_weights(TERRAINS[t]) for t in terrain.tolist()])
        torch.testing.assert_close(weights, expected)
        mixed += len(terrain.unique()) > 1
    assert mixed, "the default shuffle must have produced mixed batches"
    assert all(row[LOG_KEY] == 0 for row in rows)
