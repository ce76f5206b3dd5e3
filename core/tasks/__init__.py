"""Tasks: what is trained (data, model, losses, validation); strategies are plugins.

Each task is a vertical slice under ``core/tasks/<task>/`` (its data, model, losses, metrics,
plots, config sections and tools) that the framework reaches only through :class:`Task` and
:func:`get_task`. Built-in tasks are listed in :data:`BUILTIN_TASKS`; third-party ones come
from the ``terraplug.tasks`` entry-point group (name = what ``--task`` takes, value =
``module:TaskClass``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import torch
from torch import nn

from core.errors import ConfigError
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

if TYPE_CHECKING:
    from core.config import Config
    from core.context import RunContext

Batch = dict[str, Any]
"""A collated batch: tensors (``[B, ...]``) and lists, keyed by name (``terrain``, ``idx``
and the task's own keys)."""

TASK_GROUP = "terraplug.tasks"
VAL_TILES = "val_tiles"
"""The key under which ``Task.validate`` may return its per-tile errors: a list of one dict
per validation sample of every process (``tile``, ``terrain``, ``region`` and numbers), which
the trainer writes to the run folder's ``val_tiles.csv.gz`` instead of ``metrics.jsonl``."""
BUILTIN_TASKS: dict[str, str] = {
    "dem_sr": "core.tasks.dem_sr.task:DemSuperResolution",
    "sar2opt": "core.tasks.sar2opt.task:SarToOptical",
}


@attrs.frozen
class TileMetric:
    """How a metric follows from the per-tile errors (``VAL_TILES``): over a set of tiles it
    is ``sum(numerator) / sum(denominator)``, square-rooted when ``root`` (dem_sr's RMSE:
    squared error over pixels). The experiment resamples tiles with it (its bootstrap)."""

    numerator: str
    denominator: str
    root: bool = False
    reference: str | None = None
    """The per-tile column of the task's reference on that tile, in the metric's own units
    (dem_sr: ``bicubic_rmse_m``): it pools over tiles with the same denominators, which gives
    the report each region's gain over the reference."""

    def over(self, numerator: Any, denominator: Any) -> Any:
        """The metric from the sums (numbers or arrays of them)."""
        ratio = numerator / denominator
        return ratio**0.5 if self.root else ratio

    def numerator_of(self, value: Any, denominator: Any) -> Any:
        """The numerator a tile's ``value`` of the metric stands for (``over``'s inverse)."""
        return (value**2 if self.root else value) * denominator


@attrs.frozen
class ReportMetric:
    """A column of ``python -m core.experiment``'s tables, read from a run's last
    ``metrics.jsonl`` row."""

    key: str
    """The row's key, e.g. ``val_rmse_m``."""
    label: str
    """The column heading, with the unit."""
    higher_is_better: bool = False
    by_domain: bool = False
    """The row also has ``<key>_by_terrain`` ({domain: value}): a table per domain follows."""
    reference: str | None = None
    """The key of the same measure for the task's reference (dem_sr: bicubic interpolation)."""
    tiles: TileMetric | None = None
    """How the metric follows from the per-tile errors the task's ``validate`` returns, if
    it does: then the report gives an interval over seeds and tiles too."""


@attrs.frozen
class HarnessSettings:
    """How ``terraplug.testing`` trains a task in seconds, for the tests of plugins and of
    the task itself (``Task.harness``)."""

    overrides: tuple[str, ...] = ()
    """``--set`` assignments after the harness's own ``FAST_ANY_TASK``: the task's smallest
    model (dem_sr: a one-block RCAN)."""
    data: Callable[[Path], object] | None = None
    """Writes a small data set into the existing, empty folder it is given, which becomes
    ``data.dir``; None: the task's own default data (an empty ``data.dir``)."""


def metric_text(value: float | None, spec: str) -> str:
    """A metric for the console: ``n/a`` for a missing or non-finite value (metrics.jsonl
    holds null where a diverged run gave NaN or inf)."""
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


class Task(Protocol):
    """The contract between the framework and a task such as ``dem_sr``: everything a task
    provides. The trainer and ``core.inference`` are the only callers of plugin hooks; a
    task never calls one.

    One instance serves one run. The trainer calls ``build_datasets``, then ``build_model``;
    then per step ``forward_losses`` (unless a plugin provides ``training_forward``), and per
    epoch ``validate``, ``checkpoint_meta`` and ``export_model`` when it checkpoints,
    ``plot_examples`` and ``write_plots`` when it draws. Each method gets what it reads as
    arguments the trainer has (``checkpoint_meta`` and ``plot_examples`` the datasets
    ``build_datasets`` returned), so a task need not keep them; what a task keeps between
    its own calls (sar2opt: the frozen weights' fingerprint, cached tokens) is its own.
    The members are checked when the task is looked up, before anything is built: a method
    missing or taking other arguments, or an attribute the class does not declare, is exit 2
    naming each.
    """

    name: str
    """The task's name in the console and in plugins' errors; the entry-point name ``--task``
    takes, which it should equal."""
    sections: Mapping[str, type]
    """The attrs classes of the task's config sections by name: ``model`` and ``loss``
    (required; an empty class for a task without keys) and any of its own, each a
    ``[name]`` table of config.toml read into ``config.task_sections[name]``, checked key by
    key like the framework's sections."""
    components: tuple[str, ...]
    """Names of the per-sample loss components, the columns of ``training_forward``'s result;
    each is weighted by the ``[loss]`` key of its name (1.0 where there is none)."""
    terrains: tuple[str, ...]
    """Names of the domains ``sample["terrain"]`` indexes (dem_sr: the five categories)."""
    report_metrics: tuple[ReportMetric, ...]
    """The experiment report's task columns; the first is the primary one the controls'
    verdict reads (none: the final ``val_loss``)."""
    reference_name: str
    """What the ``reference`` keys of ``report_metrics`` measure: a row of the report, a name
    no experiment arm may take, not counted among the finished runs ("": no such row)."""
    skipped: list[tuple[str, str]]
    """(file, reason) of every input file the datasets left out; ``summary.json`` lists them
    when the run completes. The one per-instance member: ``__init__`` sets it (an empty
    list), ``build_datasets`` fills it."""
    harness: HarnessSettings = HarnessSettings()
    """Optional, as is every member with a value here: what ``terraplug.testing`` applies to
    train the task in seconds. Without it the harness changes only the batch size and the
    progress bar, and trains on the task's default data."""

    def build_datasets(self, config: Config, ctx: RunContext) -> tuple[Any, Any]:
        """Training and validation datasets; samples carry ``terrain`` and ``idx``, and the
        datasets a ``terrains`` array (one label per sample) for samplers."""

    def build_model(self, config: Config) -> nn.Module:
        """The model, on the CPU; the trainer places and wraps it. Needs no data, so a
        trained model is rebuilt without its training set."""

    def forward_losses(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-sample, per-component training losses ``[B, len(components)]``."""

    def validate(self, model: nn.Module, batches: Iterable[Batch], ctx: RunContext) -> dict:
        """Metrics over this process's validation batches (already routed through the
        plugins' ``route_batch``), reduced over all processes; optionally the per-tile
        errors of every process under ``VAL_TILES``."""

    def epoch_summary(self, row: dict[str, Any]) -> str:
        """The headline metrics of a ``metrics.jsonl`` row, for the console."""

    def checkpoint_meta(self, train: Any, val: Any) -> dict[str, Any]:
        """Extra entries the checkpoint carries for the task's own tools (``core.predict``);
        ``train`` and ``val`` are the datasets ``build_datasets`` returned."""

    def export_model(self, model: nn.Module, ctx: RunContext) -> None:
        """Write the trained model for use outside the run, after each checkpoint (main
        process only); a task whose checkpoint is its export does nothing."""

    def plot_examples(self, val: Any) -> list[int]:
        """Indices of the samples of ``val`` (the validation dataset) ``write_plots`` draws."""

    def write_plots(
        self,
        run_dir: Path,
        rows: list[dict],
        model: nn.Module,
        examples: Iterable[Batch],
        ctx: RunContext,
    ) -> None:
        """The task's PNGs in the run folder, on the main process; ``examples`` are the
        ``plot_examples`` as one-sample batches on the device, routed like validation's.
        The trainer draws ``loss_curves.png`` itself."""

    def predict(self, run_dir: Path, src: Path, dst: Path, options: PredictOptions) -> None:
        """``python -m core.predict``: write ``dst`` from ``src`` with the run's model. The
        command has checked ``dst`` already; a task without the tool raises UsageError."""


@attrs.frozen
class PredictOptions:
    """``python -m core.predict``'s options, for the task's ``predict``."""

    window: int | None = None
    """Input window size; None: the training tiles'."""
    overlap: int | None = None
    """Input pixels of overlap on each side; None: a quarter of the window."""
    domain: str | None = None
    """The domain (dem_sr: terrain) for domain-aware models; None: the task guesses."""
    strict_data: bool = False
    cpu: bool = False
    progress: bool = True
    """A progress bar (core.predict: when stderr is a terminal)."""
    progress_lines: bool = False
    """A progress line now and then on stdout instead (core.predict: when it shows no bar)."""
    batch_size: int | None = None
    """Windows per forward pass; None: the task's default."""
    diffusion_steps: int | None = None
    """sar2opt: diffusion steps instead of the run's; None: the run's."""
    top_p: float | None = None
    """sar2opt: token sampling's top-p instead of the run's."""
    temperature: float | None = None
    """sar2opt: token sampling's temperature instead of the run's."""


PER_INSTANCE = ("skipped",)
"""Members of :class:`Task` that each instance sets for itself, unseen on the class."""


def method_problem(cls: type, name: str) -> str | None:
    """``name`` when ``cls`` lacks the method (or holds something not callable), ``name(args)``
    when its method does not take the arguments the trainer passes, else None."""
    method = getattr(cls, name, None)
    if not callable(method):
        return name
    arguments = list(inspect.signature(getattr(Task, name)).parameters)[1:]
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError):  # no signature to read (a builtin): taken as it is
        return None
    receiver = (cls,) if inspect.isfunction(inspect.getattr_static(cls, name)) else ()
    try:
        signature.bind(*receiver, *arguments)
    except TypeError:
        return f"{name}({', '.join(arguments)})"
    return None


def attribute_problem(cls: type, name: str) -> str:
    """How ``cls`` lacks the attribute ``name``. The framework reads attributes on the class
    (the config its ``sections``, the listings its ``terrains``), before any instance
    exists, so one that only ``__init__`` sets is named as such."""
    try:
        set_by_init = hasattr(cls(), name)
    except Exception:  # an __init__ that fails says nothing about the attribute
        set_by_init = False
    return f"{name} (set by __init__ only; declare it on the class)" if set_by_init else name


def missing_members(cls: type) -> list[str]:
    """The members of :class:`Task` that ``cls`` lacks: methods it does not define (or holds
    as something not callable), and attributes it does not declare (those :class:`Task`
    gives a value are optional)."""
    methods = [
        name
        for name, value in vars(Task).items()
        if inspect.isfunction(value) and not name.startswith("_")
    ]
    attributes = [
        name for name in Task.__annotations__ if name not in PER_INSTANCE and name not in vars(Task)
    ]
    return [
        *(problem for name in methods if (problem := method_problem(cls, name))),
        *(attribute_problem(cls, name) for name in attributes if not hasattr(cls, name)),
    ]


def task_registrations() -> dict[str, Registration]:
    """Every task ``--task`` can name: the built-ins, then installed distributions' tasks."""
    return registrations("task", BUILTIN_TASKS, TASK_GROUP, ConfigError)


def task_class(name: str) -> type[Task]:
    """The class registered as ``name``; an unknown name, or a class that does not implement
    :class:`Task`, is a ConfigError naming it, before anything is built or written."""
    known = task_registrations()
    if name not in known:
        raise ConfigError(f"run.task: {unknown_message('task', name, known, broken_names(known))}")
    return checked_class(known[name])


def checked_class(registration: Registration) -> type[Task]:
    """The task class ``registration`` names, loaded and checked against :class:`Task`; a
    ConfigError naming the task and its distribution when it does not load or conform."""
    cls = registration.load()
    where = f"task {registration.name!r} from {registration.origin} ({registration.target})"
    if not isinstance(cls, type):
        raise ConfigError(f"{where} is a {type(cls).__name__}, not a task class")
    missing = missing_members(cls)
    if missing:
        raise ConfigError(
            f"{where}: {cls.__module__}.{cls.__qualname__} does not implement the Task "
            f"protocol; it lacks {', '.join(missing)} (see docs/architecture.md, Adding a task)"
        )
    return cls


def check_installed_tasks() -> None:
    """``--strict-plugins``: every third-party task must load and implement :class:`Task`,
    the ones a run does not name too; the first that does not is the ConfigError above."""
    for registration in task_registrations().values():
        if registration.origin != BUILTIN:
            checked_class(registration)


def describe_tasks() -> list[dict[str, str]]:
    """One row per task for ``--list-tasks``: name, origin, domains and the first line of
    its docstring; a task that does not load or conform says why."""
    rows = []
    for name, registration in sorted(task_registrations().items()):
        row = {"name": name, "origin": registration.origin, "domains": "-"}
        try:
            cls = checked_class(registration)
        except ConfigError as error:
            reason = failure(error.__cause__) if error.__cause__ else str(error)
            rows.append({**row, "summary": BROKEN + reason})
            continue
        rows.append({**row, "domains": ", ".join(cls.terrains), "summary": summary(cls)})
    return rows


def harness_settings(cls: type[Task]) -> HarnessSettings:
    """The task's ``harness``, or the default for a task that declares none."""
    return getattr(cls, "harness", Task.harness)


def get_task(name: str) -> Task:
    """A fresh instance of the task ``name`` (one per run: tasks keep the run's datasets)."""
    return task_class(name)()
