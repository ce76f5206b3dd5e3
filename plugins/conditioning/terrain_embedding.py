"""``terrain_embedding``: a learned embedding per terrain modulates RCAN-DEM's features (FiLM).

The seed's v3.2 "terrain embedding layer", as feature-wise linear modulation (Perez et al.,
2018, "FiLM: Visual Reasoning with a General Conditioning Layer"): each of the task's domains
(``ctx.terrains``) has a learned vector; at every modulation point a linear map turns it into
a per-channel scale and shift, ``x * (1 + gamma[t]) + beta[t]``, applied to each sample with
its own terrain's pair, so mixed batches are conditioned per sample. No BatchNorm is added:
RCAN, like EDSR, has none, and this conditions the network without batch statistics.

The points are the outputs of RCAN-DEM's residual groups (``ResidualGroup`` in
``core/tasks/dem_sr/rcan.py``), one per group, reached by forward hooks, so the model's own
parameter names are unchanged and the new parameters live under ``terrain_embedding.``.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import nn

from core.context import require_terrain_labels
from core.errors import ConfigError
from core.hookspecs import Batch, hookimpl
from core.plugins import Plugin
from core.tasks.dem_sr.rcan import ResidualGroup
from core.validators import positive_int

if TYPE_CHECKING:
    from core.context import RunContext

MODULE_NAME = "terrain_embedding"
"""Where ``configure_model`` attaches the :class:`TerrainFiLM` module on the model."""


class TerrainFiLM(nn.Module):
    """Per-terrain embeddings and, per modulation point, the map to a (scale, shift) pair.

    ``route(terrain)`` sets each sample's terrain for the following forwards. The maps start
    at zero, so an untrained module is the identity whatever the terrain. ``trained`` counts,
    per terrain, the training forwards whose optimizer step held that terrain; in evaluation
    a terrain that never trained (its embedding is still the random initial one) is
    modulated with the mean embedding of the trained terrains instead.
    """

    def __init__(self, num_terrains: int, channels: int, points: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_terrains, dim)
        self.film = nn.ModuleList(nn.Linear(dim, 2 * channels) for _ in range(points))
        for layer in self.film:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.register_buffer("trained", torch.zeros(num_terrains, dtype=torch.long))
        self.terrain: torch.Tensor | None = None

    def route(self, terrain: torch.Tensor) -> None:
        """Set the terrain index (``[B]`` int64) of each sample of the following forwards."""
        self.terrain = terrain

    @torch.no_grad()
    def mark_trained(self, present: torch.Tensor) -> None:
        """Count a training forward for each terrain in ``present`` (``[terrains]`` bool)."""
        self.trained += present.long()

    def sample_embeddings(self, batch_size: int) -> torch.Tensor:
        """``[B, dim]``: each sample's terrain embedding (the fallback for untrained ones)."""
        terrain = self.terrain
        if terrain is None or terrain.shape != (batch_size,):
            shape = None if terrain is None else tuple(terrain.shape)
            raise RuntimeError(
                f"terrain_embedding: the model was called on a batch of {batch_size} with "
                f"terrain labels {shape}; the plugin's route_batch hook sets them before "
                "every forward (or call module.route(batch['terrain']))"
            )
        table = self.embedding.weight
        if not self.training:
            seen = self.trained > 0
            if bool(seen.any()):
                fallback = table[seen].mean(0)
                table = torch.where(seen[:, None], table, fallback)
        return table[terrain]

    def modulate(self, point: int, features: torch.Tensor) -> torch.Tensor:
        """``features * (1 + gamma) + beta`` with each sample's own terrain's pair."""
        film = self.film[point](self.sample_embeddings(len(features)))
        gamma, beta = film.to(features.dtype)[..., None, None].chunk(2, dim=1)
        return torch.addcmul(beta, features, 1 + gamma)


def _modulate_output(
    film: TerrainFiLM, point: int, _module: nn.Module, _inputs: Any, output: torch.Tensor
) -> torch.Tensor:
    """Forward hook of modulation point ``point``: its output replaces the group's."""
    return film.modulate(point, output)


@attrs.frozen
class TerrainEmbeddingConfig:
    """``[plugins.terrain_embedding]``."""

    dim: int = attrs.field(default=16, validator=positive_int)
    """Length of each terrain's embedding vector."""


class TerrainEmbedding(Plugin):
    """A learned embedding per terrain; FiLM after every RCAN-DEM residual group.

    ``configure_model`` attaches a :class:`TerrainFiLM` as ``model.terrain_embedding`` and
    hooks the output of every ``ResidualGroup``; ``route_batch`` tells it each sample's
    terrain (training, validation, ``core.predict``) and, in training, which terrains the
    optimizer step holds (``ctx.step.terrain_counts``, the same on every process).
    """

    name = "terrain_embedding"
    Config = TerrainEmbeddingConfig

    @hookimpl
    def configure_model(self, model: nn.Module, ctx: RunContext) -> nn.Module | None:
        groups = [m for m in model.modules() if isinstance(m, ResidualGroup)]
        if not groups:
            raise ConfigError(
                "plugin terrain_embedding modulates RCAN-DEM's residual groups and found none "
                f"in the model of task {ctx.config.run.task!r}; use it with --task dem_sr"
            )
        channels = groups[0].body[-1].out_channels
        film = TerrainFiLM(len(ctx.terrains), channels, len(groups), self.config.dim)
        reference = next(model.parameters())
        model.add_module(MODULE_NAME, film.to(device=reference.device, dtype=reference.dtype))
        for point, group in enumerate(groups):
            group.register_forward_hook(partial(_modulate_output, film, point))
        return model

    @hookimpl
    def route_batch(self, model: nn.Module, batch: Batch, ctx: RunContext) -> None:
        terrain = batch["terrain"]
        require_terrain_labels(terrain, ctx.terrains, self.name)
        film = next(m for m in model.modules() if isinstance(m, TerrainFiLM))
        film.route(terrain)
        if model.training and ctx.step is not None:
            film.mark_trained(ctx.step.terrain_counts > 0)
