"""Finding, configuring and calling plugins.

Built-in strategies are listed in :data:`plugins.BUILTIN_PLUGINS`; third-party ones come from
the ``terraplug.plugins`` entry-point group (name = the name users type, value = a plugin
class or a module of hook functions). Only the plugins named in ``--plugins`` (and those
with a ``[plugins.<name>]`` section, to check it) are imported.

Pluggy calls hook implementations in reverse registration order; composable hooks here run
in ``--plugins`` order instead, and an exclusive hook with two providers is an error. So each
implementation is called on its own, through a pluggy caller of its plugin alone
(``subset_hook_caller``): pluggy passes it the arguments it declares and raises
``HookCallError`` for a missing one, and its tracing (``enable_tracing``) and
``add_hookcall_monitoring`` see every call, one implementation at a time, in ``--plugins``
order. Pluggy's ordering and wrapper options have no meaning under that rule, so a plugin
that uses them is refused at registration, as is one implementing a hook twice; ``specname``
and ``optionalhook`` are honoured.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Collection, Mapping
from types import ModuleType
from typing import Any, ClassVar, TypeVar

import attrs
import pluggy
import torch

from core import hookspecs
from core.config import structure, unstructure
from core.errors import PluginError
from core.registry import (
    BROKEN,
    BUILTIN,
    Registration,
    broken_names,
    failure,
    registrations,
    summary,
    unknown_message,
)

T = TypeVar("T")

ENTRY_POINT_GROUP = "terraplug.plugins"


@attrs.frozen
class NoConfig:
    """The config of a plugin without options: an empty ``[plugins.<name>]`` section."""


class Plugin:
    """Base class of strategy plugins: a name, an attrs ``Config`` and hook implementations.

    The manager builds the plugin's config from ``[plugins.<name>]`` (the name users type,
    which for a third-party plugin is its entry-point name) and passes it to ``__init__``,
    which stores it as ``self.config``; hook methods are marked with
    :data:`core.hookspecs.hookimpl`. ``name`` is the plugin's own idea of that name, used
    where no entry point is involved (built-ins, the testing harness).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig

    def __init__(self, config: Any) -> None:
        self.config = config

    def state_dict(self) -> dict[str, Any]:
        """State to keep in the checkpoint, so ``--resume`` continues where the run stopped.

        Plain values only (str, int, float, bool, None, tensors, and dicts, lists and tuples
        of them): checkpoints are read with ``torch.load(weights_only=True)``.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned: on a resumed run after ``setup``, and by
        ``TrainedRun.restore`` (predict) without ``setup`` for a plugin that implements
        ``evaluation_weights``."""


@attrs.frozen
class ActivePlugin:
    """A loaded, configured and registered plugin."""

    name: str
    origin: str
    obj: Any
    """The registered object: a Plugin instance or a module."""
    config: Any

    @property
    def hooks(self) -> list[str]:
        return implemented_hooks(self.obj)


def builtin_sources() -> dict[str, Registration]:
    from plugins import BUILTIN_PLUGINS

    return registrations("plugin", BUILTIN_PLUGINS, None, PluginError)


def discover() -> dict[str, Registration]:
    """All plugins a run can name: built-ins, then entry points (a name may appear once)."""
    from plugins import BUILTIN_PLUGINS

    return registrations("plugin", BUILTIN_PLUGINS, ENTRY_POINT_GROUP, PluginError)


def unknown_plugin_message(name: str, available: list[str], broken: Collection[str] = ()) -> str:
    """An unknown plugin's message: the closest name, and the ones available (broken marked)."""
    return unknown_message("plugin", name, available, broken)


def implemented_hooks(obj: Any) -> list[str]:
    """Names of the hooks ``obj`` implements, in hook-spec order (``specname`` honoured)."""
    marker = f"{hookspecs.PROJECT}_impl"
    implemented = set()
    for attribute in dir(obj):
        opts = getattr(getattr(obj, attribute, None), marker, None)
        if isinstance(opts, dict):
            implemented.add(opts.get("specname") or attribute)
    return [name for name in hook_names() if name in implemented]


def hook_names() -> list[str]:
    """Every hook spec, in the order ``core.hookspecs`` defines them."""
    marker = f"{hookspecs.PROJECT}_spec"
    return [name for name, value in vars(hookspecs).items() if hasattr(value, marker)]


def instantiate(name: str, origin: str, loaded: type | ModuleType, raw: dict[str, Any]) -> Any:
    """Configure a loaded plugin: a class gets its Config instance, a module is used as is."""
    config_class = getattr(loaded, "Config", NoConfig)
    config = structure(raw, config_class, f"plugins.{name}")
    if isinstance(loaded, ModuleType):
        return loaded, config
    if not isinstance(loaded, type):
        raise PluginError(f"plugin {name!r} from {origin} is neither a class nor a module")
    return loaded(config), config


REFUSED_OPTIONS = {
    "tryfirst": "hooks run in --plugins order (an exclusive one has a single provider): "
    "list the plugin earlier instead",
    "trylast": "hooks run in --plugins order (an exclusive one has a single provider): "
    "list the plugin later instead",
    "wrapper": "terraplug does not run hook wrappers; implement the hook itself",
    "hookwrapper": "terraplug does not run hook wrappers; implement the hook itself",
}
"""Pluggy hookimpl options terraplug refuses, with what to do instead."""

PLAIN_SCALARS = (str, int, float, bool, type(None))
"""Exact types: a subclass such as ``numpy.float64`` is not read back by a weights-only load."""


def check_plain(value: Any, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` would not read back."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise PluginError(f"{where}: key {key!r} is not a str or int")
            check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_plain(item, f"{where}[{index}]")
    elif type(value) not in PLAIN_SCALARS and not isinstance(value, torch.Tensor):
        raise PluginError(
            f"{where} is a {type(value).__name__}; a checkpoint keeps only str, int, float, "
            "bool, None, tensors and dicts, lists and tuples of them"
        )


def without_none(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` without its ``None`` values, at any depth of nested tables."""
    return {
        key: without_none(value) if isinstance(value, dict) else value
        for key, value in tree.items()
        if value is not None
    }


def load_or_warn(source: Registration, strict: bool, why: str) -> type | ModuleType | None:
    """Load a plugin no run needs yet; a failure warns, or stops the run with ``strict``."""
    try:
        return source.load()
    except PluginError as error:
        if strict:
            raise
        warnings.warn(f"{error}; {why} (--strict-plugins makes this an error)", stacklevel=3)
        return None


def labelled(name: str, hook: str, call: Callable[[], T]) -> T:
    """Run ``call``, labelling any exception with the plugin and the hook (or method)."""
    try:
        return call()
    except Exception as error:
        error.add_note(f"raised by plugin {name!r} in hook {hook!r}")
        raise


class PluginManager:
    """The active plugins of one run, in ``--plugins`` order, and the calls into them."""

    def __init__(self, active: list[ActivePlugin]) -> None:
        self.active = active
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        for plugin in active:
            if plugin.obj.__hash__ is None:  # pluggy's per-plugin hook callers key by object
                raise PluginError(
                    f"plugin {plugin.name!r} from {plugin.origin} is an unhashable object (a "
                    "dataclass or an attrs class that compares by value); give its class "
                    "__hash__ = object.__hash__, or @attrs.define(eq=False)"
                )
            try:
                self.pm.register(plugin.obj, name=plugin.name)
            except pluggy.PluginValidationError as error:
                raise PluginError(f"plugin {plugin.name!r} from {plugin.origin}: {error}") from None
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as error:
            raise PluginError(f"{error} (no such hook; see docs/hooks.md)") from None
        self._order = {id(plugin.obj): position for position, plugin in enumerate(active)}
        self._names = {id(plugin.obj): plugin.name for plugin in active}
        self._check_options()
        self._check_exclusive()
        self._exclusive = set(self.exclusive_hooks())
        self._callers = {hook: self._one_by_one(hook) for hook in hook_names()}

    @classmethod
    def from_names(
        cls,
        names: list[str],
        plugin_configs: dict[str, dict[str, Any]] | None = None,
        *,
        strict: bool = False,
    ) -> PluginManager:
        """Load, configure and register ``names``.

        A named plugin that fails to load stops the run, naming its distribution. A
        ``[plugins.<name>]`` section must name a known plugin; the section of a known plugin
        that is not active is checked against its Config and otherwise unused. ``strict``
        also stops on a broken third-party entry point that the run does not name.
        """
        plugin_configs = plugin_configs or {}
        if len(set(names)) != len(names):
            duplicates = sorted({name for name in names if names.count(name) > 1})
            raise PluginError(f"plugin named twice in --plugins: {', '.join(duplicates)}")
        sources = discover()
        unknown = [name for name in names if name not in sources]
        if unknown:
            raise PluginError(
                unknown_plugin_message(unknown[0], list(sources), broken_names(sources))
            )
        for section, raw in plugin_configs.items():
            if section not in sources:
                raise PluginError(
                    f"config section [plugins.{section}]: "
                    + unknown_plugin_message(section, list(sources), broken_names(sources))
                )
            if section not in names:
                loaded = load_or_warn(sources[section], strict, "its section is not checked")
                if loaded is not None:
                    instantiate(section, sources[section].origin, loaded, raw)
                warnings.warn(
                    f"[plugins.{section}] is configured but {section!r} is not in run.plugins; "
                    "the section is unused",
                    stacklevel=2,
                )
        if strict:
            for name, source in sources.items():
                if source.origin != BUILTIN and name not in names:
                    source.load()
        active = []
        for name in names:
            source = sources[name]
            raw = plugin_configs.get(name, {})
            obj, config = instantiate(name, source.origin, source.load(), raw)
            active.append(ActivePlugin(name, source.origin, obj, config))
        return cls(active)

    def _check_options(self) -> None:
        for hook in hook_names():
            providers = [self._names[id(impl.plugin)] for impl in self._impls(hook)]
            twice = next((name for name in providers if providers.count(name) > 1), None)
            if twice is not None:
                raise PluginError(
                    f"plugin {twice!r} implements hook {hook!r} twice; keep one implementation"
                )
            for impl in self._impls(hook):
                refused = [option for option in REFUSED_OPTIONS if impl.opts.get(option)]
                if refused:
                    raise PluginError(
                        f"plugin {self._names[id(impl.plugin)]!r} marks hook {hook!r} "
                        f"{refused[0]}=True: {REFUSED_OPTIONS[refused[0]]}"
                    )

    def resolved_sections(self, sections: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The config's ``[plugins]`` tables with every key of every active plugin, defaults
        included, for ``config.toml`` (inactive plugins' tables stay as written).

        TOML has no null: a ``None`` value is left out, which reads back as that key's
        default (``None`` for every such key of the built-ins).
        """
        resolved = {
            plugin.name: without_none(unstructure(plugin.config))
            for plugin in self.active
            if attrs.has(type(plugin.config))
        }
        return {**sections, **resolved}

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Each stateful active plugin's ``state_dict()``, checked to be plain values."""
        states = {}
        for plugin in self.active:
            if callable(getattr(plugin.obj, "state_dict", None)):
                state = labelled(plugin.name, "state_dict", plugin.obj.state_dict)
                check_plain(state, f"plugin {plugin.name!r}: state_dict()")
                states[plugin.name] = state
        return states

    def load_state_dict(self, states: dict[str, dict[str, Any]]) -> None:
        """Hand each active plugin the state its ``state_dict()`` saved."""
        for plugin in self.active:
            if plugin.name in states:
                restore = functools.partial(plugin.obj.load_state_dict, states[plugin.name])
                labelled(plugin.name, "load_state_dict", restore)

    def _impls(self, hook: str) -> list[pluggy.HookImpl]:
        impls = getattr(self.pm.hook, hook).get_hookimpls()
        return sorted(impls, key=lambda impl: self._order[id(impl.plugin)])

    def _check_exclusive(self) -> None:
        for hook in self.exclusive_hooks():
            providers = [impl.plugin_name for impl in self._impls(hook)]
            if len(providers) > 1:
                raise PluginError(
                    f"plugins {' and '.join(repr(p) for p in providers)} both implement the "
                    f"exclusive hook {hook!r}; activate only one of them"
                )

    def exclusive_hooks(self) -> list[str]:
        return [
            name
            for name, caller in vars(self.pm.hook).items()
            if isinstance(caller, pluggy.HookCaller)
            and caller.spec is not None  # an optionalhook implementation of no known hook
            and caller.spec.opts.get("firstresult")
        ]

    def config(self, name: str) -> Any:
        """The config instance of the active plugin ``name``."""
        for plugin in self.active:
            if plugin.name == name:
                return plugin.config
        raise KeyError(f"plugin {name!r} is not active")

    def _one_by_one(self, hook: str) -> list[tuple[str, pluggy.HookCaller]]:
        """Per implementation of ``hook``, in ``--plugins`` order: its plugin's name and a
        pluggy caller that runs it alone."""
        impls = self._impls(hook)
        return [
            (
                self._names[id(impl.plugin)],
                self.pm.subset_hook_caller(hook, [o.plugin for o in impls if o is not impl]),
            )
            for impl in impls
        ]

    def call(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call a composable hook in ``--plugins`` order; returns (plugin name, result) pairs."""
        return [
            (name, self._guarded(name, hook, caller, kwargs))
            for name, caller in self._callers[hook]
        ]

    def chain(self, hook: str, value: Any, value_arg: str, **kwargs: Any) -> Any:
        """Thread ``value`` through a composable hook; ``None`` from a plugin keeps it."""
        for name, caller in self._callers[hook]:
            result = self._guarded(name, hook, caller, {value_arg: value, **kwargs})
            if result is not None:
                value = result
        return value

    def exclusive(self, hook: str, **kwargs: Any) -> Any:
        """Call an exclusive hook's single provider; ``None`` when no active plugin has it."""
        for name, caller in self._callers[hook]:
            return self._guarded(name, hook, caller, kwargs)
        return None

    def provider(self, hook: str) -> str | None:
        """The name of the active plugin implementing an exclusive hook, if any."""
        return next((name for name, _ in self._callers[hook]), None)

    def _guarded(
        self, name: str, hook: str, caller: pluggy.HookCaller, kwargs: dict[str, Any]
    ) -> Any:
        """Call one plugin's implementation through pluggy; its result, ``None`` for none
        (pluggy gives a composable hook's results as a list, here of one or none)."""
        result = labelled(name, hook, lambda: caller(**kwargs))
        return result if hook in self._exclusive else next(iter(result), None)


def describe_all() -> list[dict[str, str]]:
    """One row per discoverable plugin for ``--list-plugins``; broken ones say why."""
    rows = []
    for name, source in sorted(discover().items()):
        try:
            loaded = source.load()
        except PluginError as error:
            rows.append(
                {
                    "name": name,
                    "origin": source.origin,
                    "hooks": "-",
                    "summary": f"{BROKEN}{failure(error.__cause__)}",
                }
            )
            continue
        rows.append(
            {
                "name": name,
                "origin": source.origin,
                "hooks": ", ".join(implemented_hooks(loaded)) or "-",
                "summary": summary(loaded),
            }
        )
    return rows
