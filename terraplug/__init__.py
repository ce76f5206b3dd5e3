"""What a terraplug plugin or task imports: one place, independent of the framework's layout.

::

    from terraplug import ConfigError, Plugin, RunContext, hookimpl   # a plugin
    from terraplug import Batch, ReportMetric, Task, PredictOptions   # a task
    from terraplug import TrainedRun, write_geotiff                   # a task's predict

``terraplug.testing`` runs the real trainer on any task's small data for a plugin's or a
task's own tests; ``terraplug.data`` reads GeoTIFFs the way the built-in tasks do. The
framework's modules (``core``, ``plugins``) may move between versions; these names stay.

Importing ``terraplug`` first checks that ``core`` and ``plugins`` are terraplug's own: a
folder of either name that comes first on ``sys.path`` is a ``ShadowedPackageError`` (an
ImportError) naming both folders.
"""

# ruff: noqa: E402  (the check runs before the first import from core)
from terraplug._packages import check_packages

check_packages()

from core import __version__
from core.config import Config
from core.context import RunContext, StepInfo
from core.data.geotiff import geotiff_profile, write_geotiff
from core.errors import ConfigError, DataError, PluginError, UsageError
from core.hookspecs import hookimpl
from core.inference import TrainedRun, read_run_config
from core.plugins import ENTRY_POINT_GROUP, NoConfig, Plugin
from core.safe_io import atomic_write, check_output, load_checkpoint, replaced_when_done
from core.tasks import (
    TASK_GROUP,
    VAL_TILES,
    Batch,
    HarnessSettings,
    PredictOptions,
    ReportMetric,
    Task,
    TileMetric,
    metric_text,
)
from core.validators import fraction, non_negative, open_fraction, positive, positive_int

__all__ = [
    "ENTRY_POINT_GROUP",
    "TASK_GROUP",
    "VAL_TILES",
    "Batch",
    "Config",
    "ConfigError",
    "DataError",
    "HarnessSettings",
    "NoConfig",
    "Plugin",
    "PluginError",
    "PredictOptions",
    "ReportMetric",
    "RunContext",
    "StepInfo",
    "Task",
    "TileMetric",
    "TrainedRun",
    "UsageError",
    "__version__",
    "atomic_write",
    "check_output",
    "fraction",
    "geotiff_profile",
    "hookimpl",
    "load_checkpoint",
    "metric_text",
    "non_negative",
    "open_fraction",
    "positive",
    "positive_int",
    "read_run_config",
    "replaced_when_done",
    "write_geotiff",
]
