"""What every hook receives as ``ctx``: the run's state, shared by the trainer and plugins."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch import nn

    from core.config import Config
    from core.plugins import PluginManager
    from core.tasks import Task


@attrs.define(eq=False)
class StepInfo:
    """The optimizer step being computed, seen from any of its micro-batches.

    Counts cover every micro-batch of the step on every process, so a plugin can weight a
    sample by its terrain's share of the whole step (``balanced_grad``) without
    communicating itself.
    """

    terrain_counts: torch.Tensor
    """``[len(ctx.terrains)]`` float tensor: samples of each terrain in the step, all
    processes."""
    micro_batch: int
    num_micro_batches: int
    progress: float = 0.0
    """Fraction of the run's steps done before this one, in [0, 1): for per-step schedules."""

    @property
    def num_samples(self) -> int:
        return int(self.terrain_counts.sum().item())


@attrs.define(eq=False)
class RunContext:
    """The run as plugins see it. Fields marked 'set by the trainer' change as it proceeds."""

    config: Config
    accelerator: Accelerator
    task: Task
    plugins: PluginManager
    run_dir: Path
    """The run folder, the same on every process; with ``core.predict``, the trained run's."""
    total_epochs: int
    model: nn.Module | None = None
    """The trained model as Accelerate prepared it (possibly a DDP wrapper); set by the trainer."""
    train_dataset: Any = None
    epoch: int = 0
    """Current 1-based epoch; set by the trainer."""
    global_step: int = 0
    """Optimizer steps the optimizer took in the run, skipped ones not counted; set by the
    trainer right after each ``optimizer.step()``, and from the checkpoint on a resume."""
    step: StepInfo | None = None
    """The step being computed; set by the trainer before each micro-batch."""
    terrains: tuple[str, ...] = attrs.field(
        default=attrs.Factory(lambda self: tuple(self.task.terrains), takes_self=True)
    )
    """Names of the task's domains, indexed by ``sample["terrain"]`` (dem_sr: the five
    terrain categories)."""
    _logged: dict[str, list[float]] = attrs.field(factory=lambda: defaultdict(list))

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def plugin_config(self, name: str) -> Any:
        """The config instance of the active plugin ``name``."""
        return self.plugins.config(name)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward through Accelerate (mixed-precision scaling, DDP gradient sync)."""
        self.accelerator.backward(loss)

    def log(self, key: str, value: float) -> None:
        """Record a scalar; its mean over the epoch on this process enters this process's
        row, and ``metrics.jsonl`` is the main process's row: reduce a value over the
        processes before logging it where it should cover them all.

        Values logged from ``on_epoch_start`` to ``validation_metrics`` count towards that
        epoch; the checkpoint keeps those of an interrupted epoch. A key the epoch row
        already has (``train_loss``, a validation metric) is an error.
        """
        self._logged[key].append(float(value))

    def pop_logged(self) -> dict[str, float]:
        """Epoch means of everything logged since the last call, then forget them (the
        trainer's, for the epoch's row)."""
        means = {key: sum(values) / len(values) for key, values in self._logged.items() if values}
        self._logged.clear()
        return means

    def logged_values(self) -> dict[str, list[float]]:
        """The values logged so far this epoch, for the checkpoint."""
        return {key: list(values) for key, values in self._logged.items()}

    def restore_logged(self, values: dict[str, list[float]]) -> None:
        """Continue an epoch from the values :meth:`logged_values` returned."""
        self._logged.clear()
        self._logged.update({key: list(items) for key, items in values.items()})


def require_terrain_labels(terrain: torch.Tensor, domains: Sequence[str], plugin: str) -> None:
    """Refuse a ``[B]`` tensor of domain labels outside ``0..len(domains) - 1``, naming
    ``plugin``; a plugin that indexes per-domain tables with the labels calls it first."""
    if bool(((terrain < 0) | (terrain >= len(domains))).any()):
        raise ValueError(
            f"plugin {plugin}: terrain labels {sorted(set(terrain.tolist()))} outside "
            f"0..{len(domains) - 1} ({', '.join(domains)})"
        )
