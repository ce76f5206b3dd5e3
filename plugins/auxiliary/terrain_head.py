"""``terrain_head``: an auxiliary head predicts each tile's terrain from RCAN-DEM's features.

The seed's v3.2 "multi-task terrain prediction head". A linear classifier reads the
globally average-pooled output of RCAN-DEM's body (``model.body`` in
``core/tasks/dem_sr/rcan.py``: the deep features before the long skip and the upsampling tail) and
its per-sample cross-entropy, times ``weight``, joins each sample's loss through the
``auxiliary_loss`` hook, so the shared features are pushed to carry terrain information.
The head runs inside the model's forward (a forward hook on ``model.body``) and is a
submodule of the model, so Accelerate prepares, synchronises and checkpoints it with the rest.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from core.context import require_terrain_labels
from core.errors import ConfigError
from core.hookspecs import Batch, hookimpl
from core.plugins import Plugin
from core.tasks.dem_sr.rcan import RCAN
from core.validators import positive

if TYPE_CHECKING:
    from core.context import RunContext

MODULE_NAME = "terrain_head"
"""Where ``configure_model`` attaches the classifier on the model."""


@attrs.frozen
class TerrainHeadConfig:
    """``[plugins.terrain_head]``."""

    weight: float = attrs.field(default=0.1, validator=positive)
    """Weight of the terrain cross-entropy in each sample's loss (the five DEM components
    keep their ``[loss]`` weights)."""


class TerrainHead(Plugin):
    """Auxiliary terrain classification on pooled body features, as an extra loss term.

    Reports ``train_terrain_head_accuracy`` (epoch mean over the training batches) and
    ``val_terrain_head_accuracy`` with ``val_terrain_head_accuracy_by_terrain`` (over all
    validation tiles of all processes) in ``metrics.jsonl``.
    """

    name = "terrain_head"
    Config = TerrainHeadConfig

    def __init__(self, config: TerrainHeadConfig) -> None:
        super().__init__(config)
        self.logits: torch.Tensor | None = None
        """``[B, terrains]`` from the latest forward, consumed by ``auxiliary_loss``."""
        self.labels: torch.Tensor | None = None
        """The routed batch's terrain labels, for validation accuracy."""
        self.val_counts: torch.Tensor | None = None
        """``[2, terrains]``: correct predictions and tiles per terrain in this validation."""

    @hookimpl
    def configure_model(self, model: nn.Module, ctx: RunContext) -> nn.Module | None:
        if not isinstance(model, RCAN):
            raise ConfigError(
                "plugin terrain_head reads RCAN-DEM's body features; the model of task "
                f"{ctx.config.run.task!r} is a {type(model).__name__}: use --task dem_sr"
            )
        channels = model.head.out_channels
        head = nn.Linear(channels, len(ctx.terrains))
        reference = model.head.weight
        model.add_module(MODULE_NAME, head.to(device=reference.device, dtype=reference.dtype))
        model.body.register_forward_hook(partial(self._classify, head))
        return model

    def _classify(
        self, head: nn.Linear, body: nn.Module, _inputs: Any, features: torch.Tensor
    ) -> None:
        """Forward hook on ``model.body``: terrain logits from the pooled features; in
        evaluation, count the correct ones per terrain."""
        self.logits = head(features.mean(dim=(2, 3))).float()
        if not body.training and self.val_counts is not None and self.labels is not None:
            correct = (self.logits.argmax(1) == self.labels).to(self.val_counts.dtype)
            self.val_counts[0].index_add_(0, self.labels, correct)
            self.val_counts[1].index_add_(0, self.labels, torch.ones_like(correct))

    @hookimpl
    def on_epoch_start(self, epoch: int, ctx: RunContext) -> None:
        self.val_counts = torch.zeros(2, len(ctx.terrains), device=ctx.device)

    @hookimpl
    def route_batch(self, model: nn.Module, batch: Batch, ctx: RunContext) -> None:
        require_terrain_labels(batch["terrain"], ctx.terrains, self.name)
        self.labels = batch["terrain"]
        self.logits = None

    @hookimpl
    def auxiliary_loss(self, model: nn.Module, batch: Batch, ctx: RunContext) -> torch.Tensor:
        logits, terrain = self.logits, batch["terrain"]
        if logits is None or len(logits) != len(terrain):
            raise RuntimeError(
                "plugin terrain_head: the training forward did not run RCAN-DEM's body on this "
                "batch, so there are no features to classify; a training_forward plugin must "
                "call the model on the batch"
            )
        self.logits = None
        ctx.log("train_terrain_head_accuracy", float((logits.argmax(1) == terrain).float().mean()))
        return self.config.weight * F.cross_entropy(logits, terrain, reduction="none")

    @hookimpl
    def validation_metrics(self, model: nn.Module, ctx: RunContext) -> dict[str, Any]:
        correct, tiles = ctx.accelerator.reduce(self.val_counts, "sum").tolist()
        by_terrain = {
            name: (right / total if total else None)
            for name, right, total in zip(ctx.terrains, correct, tiles, strict=True)
        }
        return {
            "val_terrain_head_accuracy": sum(correct) / sum(tiles) if sum(tiles) else None,
            "val_terrain_head_accuracy_by_terrain": by_terrain,
        }
