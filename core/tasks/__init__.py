"""Tasks: what is trained (data, model, losses, validation). Strategies are plugins."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import torch
from torch import nn

from core.errors import ConfigError

if TYPE_CHECKING:
    from core.config import Config
    from core.context import RunContext

Batch = dict[str, Any]


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


def metric_text(value: float | None, spec: str) -> str:
    """A metric for the console: ``n/a`` for a missing or non-finite value (metrics.jsonl
    holds null where a diverged run gave NaN or inf)."""
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


class Task(Protocol):
    """The contract between the trainer and a task such as ``dem_sr``."""

    name: str
    components: tuple[str, ...]
    """Names of the per-sample loss components, the columns of ``training_forward``'s result."""
    terrains: tuple[str, ...]
    """Names of the domains ``sample["terrain"]`` indexes (dem_sr: the five categories)."""
    report_metrics: tuple[ReportMetric, ...]
    """The experiment report's task columns; the first is the primary one the controls'
    verdict reads."""
    reference_name: str
    """What the ``reference`` keys of ``report_metrics`` measure (a row of the report)."""

    def build_datasets(self, config: Config, ctx: RunContext) -> tuple[Any, Any]:
        """Training and validation datasets; samples carry ``terrain`` and ``idx``."""

    def build_model(self, config: Config) -> nn.Module:
        """The model, on the CPU; the trainer places and wraps it."""

    def forward_losses(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-sample, per-component training losses ``[B, len(components)]``."""

    def validate(self, model: nn.Module, batches: Iterable[Batch], ctx: RunContext) -> dict:
        """Metrics over this process's validation batches, reduced over all processes."""

    def epoch_summary(self, row: dict[str, Any]) -> str:
        """The headline metrics of a ``metrics.jsonl`` row, for the console."""

    def checkpoint_meta(self) -> dict[str, Any]:
        """Extra entries the checkpoint carries for the task's own tools (``core.predict``)."""

    def export_model(self, run_dir: Path, model: nn.Module) -> None:
        """Write the trained model for use outside the run, after each checkpoint (main
        process only); a task whose checkpoint is its export does nothing."""

    def write_plots(
        self, run_dir: Path, rows: list[dict], model: nn.Module, ctx: RunContext
    ) -> None:
        """The run folder's PNGs, on the main process after each epoch."""


def get_task(name: str) -> Task:
    if name == "dem_sr":
        from core.tasks.dem_sr import DemSuperResolution

        return DemSuperResolution()
    if name == "sar2opt":
        from core.tasks.sar2opt import SarToOptical

        return SarToOptical()
    raise ConfigError(f"run.task: unknown task {name!r}; available: dem_sr, sar2opt")
