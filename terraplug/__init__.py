"""What a terraplug plugin or task imports: one place, independent of the framework's layout.

::

    from terraplug import ConfigError, Plugin, RunContext, hookimpl   # a plugin
    from terraplug import Batch, ReportMetric, Task, PredictOptions   # a task

``terraplug.testing`` runs the real trainer on procedural tiles for a plugin's own tests;
``terraplug.data`` reads GeoTIFFs the way the built-in tasks do. The framework's modules
(``core``, ``plugins``) may move between versions; these names stay.
"""

from core import __version__
from core.config import Config
from core.context import RunContext, StepInfo
from core.errors import ConfigError, DataError, PluginError, UsageError
from core.hookspecs import hookimpl
from core.plugins import ENTRY_POINT_GROUP, NoConfig, Plugin
from core.tasks import TASK_GROUP, Batch, PredictOptions, ReportMetric, Task, metric_text

__all__ = [
    "ENTRY_POINT_GROUP",
    "TASK_GROUP",
    "Batch",
    "Config",
    "ConfigError",
    "DataError",
    "NoConfig",
    "Plugin",
    "PluginError",
    "PredictOptions",
    "ReportMetric",
    "RunContext",
    "StepInfo",
    "Task",
    "UsageError",
    "__version__",
    "hookimpl",
    "metric_text",
]
