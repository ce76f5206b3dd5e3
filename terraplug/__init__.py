"""What a terraplug plugin imports: one place, independent of the framework's module layout.

::

    from terraplug import ConfigError, Plugin, RunContext, hookimpl

``terraplug.testing`` runs the real trainer on procedural tiles for a plugin's own tests.
The framework's modules (``core``, ``plugins``) may move between versions; these names stay.
"""

from core import __version__
from core.context import RunContext, StepInfo
from core.errors import ConfigError, DataError, PluginError, UsageError
from core.hookspecs import Batch, hookimpl
from core.plugins import ENTRY_POINT_GROUP, NoConfig, Plugin

__all__ = [
    "ENTRY_POINT_GROUP",
    "Batch",
    "ConfigError",
    "DataError",
    "NoConfig",
    "Plugin",
    "PluginError",
    "RunContext",
    "StepInfo",
    "UsageError",
    "__version__",
    "hookimpl",
]
