"""The plugin manager: ordering, exclusivity, discovery, broken and unknown plugins."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import attrs
import pytest
import torch

from core.errors import ConfigError, PluginError
from core.hookspecs import hookimpl
from core.plugins import (
    ActivePlugin,
    Plugin,
    PluginManager,
    describe_all,
    discover,
    implemented_hooks,
    unknown_plugin_message,
)
from plugins import BUILTIN_PLUGINS


class Double:
    @hookimpl
    def loss_weights(self, weights, batch, ctx):
        return weights * 2


class AddOne:
    @hookimpl
    def loss_weights(self, weights, batch, ctx):
        return weights + 1


class KeepSame:
    @hookimpl
    def loss_weights(self, weights, batch, ctx):
        return None


def manager(*objs, names: list[str] | None = None) -> PluginManager:
    names = names or [type(o).__name__ for o in objs]
    return PluginManager(
        [ActivePlugin(n, "test", o, None) for n, o in zip(names, objs, strict=True)]
    )


def chain_weights(pm: PluginManager) -> torch.Tensor:
    return pm.chain("loss_weights", torch.ones(1), "weights", batch={}, ctx=None)


def test_composable_hooks_run_in_plugins_order():
    assert chain_weights(manager(Double(), AddOne())).item() == 3.0  # (1 * 2) + 1
    assert chain_weights(manager(AddOne(), Double())).item() == 4.0  # (1 + 1) * 2


def test_chain_keeps_value_when_plugin_returns_none():
    assert chain_weights(manager(Double(), KeepSame(), AddOne())).item() == 3.0


def test_call_order_follows_plugins_order_for_many():
    seen = []

    def recorder(tag):
        class Recorder:
            @hookimpl
            def on_epoch_start(self, epoch, ctx):
                seen.append(tag)

        return Recorder()

    order = ["c", "a", "d", "b"]
    pm = manager(*[recorder(tag) for tag in order], names=order)
    pm.call("on_epoch_start", epoch=1, ctx=None)
    assert seen == order


class PlanA:
    @hookimpl
    def batch_plan(self, dataset, indices, epoch, ctx):
        return [indices]


class PlanB:
    @hookimpl
    def batch_plan(self, dataset, indices, epoch, ctx):
        return [indices[::-1]]


def test_two_providers_of_an_exclusive_hook_is_an_error_naming_both():
    with pytest.raises(PluginError, match=r"'PlanA' and 'PlanB'.*exclusive hook 'batch_plan'"):
        manager(PlanA(), PlanB())


def test_exclusive_hooks_are_the_firstresult_specs():
    assert set(manager().exclusive_hooks()) == {"batch_plan", "training_forward", "backward"}


def test_single_exclusive_provider_is_called():
    pm = manager(PlanB(), Double())
    assert pm.provider("batch_plan") == "PlanB"
    plan = pm.exclusive("batch_plan", dataset=None, indices=[1, 2], epoch=1, ctx=None)
    assert plan == [[2, 1]]
    assert pm.exclusive("backward", per_sample_loss=None, batch={}, ctx=None) is None


def test_misspelled_hook_is_rejected():
    class Typo:
        @hookimpl
        def loss_weight(self, weights, batch, ctx):
            return weights

    with pytest.raises(PluginError, match="loss_weight"):
        manager(Typo())


def test_hook_with_unknown_argument_is_rejected():
    class WrongArgs:
        @hookimpl
        def loss_weights(self, weights, batch, ctx, extra):
            return weights

    with pytest.raises(PluginError, match="extra"):
        manager(WrongArgs())


def test_exception_in_hook_names_plugin_and_hook():
    class Boom:
        @hookimpl
        def on_epoch_start(self, epoch, ctx):
            raise ValueError("bad")

    with pytest.raises(ValueError) as info:
        manager(Boom()).call("on_epoch_start", epoch=1, ctx=None)
    assert "raised by plugin 'Boom' in hook 'on_epoch_start'" in info.value.__notes__


def test_unknown_plugin_message_suggests_closest_and_lists_all():
    message = unknown_plugin_message("stratifed", ["stratified", "curriculum", "pcgrad"])
    assert "'stratifed'" in message
    assert "Did you mean 'stratified'?" in message
    assert "curriculum, pcgrad, stratified" in message


def test_unknown_plugin_is_a_plugin_error():
    with pytest.raises(PluginError, match="unknown plugin 'no_such_plugin'"):
        PluginManager.from_names(["no_such_plugin"])


def test_builtin_registry_only_names_real_plugins():
    for name, source in discover().items():
        if name in BUILTIN_PLUGINS:
            loaded = source.load()
            assert issubclass(loaded, Plugin) and loaded.name == name
            assert implemented_hooks(loaded), f"{name} implements no hook"


@attrs.define
class ScaledConfig:
    factor: float = 2.0


class Scaled(Plugin):
    """Scale all loss weights."""

    name = "scaled"
    Config = ScaledConfig

    @hookimpl
    def loss_weights(self, weights, batch, ctx):
        return weights * self.config.factor


@pytest.fixture
def fake_distributions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Real importlib.metadata distributions on sys.path: one good, one broken."""
    (tmp_path / "probe_plugins.py").write_text(
        "from tests.test_plugins import Scaled\n"  # a plugin class living elsewhere
    )
    for dist, entry in {
        "good_dist": "scaled = probe_plugins:Scaled",
        "broken_dist": "broken = no_such_module_xyz:Plugin",
    }.items():
        info = tmp_path / f"{dist}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(
            textwrap.dedent(f"""\
                [terraplug.plugins]
                {entry}
                """)
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent))
    return tmp_path


def test_entry_point_plugin_is_discovered_with_its_distribution(fake_distributions):
    sources = discover()
    assert sources["scaled"].origin == "good_dist 1.0"
    pm = PluginManager.from_names(["scaled"], {"scaled": {"factor": 3.0}})
    assert pm.active[0].origin == "good_dist 1.0"
    assert pm.config("scaled").factor == 3.0
    assert chain_weights(pm).item() == 3.0


def test_plugin_config_errors_name_the_key(fake_distributions):
    with pytest.raises(ConfigError, match=r"plugins\.scaled"):
        PluginManager.from_names(["scaled"], {"scaled": {"factr": 3.0}})
    with pytest.raises(ConfigError, match=r"expected float.*plugins\.scaled\.factor"):
        PluginManager.from_names(["scaled"], {"scaled": {"factor": "big"}})


def test_broken_entry_point_is_skipped_with_its_distribution(fake_distributions):
    with pytest.warns(UserWarning, match=r"'broken' from broken_dist 1\.0.*skipped"):
        pm = PluginManager.from_names(["broken", "scaled"])
    assert [p.name for p in pm.active] == ["scaled"]


def test_broken_entry_point_is_fatal_when_strict(fake_distributions):
    with pytest.raises(PluginError, match=r"broken_dist 1\.0.*no_such_module_xyz"):
        PluginManager.from_names(["broken"], strict=True)


def test_list_shows_origin_hooks_summary_and_broken(fake_distributions):
    rows = {row["name"]: row for row in describe_all()}
    assert rows["scaled"]["origin"] == "good_dist 1.0"
    assert rows["scaled"]["hooks"] == "loss_weights"
    assert rows["scaled"]["summary"] == "Scale all loss weights."
    assert rows["broken"]["summary"].startswith("BROKEN: ModuleNotFoundError")


def test_entry_point_may_not_shadow_a_builtin(fake_distributions, monkeypatch):
    monkeypatch.setitem(BUILTIN_PLUGINS, "scaled", "tests.test_plugins:Scaled")
    with pytest.raises(PluginError, match="already taken by built-in"):
        discover()


def test_plugin_named_twice_is_an_error():
    with pytest.raises(PluginError, match="named twice"):
        PluginManager.from_names(["a", "a"])


def test_unused_plugin_section_warns(fake_distributions):
    with pytest.warns(UserWarning, match=r"\[plugins\.other\]"):
        PluginManager.from_names(["scaled"], {"other": {}})


def test_module_plugins_are_registered_as_modules(tmp_path, monkeypatch):
    (tmp_path / "module_plugin.py").write_text(
        "from core.hookspecs import hookimpl\n\n"
        "@hookimpl\n"
        "def loss_weights(weights, batch, ctx):\n"
        "    return weights * 5\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(BUILTIN_PLUGINS, "mod", "module_plugin")
    pm = PluginManager.from_names(["mod"])
    assert pm.active[0].hooks == ["loss_weights"]
    assert chain_weights(pm).item() == 5.0
    sys.modules.pop("module_plugin", None)
