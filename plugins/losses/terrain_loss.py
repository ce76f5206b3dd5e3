"""``terrain_loss``: the seed's per-terrain loss-weight profiles (Solution C), per sample.

The seed's ``TerrainAwareLoss.forward`` takes one terrain per batch, so a mixed batch is
weighted entirely with one terrain's profile. Here every sample gets its own terrain's
profile through the ``loss_weights`` chain, so mixed batches (the default shuffle,
``stratified``) are weighted correctly.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import attrs
import torch

from core import validators as check
from core.errors import ConfigError
from core.hookspecs import Batch, hookimpl
from core.plugins import Plugin
from core.tasks.dem_sr.losses import COMPONENTS
from core.tasks.dem_sr.terrain import TERRAINS

if TYPE_CHECKING:
    from core.context import RunContext

SEED_PROFILES: dict[str, dict[str, float]] = {
    "flat": {"elevation": 1.0, "gradient": 0.3, "curvature": 0.1, "edge": 0.1, "spectral": 0.1},
    "moderate": {"elevation": 1.0, "gradient": 0.5, "curvature": 0.2, "edge": 0.2, "spectral": 0.1},
    "alpine": {"elevation": 1.0, "gradient": 0.6, "curvature": 0.3, "edge": 0.2, "spectral": 0.15},
    "desert": {"elevation": 1.0, "gradient": 0.5, "curvature": 0.2, "edge": 0.4, "spectral": 0.15},
    "extreme": {"elevation": 1.0, "gradient": 0.7, "curvature": 0.3, "edge": 0.5, "spectral": 0.2},
}
"""The seed's absolute weight profiles (Solution C), by terrain and component."""

LOG_KEY = "terrain_loss_fallback_samples"
"""``ctx.log`` key: samples per micro-batch weighted with the fallback profile."""

_non_negative = check.optional_non_negative


@attrs.frozen
class ProfileWeights:
    """One terrain's weights; a component left out keeps the seed's value for that terrain."""

    elevation: float | None = attrs.field(default=None, validator=_non_negative)
    gradient: float | None = attrs.field(default=None, validator=_non_negative)
    curvature: float | None = attrs.field(default=None, validator=_non_negative)
    edge: float | None = attrs.field(default=None, validator=_non_negative)
    spectral: float | None = attrs.field(default=None, validator=_non_negative)


@attrs.frozen
class Profiles:
    """``[plugins.terrain_loss.profiles.<terrain>]`` tables; an absent table is ``None``."""

    flat: ProfileWeights | None = None
    moderate: ProfileWeights | None = None
    alpine: ProfileWeights | None = None
    desert: ProfileWeights | None = None
    extreme: ProfileWeights | None = None


@attrs.frozen
class TerrainLossConfig:
    """``[plugins.terrain_loss]``."""

    mode: str = attrs.field(default="replace", validator=attrs.validators.in_(("replace", "scale")))
    """``replace``: a sample's weights become its profile (the seed's absolute weights).
    ``scale``: the incoming weights are multiplied by ``profile / profile[fallback]``."""
    fallback: str = attrs.field(default="moderate", validator=attrs.validators.in_(TERRAINS))
    """Profile for samples whose terrain has none; in ``scale`` mode also the reference."""
    seed_profiles: bool = True
    """Terrains not listed under ``profiles`` keep the seed's profile; ``false``: they have
    none and fall back (the ``fallback`` terrain always has one)."""
    profiles: Profiles = attrs.Factory(Profiles)


def resolve_profiles(config: TerrainLossConfig) -> dict[str, list[float]]:
    """Each terrain that has a profile -> its weights in ``COMPONENTS`` order."""
    table = {}
    for terrain in TERRAINS:
        listed = getattr(config.profiles, terrain)
        if listed is None and not (config.seed_profiles or terrain == config.fallback):
            continue
        seed = SEED_PROFILES[terrain]
        table[terrain] = [
            seed[c] if listed is None or getattr(listed, c) is None else getattr(listed, c)
            for c in COMPONENTS
        ]
    return table


class TerrainLoss(Plugin):
    """Per-sample loss-component weights from each sample's terrain profile (seed Solution C).

    Every sample's five loss components (elevation, gradient, curvature, edge, spectral) are
    weighted with its own terrain's profile, so mixed batches are weighted correctly. The
    defaults are the seed's absolute profiles; ``mode = "replace"`` (default) uses them as
    the weights, ``mode = "scale"`` multiplies the incoming weights by each profile relative
    to the ``fallback`` profile. A sample whose terrain has no profile is weighted with the
    ``fallback`` profile, counted in ``terrain_loss_fallback_samples`` and warned about once.
    """

    name = "terrain_loss"
    Config = TerrainLossConfig

    def __init__(self, config: TerrainLossConfig) -> None:
        super().__init__(config)
        profiles = resolve_profiles(config)
        reference = torch.tensor(profiles[config.fallback])
        if config.mode == "scale":
            zero = [c for c, w in zip(COMPONENTS, reference.tolist(), strict=True) if w <= 0]
            if zero:
                raise ConfigError(
                    f"plugins.terrain_loss.profiles.{config.fallback}.{zero[0]} must be > 0 "
                    f'with mode = "scale": the {config.fallback!r} profile is the reference '
                    "every other profile is divided by"
                )
        # One row per terrain (its fallback where it has no profile), then the fallback row
        # for labels outside TERRAINS.
        rows = [torch.tensor(profiles.get(t, profiles[config.fallback])) for t in TERRAINS]
        table = torch.stack([*rows, reference])
        self.table = table / reference if config.mode == "scale" else table
        self.has_profile = torch.tensor([t in profiles for t in TERRAINS] + [False])
        self.warned = False

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        if tuple(ctx.task.components) != COMPONENTS:
            raise ConfigError(
                f"plugin terrain_loss weights the components {', '.join(COMPONENTS)}; task "
                f"{ctx.task.name!r} has {', '.join(ctx.task.components)}"
            )
        if self.config.mode == "replace":
            earlier = []
            for plugin in ctx.plugins.active:
                if plugin.name == self.name:
                    break
                if "loss_weights" in plugin.hooks:
                    earlier.append(plugin.name)
            if earlier:
                warnings.warn(
                    f'terrain_loss (mode = "replace") discards the loss weights set by '
                    f"{', '.join(earlier)}; list terrain_loss before them in --plugins or "
                    'use mode = "scale"',
                    stacklevel=2,
                )

    @hookimpl
    def loss_weights(
        self, weights: torch.Tensor, batch: Batch, ctx: RunContext
    ) -> torch.Tensor | None:
        if self.table.device != weights.device:
            self.table = self.table.to(weights.device)
            self.has_profile = self.has_profile.to(weights.device)
        terrain = batch["terrain"].to(weights.device)
        in_range = (terrain >= 0) & (terrain < len(TERRAINS))
        rows = torch.where(in_range, terrain, len(TERRAINS))
        profile = self.table[rows].to(weights.dtype)
        known = self.has_profile[rows]
        unknown = int((~known).sum())
        ctx.log(LOG_KEY, unknown)
        if unknown and not self.warned:
            self.warned = True
            labels = sorted(set(terrain[~known].tolist()))
            names = [TERRAINS[i] if 0 <= i < len(TERRAINS) else f"label {i}" for i in labels]
            warnings.warn(
                f"terrain_loss: no profile for {', '.join(names)}; those samples use the "
                f"{self.config.fallback!r} profile (counted in {LOG_KEY}; warned once)",
                stacklevel=2,
            )
        return profile if self.config.mode == "replace" else weights * profile
