"""The plugin manager: ordering, exclusivity, pluggy's hookimpl contract, discovery, broken
and unknown plugins, config sections and plugin state."""

from __future__ import annotations

import json
import sys
import textwrap
import tomllib
import warnings
from pathlib import Path

import attrs
import numpy as np
import pluggy
import pytest
import tomli_w
import torch

import terraplug
from core.config import load_config
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
from core.train import Trainer
from plugins import BUILTIN_PLUGINS
from tests.conftest import FAST, install_distribution
from tests.test_run import run_cli
from tests.test_task_registry import write_distribution


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
    assert set(manager().exclusive_hooks()) == {
        "batch_plan",
        "training_forward",
        "probe_losses",
        "backward",
    }


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


def test_a_named_plugin_that_fails_to_load_stops_the_run(fake_distributions):
    with pytest.raises(PluginError, match=r"'broken' from broken_dist 1\.0.*no_such_module_xyz"):
        PluginManager.from_names(["broken", "scaled"])


def test_a_broken_plugin_the_run_does_not_name_stops_it_only_when_strict(fake_distributions):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [p.name for p in PluginManager.from_names(["scaled"]).active] == ["scaled"]
    with pytest.raises(PluginError, match=r"'broken' from broken_dist 1\.0"):
        PluginManager.from_names(["scaled"], strict=True)


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


def test_a_section_for_an_unknown_plugin_is_an_error_suggesting_the_closest(fake_distributions):
    with pytest.raises(PluginError, match=r"\[plugins\.scaledd\].*Did you mean 'scaled'"):
        PluginManager.from_names([], {"scaledd": {"factor": 3.0}})


def test_a_section_for_an_inactive_plugin_is_checked_then_unused(fake_distributions):
    with pytest.raises(ConfigError, match=r"plugins\.scaled"):
        PluginManager.from_names([], {"scaled": {"factr": 3.0}})
    with pytest.warns(UserWarning, match=r"\[plugins\.scaled\].*unused"):
        pm = PluginManager.from_names([], {"scaled": {"factor": 3.0}})
    assert pm.active == []


def test_resolved_sections_hold_every_key_with_defaults(fake_distributions):
    pm = PluginManager.from_names(["scaled"], {"scaled": {}})
    assert pm.resolved_sections({"scaled": {}}) == {"scaled": {"factor": 2.0}}


@pytest.mark.parametrize("name", sorted(BUILTIN_PLUGINS))
def test_every_builtins_resolved_section_reads_back_as_the_same_config(name):
    pm = PluginManager.from_names([name])
    text = tomli_w.dumps({"plugins": pm.resolved_sections({})})
    again = PluginManager.from_names([name], tomllib.loads(text)["plugins"])
    assert again.config(name) == pm.config(name)


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


# --- pluggy's hookimpl contract ----------------------------------------------------------------


def test_an_implementation_declaring_a_subset_of_arguments_runs():
    class WeightsOnly:
        @hookimpl
        def loss_weights(self, weights):
            return weights * 3

    seen = []

    class NoArguments:
        @hookimpl
        def on_epoch_start(self):
            seen.append("called")

    assert chain_weights(manager(WeightsOnly())).item() == 3.0
    manager(NoArguments()).call("on_epoch_start", epoch=1, ctx=None)
    assert seen == ["called"]


def test_arguments_are_passed_by_name_in_any_order():
    class Reordered:
        @hookimpl
        def batch_plan(self, epoch, ctx, indices):
            return [[epoch, *indices]]

    plan = manager(Reordered()).exclusive(
        "batch_plan", dataset=None, indices=[7, 8], epoch=3, ctx=None
    )
    assert plan == [[3, 7, 8]]


def test_module_plugin_with_a_subset_of_arguments(tmp_path, monkeypatch):
    (tmp_path / "subset_module.py").write_text(
        "from terraplug import hookimpl\n\n"
        "@hookimpl\n"
        "def loss_weights(weights):\n"
        "    return weights * 7\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(BUILTIN_PLUGINS, "subset_module", "subset_module")
    assert chain_weights(PluginManager.from_names(["subset_module"])).item() == 7.0
    sys.modules.pop("subset_module", None)


@pytest.mark.parametrize(
    ("option", "advice"),
    [
        ("tryfirst", "list the plugin earlier"),
        ("trylast", "list the plugin later"),
        ("wrapper", "does not run hook wrappers"),
        ("hookwrapper", "does not run hook wrappers"),
    ],
)
@pytest.mark.parametrize("hook", ["loss_weights", "backward"])
def test_ordering_and_wrapper_options_are_refused_at_registration(option, advice, hook):
    def weights(self, weights, batch, ctx):
        yield

    def backward(self, per_sample_loss, batch, ctx):
        yield

    function = {"loss_weights": weights, "backward": backward}[hook]
    Marked = type("Marked", (), {hook: hookimpl(**{option: True})(function)})
    with pytest.raises(
        PluginError, match=rf"'Marked' marks hook '{hook}' {option}=True: .*{advice}"
    ):
        manager(Marked())


def test_specname_implements_the_named_hook():
    class Renamed:
        @hookimpl(specname="loss_weights")
        def triple(self, weights):
            return weights * 3

    pm = manager(Renamed())
    assert pm.active[0].hooks == ["loss_weights"]
    assert chain_weights(pm).item() == 3.0


def test_optionalhook_for_a_hook_terraplug_lacks_is_accepted_and_never_called():
    class FutureHook:
        @hookimpl(optionalhook=True)
        def on_batch_end(self, ctx):
            raise AssertionError("no such hook: never called")

        @hookimpl
        def loss_weights(self, weights):
            return weights + 1

    assert chain_weights(manager(FutureHook())).item() == 2.0


# --- plugin state ---------------------------------------------------------------------------


class Counter(Plugin):
    """Counts calls; keeps the count in the checkpoint."""

    name = "counter"

    def __init__(self, config=None, extra=None):
        super().__init__(config)
        self.calls = 0
        self.extra = extra

    @hookimpl
    def on_epoch_start(self):
        self.calls += 1

    def state_dict(self):
        return {"calls": self.calls, "history": torch.arange(3), "extra": self.extra}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_plugin_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    saved = manager(Counter(), names=["counter"])
    saved.call("on_epoch_start", epoch=1, ctx=None)
    path = tmp_path / "state.pt"
    torch.save({"plugins": saved.state_dict()}, path)
    restored = manager(Counter(), names=["counter"])
    restored.load_state_dict(torch.load(path, weights_only=True)["plugins"])
    assert restored.active[0].obj.calls == 1


def test_plugin_state_that_a_weights_only_load_refuses_is_an_error_naming_the_plugin():
    with pytest.raises(
        PluginError, match=r"'counter': state_dict\(\)\['extra'\]\[0\] is a float64"
    ):
        manager(Counter(extra=[np.float64(1.0)]), names=["counter"]).state_dict()


def test_a_module_plugin_has_a_checked_config_and_state(tmp_path, monkeypatch):
    (tmp_path / "stateful_module.py").write_text(
        textwrap.dedent("""\
            import attrs
            from terraplug import hookimpl

            @attrs.frozen
            class Config:
                factor: float = 1.0

            calls = []

            @hookimpl
            def loss_weights(weights, ctx):
                calls.append(1)
                return weights * ctx.plugin_config("stateful_module").factor

            def state_dict():
                return {"calls": len(calls)}

            def load_state_dict(state):
                calls[:] = [1] * state["calls"]
            """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(BUILTIN_PLUGINS, "stateful_module", "stateful_module")
    with pytest.raises(ConfigError, match=r"plugins\.stateful_module"):
        PluginManager.from_names(["stateful_module"], {"stateful_module": {"factr": 2.0}})
    pm = PluginManager.from_names(["stateful_module"], {"stateful_module": {"factor": 4.0}})

    class Context:
        plugin_config = staticmethod(pm.config)

    assert pm.chain("loss_weights", torch.ones(1), "weights", ctx=Context()).item() == 4.0
    assert pm.state_dict() == {"stateful_module": {"calls": 1}}
    pm.load_state_dict({"stateful_module": {"calls": 3}})
    assert pm.state_dict() == {"stateful_module": {"calls": 3}}
    sys.modules.pop("stateful_module", None)


def test_the_registered_name_not_the_class_name_attribute_names_the_plugin(monkeypatch):
    monkeypatch.setitem(BUILTIN_PLUGINS, "alias", "tests.test_plugins:Scaled")
    pm = PluginManager.from_names(["alias"], {"alias": {"factor": 3.0}})
    assert pm.active[0].name == "alias" and Scaled.name == "scaled"
    assert pm.config("alias").factor == 3.0


def test_a_plugin_without_options_accepts_only_an_empty_section():
    assert PluginManager.from_names(["balanced_grad"], {"balanced_grad": {}}).active
    with pytest.raises(ConfigError, match=r"anything.*plugins\.balanced_grad"):
        PluginManager.from_names(["balanced_grad"], {"balanced_grad": {"anything": 1}})


def test_a_plugin_that_exits_at_import_is_listed_as_broken(tmp_path: Path):
    """``sys.exit()`` in a plugin's module is a failure to load like any other: the listing
    goes on and shows it, and a run that needs it stops naming it."""
    source = write_distribution(
        tmp_path / "exiting",
        "terraplug-exiting-plugin",
        "import sys\n\nsys.exit(3)\n",
        {"terraplug.plugins": {"exiting": "terraplug_exiting_plugin:Plugin"}},
    )
    site = install_distribution(source, tmp_path / "site")
    listing = run_cli(sys.executable, "-m", "core.run", "--list-plugins", path=[site])
    assert listing.returncode == 0, listing.stderr[-3000:]
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()}
    assert set(BUILTIN_PLUGINS) < set(rows)
    assert "terraplug-exiting-plugin 0.0.1" in rows["exiting"]
    assert rows["exiting"].endswith("BROKEN: SystemExit: sys.exit(3) called on import")
    for args in (["--list-plugins", "--strict-plugins"], ["--plugins", "exiting"]):
        result = run_cli(sys.executable, "-m", "core.run", *args, "--out",
                         str(tmp_path / "run"), path=[site])  # fmt: skip
        assert result.returncode == 2, result.stderr[-3000:]
        assert "plugin 'exiting' from terraplug-exiting-plugin 0.0.1" in result.stderr
        assert "SystemExit: sys.exit(3) called on import" in result.stderr
    assert not (tmp_path / "run").exists()


# --- pluggy's own machinery -----------------------------------------------------------------


def test_pluggys_hook_monitoring_sees_every_call_in_plugins_order(tmp_path, procedural_dir):
    """A real run of two plugins sharing composable hooks and one providing an exclusive hook:
    ``add_hookcall_monitoring`` sees each of terraplug's calls, one implementation at a time,
    in ``--plugins`` order (pluggy's own order would be the reverse), with its result."""
    order = ["terrain_embedding", "domain_bn", "stratified"]
    config = load_config(
        None,
        [
            *FAST,
            "model.norm='batch'",
            f"data.dir={json.dumps(str(procedural_dir))}",
            f"run.out={json.dumps(str(tmp_path / 'run'))}",
            "run.epochs=2",
            f"run.plugins={json.dumps(order)}",
        ],
    )
    manager = PluginManager.from_names(config.run.plugins, config.plugins)
    before, after = [], []
    manager.pm.add_hookcall_monitoring(
        lambda hook, impls, kwargs: before.append((hook, [i.plugin_name for i in impls])),
        lambda outcome, hook, impls, kwargs: after.append((hook, outcome.get_result())),
    )
    Trainer(config, manager).fit()
    providers = {
        hook: [plugin.name for plugin in manager.active if hook in plugin.hooks]
        for plugin in manager.active
        for hook in plugin.hooks
    }
    assert {"configure_model", "route_batch", "batch_plan"} <= set(providers)
    assert providers["configure_model"] == order[:2] and providers["batch_plan"] == order[2:]
    assert {hook for hook, _ in before} == set(providers)
    assert all(len(names) == 1 for _, names in before)
    for hook, names in providers.items():
        called = [plugin for seen, (plugin,) in before if seen == hook]
        assert called and called == names * (len(called) // len(names)), hook
    assert [hook for hook, _ in before].count("batch_plan") == 2  # once per epoch
    assert [hook for hook, _ in after] == [hook for hook, _ in before]
    plans = [result for hook, result in after if hook == "batch_plan"]
    assert all(isinstance(plan, list) and plan for plan in plans)


def test_pluggys_tracing_and_hook_call_error_work():
    pm = manager(Double(), AddOne())
    lines: list[str] = []
    pm.pm.trace.root.setwriter(lines.append)
    pm.pm.enable_tracing()
    assert chain_weights(pm).item() == 3.0
    calls = [line.split() for line in lines if line.split()[:2] == ["loss_weights", "[hook]"]]
    assert [call[:4] for call in calls] == [  # Double, then AddOne, each on its own
        ["loss_weights", "[hook]", "weights:", "tensor([1.])"],
        ["loss_weights", "[hook]", "weights:", "tensor([2.])"],
    ]
    with (
        pytest.warns(UserWarning, match="'batch'.* cannot be found in this hook call"),
        pytest.raises(pluggy.HookCallError, match="must provide argument 'batch'"),
    ):
        pm.chain("loss_weights", torch.ones(1), "weights", ctx=None)


def test_a_plugin_implementing_a_hook_twice_is_refused():
    class Twice:
        @hookimpl
        def loss_weights(self, weights):
            return weights

        @hookimpl(specname="loss_weights")
        def again(self, weights):
            return weights

    with pytest.raises(PluginError, match="plugin 'Twice' implements hook 'loss_weights' twice"):
        manager(Twice())


@attrs.frozen
class NoisyConfig:
    eta: float = attrs.field(default=0.01, validator=terraplug.non_negative)


class Noisy(Plugin):
    """A plugin whose one option uses an exported validator."""

    name = "noisy"
    Config = NoisyConfig


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0])
def test_terraplugs_validators_refuse_what_attrs_ge_lets_through(value, monkeypatch):
    """``attrs.validators.ge(0)`` accepts inf and nan; the exported validators refuse them,
    and the config error names the plugin's key."""
    monkeypatch.setitem(BUILTIN_PLUGINS, "noisy", "tests.test_plugins:Noisy")
    with pytest.raises(ConfigError, match=r"'eta' must be .* @ plugins\.noisy\.eta"):
        PluginManager.from_names(["noisy"], {"noisy": {"eta": value}})


@attrs.define
class ByValue:
    """A plugin object that compares by value, so Python gives it no hash."""

    name: str = "by_value"

    @hookimpl
    def on_epoch_start(self, epoch, ctx):
        pass


def test_an_unhashable_plugin_object_is_refused_naming_it():
    with pytest.raises(PluginError, match=r"plugin 'by_value' .* unhashable .*eq=False\)"):
        PluginManager([ActivePlugin("by_value", "test", ByValue(), None)])
