"""What the CLI promises about plugins: broken and unknown plugins stop the run (exit 2),
config.toml holds every active plugin's keys, plugin state and logged values survive
``--resume``, every built-in plugin's run resumes bit for bit, ``ctx.log`` keys may not clash,
and plugins serve only tasks they can."""

from __future__ import annotations

import os
import signal
import tomllib
from typing import Any, ClassVar

import pytest
import torch

import plugins
from core.config import unstructure
from core.run import main
from core.run_folder import CHECKPOINT
from core.safe_io import load_checkpoint
from plugins.samplers.curriculum import Curriculum, CurriculumConfig
from plugins.samplers.stratified import Stratified, StratifiedConfig
from terraplug import ConfigError, Plugin, hookimpl
from tests.conftest import read_metrics
from tests.test_plugins import fake_distributions  # noqa: F401  (a fixture)
from tests.test_run import fast_args, without_timing

# --- broken, unknown and inactive plugins ------------------------------------------------


def test_a_named_broken_plugin_exits_2_naming_it_and_its_distribution(
    fake_distributions,  # noqa: F811
    tmp_path,
    capsys,
):
    assert main(["--plugins", "broken", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "'broken' from broken_dist 1.0" in err and "no_such_module_xyz" in err
    assert not (tmp_path / "run").exists(), "nothing trained"


def test_list_plugins_strict_names_the_broken_plugin_and_exits_2(
    fake_distributions,  # noqa: F811
    capsys,
):
    assert main(["--list-plugins"]) == 0
    assert main(["--list-plugins", "--strict-plugins"]) == 2
    err = capsys.readouterr().err
    assert "plugin 'broken' from broken_dist 1.0 failed to load: ModuleNotFoundError" in err


def test_a_section_for_a_misspelt_plugin_exits_2_with_the_closest_name(tmp_path, capsys):
    args = ["--set", "plugins.stratifed.batch_size=4", "--out", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "[plugins.stratifed]" in err and "Did you mean 'stratified'?" in err


# --- the resolved config -------------------------------------------------------------------


def test_config_toml_holds_every_key_of_every_active_plugin(procedural_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--plugins", "stratified,curriculum", "--epochs", "1"]
    args += ["--set", "train.max_steps_per_epoch=1"]
    args += ["--set", "plugins.stratified.batch_size=5"]
    assert main(fast_args(procedural_dir, out, *args)) == 0
    sections = tomllib.loads((out / "config.toml").read_text())["plugins"]
    assert sections["stratified"] == unstructure(StratifiedConfig(batch_size=5))
    assert sections["curriculum"] == unstructure(CurriculumConfig())
    assert main(["--config", str(out / "config.toml"), "--out", str(tmp_path / "again")]) == 0
    assert without_timing(read_metrics(tmp_path / "again")) == without_timing(read_metrics(out))


# --- state and logged values on resume -------------------------------------------------------


class Tally(Plugin):
    """Test probe: logs values that depend on its own step count, which it checkpoints;
    interrupts the run (SIGINT, as Ctrl-C) after step ``stop_at``."""

    name = "tally"
    stop_at: ClassVar[int | None] = None

    def __init__(self, config: object) -> None:
        super().__init__(config)
        self.steps = 0

    @hookimpl
    def on_epoch_start(self, epoch, ctx):
        ctx.log("tally_at_epoch_start", 100 * epoch + self.steps)

    @hookimpl
    def loss_weights(self, batch, ctx):
        self.steps += 1
        ctx.log("tally_steps", self.steps)
        ctx.log("tally_tile", float(batch["idx"].float().mean()))
        if self.steps == Tally.stop_at:
            os.kill(os.getpid(), signal.SIGINT)

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def test_resumed_run_equals_the_uninterrupted_one_including_plugin_logged_keys(
    procedural_dir, tmp_path, monkeypatch
):
    monkeypatch.setitem(plugins.BUILTIN_PLUGINS, "tally", f"{__name__}:Tally")
    args = ["--plugins", "tally", "--epochs", "2", "--set", "train.max_steps_per_epoch=3"]
    straight = tmp_path / "straight"
    assert main(fast_args(procedural_dir, straight, *args)) == 0
    reference = without_timing(read_metrics(straight))
    steps = reference[0]["steps"]
    assert {"tally_steps", "tally_tile", "tally_at_epoch_start"} <= set(reference[0])

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(Tally, "stop_at", steps + 2)  # inside epoch 2
    assert main(fast_args(procedural_dir, interrupted, *args)) == 130
    assert len(read_metrics(interrupted)) == 1
    state = load_checkpoint(interrupted / CHECKPOINT)
    assert state["plugins"] == {"tally": {"steps": steps + 2}}

    monkeypatch.setattr(Tally, "stop_at", None)
    assert main(["--resume", str(interrupted)]) == 0
    assert without_timing(read_metrics(interrupted)) == reference


class Stop(Plugin):
    """Test probe: SIGINT (as Ctrl-C) right after optimizer step ``at``."""

    name = "stop"
    at: ClassVar[int | None] = None

    @hookimpl
    def after_optimizer_step(self, ctx):
        if ctx.global_step == Stop.at:
            os.kill(os.getpid(), signal.SIGINT)


DEM_SR_PLUGINS = sorted(
    name for name, target in plugins.BUILTIN_PLUGINS.items()
    if not target.startswith("plugins.generators.")  # sar2opt's: test_sar2opt resumes them
)  # fmt: skip
SETTINGS = {"domain_bn": ["--set", "model.norm='batch'"], "ema": ["--set", "plugins.ema.decay=0.5"]}
"""What a plugin needs, or what makes its effect visible in a few steps."""


def assert_identical(resumed: Any, straight: Any, where: str) -> None:
    """Equal values, tensors bit for bit, at any depth of dicts and lists."""
    if isinstance(straight, torch.Tensor):
        assert torch.equal(resumed, straight), where
    elif isinstance(straight, dict):
        assert resumed.keys() == straight.keys(), where
        for key, value in straight.items():
            assert_identical(resumed[key], value, f"{where}[{key!r}]")
    elif isinstance(straight, list | tuple):
        assert len(resumed) == len(straight), where
        for index, (again, value) in enumerate(zip(resumed, straight, strict=True)):
            assert_identical(again, value, f"{where}[{index}]")
    else:
        assert resumed == straight, where


def stopped_and_resumed(procedural_dir, tmp_path, monkeypatch, args) -> tuple[Any, Any]:
    """The run ``args`` describe (two epochs; ``--plugins`` must include ``stop``), stopped
    after step 3 and resumed, beside the same run never interrupted: their folders."""
    monkeypatch.setitem(plugins.BUILTIN_PLUGINS, "stop", f"{__name__}:Stop")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(fast_args(procedural_dir, straight, *args)) == 0
    monkeypatch.setattr(Stop, "at", 3)
    assert main(fast_args(procedural_dir, interrupted, *args)) == 130
    monkeypatch.setattr(Stop, "at", None)
    assert main(["--resume", str(interrupted)]) == 0
    return interrupted, straight


@pytest.mark.parametrize("name", DEM_SR_PLUGINS)
def test_every_plugin_resumes_bit_for_bit(name, procedural_dir, tmp_path, monkeypatch):
    """Interrupted within its second epoch and resumed, a run ends with the metrics, weights,
    optimizer, plugin state and random generators of the run that was never interrupted."""
    args = ["--plugins", f"{name},stop", "--set", "train.max_steps_per_epoch=2"]
    args += SETTINGS.get(name, [])
    interrupted, straight = stopped_and_resumed(procedural_dir, tmp_path, monkeypatch, args)
    assert without_timing(read_metrics(interrupted)) == without_timing(read_metrics(straight))
    resumed, reference = (load_checkpoint(run / CHECKPOINT) for run in (interrupted, straight))
    for key in ("model", "optimizer", "plugins", "global_step"):
        assert_identical(resumed[key], reference[key], key)
    # a plugin that draws random numbers after a resume draws what the uninterrupted run did
    rng = [[process["rng"] for process in state["processes"]] for state in (resumed, reference)]
    assert_identical(*rng, "processes[*].rng")


def test_a_logged_key_that_clashes_with_a_trainer_metric_is_an_error(train_run):
    class Clash:
        @hookimpl
        def loss_weights(self, ctx):
            ctx.log("train_loss", 0.0)

    with pytest.raises(RuntimeError, match=r"ctx.log keys \['train_loss'\] clash"):
        train_run(Clash(), overrides=("run.epochs=1",))


# --- plugins serve the task's domains ----------------------------------------------------


class OneDomain:
    """Test probe: the task's domains become one, as sar2opt's ``("scene",)``."""

    name = "one_domain"

    @hookimpl
    def setup(self, ctx):
        ctx.terrains = ("scene",)


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        (Stratified(StratifiedConfig()), r"stratified .* has only \['scene'\]"),
        (Curriculum(CurriculumConfig()), r"curriculum .* has the domains scene"),
    ],
)
def test_a_plugin_refuses_a_task_it_cannot_serve(train_run, plugin, message):
    with pytest.raises(ConfigError, match=message):
        train_run(OneDomain(), plugin, overrides=("run.epochs=1",))
