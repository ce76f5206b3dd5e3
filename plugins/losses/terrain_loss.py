"""``terrain_loss``: the seed's per-terrain loss-weight profiles (Solution C), per sample.

The seed's ``TerrainAwareLoss.forward`` takes one terrain per batch, so a mixed batch is
weighted entirely with one terrain's profile. Here every sample gets its own terrain's
profile through the ``loss_weights`` chain, so mixed batches (the default shuffle,
``stratified``) are weighted correctly.

The profiles belong to the task's domains (``ctx.terrains``): the seed's five terrains for
dem_sr, any others a task names. ``setup`` builds the table and refuses a profile or
``fallback`` naming a domain the task does not have.
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

if TYPE_CHECKING:
    from core.context import RunContext

SEED_PROFILES: dict[str, dict[str, float]] = {
    "flat": {"elevation": 1.0, "gradient": 0.3, "curvature": 0.1, "edge": 0.1, "spectral": 0.1},
    "moderate": {"elevation": 1.0, "gradient": 0.5, "curvature": 0.2, "edge": 0.2, "spectral": 0.1},
    "alpine": {"elevation": 1.0, "gradient": 0.6, "curvature": 0.3, "edge": 0.2, "spectral": 0.15},
    "desert": {"elevation": 1.0, "gradient": 0.5, "curvature": 0.2, "edge": 0.4, "spectral": 0.15},
    "extreme": {"elevation": 1.0, "gradient": 0.7, "curvature": 0.3, "edge": 0.5, "spectral": 0.2},
}
"""The seed's absolute weight profiles (Solution C), by terrain and component: the profile
of a task's domain of the same name."""

LOG_KEY = "terrain_loss_fallback_samples"
"""``ctx.log`` key: samples per micro-batch weighted with the fallback profile."""

_non_negative = check.optional_non_negative


@attrs.frozen
class ProfileWeights:
    """One domain's weights; a component left out keeps the seed's value for that terrain
    (a domain the seed has no profile for lists every component)."""

    elevation: float | None = attrs.field(default=None, validator=_non_negative)
    gradient: float | None = attrs.field(default=None, validator=_non_negative)
    curvature: float | None = attrs.field(default=None, validator=_non_negative)
    edge: float | None = attrs.field(default=None, validator=_non_negative)
    spectral: float | None = attrs.field(default=None, validator=_non_negative)


@attrs.frozen
class TerrainLossConfig:
    """``[plugins.terrain_loss]``."""

    mode: str = attrs.field(default="replace", validator=attrs.validators.in_(("replace", "scale")))
    """``replace``: a sample's weights become its profile (the seed's absolute weights).
    ``scale``: the incoming weights are multiplied by ``profile / profile[fallback]``."""
    fallback: str = "moderate"
    """The domain whose profile samples without one get; in ``scale`` mode also the
    reference."""
    seed_profiles: bool = True
    """Domains not listed under ``profiles`` keep the seed's profile of their name; ``false``:
    they have none and fall back (the ``fallback`` domain always keeps its profile)."""
    profiles: dict[str, ProfileWeights] = attrs.Factory(dict)
    """``[plugins.terrain_loss.profiles.<domain>]`` tables, by the task's domain names."""


def resolve_profiles(
    config: TerrainLossConfig, domains: tuple[str, ...], task: str
) -> dict[str, list[float]]:
    """Each of the task's ``domains`` that has a profile -> its weights in ``COMPONENTS``
    order; a profile or fallback naming another domain is a ConfigError naming the key."""
    where = "plugins.terrain_loss"
    named = [*((f"profiles.{name}", name) for name in config.profiles)]
    for key, name in [*named, ("fallback", config.fallback)]:
        if name not in domains:
            raise ConfigError(
                f"{where}.{key}: task {task!r} has no domain {name!r}; its domains are "
                f"{', '.join(domains)}"
            )
    table = {}
    for domain in domains:
        listed = config.profiles.get(domain, ProfileWeights())
        seed = SEED_PROFILES.get(domain)
        if domain not in config.profiles and (
            seed is None or not (config.seed_profiles or domain == config.fallback)
        ):
            continue
        weights = []
        for component in COMPONENTS:
            weight = getattr(listed, component)
            if weight is None and seed is None:
                raise ConfigError(
                    f"{where}.profiles.{domain}.{component}: the seed has no profile for "
                    f"{domain!r}, so its profile lists every component"
                )
            weights.append(seed[component] if weight is None else weight)
        table[domain] = weights
    if config.fallback not in table:
        raise ConfigError(
            f"{where}.fallback: {config.fallback!r} has no profile; give it one under "
            f"[{where}.profiles.{config.fallback}]"
        )
    return table


class TerrainLoss(Plugin):
    """Per-sample loss-component weights from each sample's terrain profile (seed Solution C).

    Every sample's five loss components (elevation, gradient, curvature, edge, spectral) are
    weighted with its own terrain's profile, so mixed batches are weighted correctly. The
    defaults are the seed's absolute profiles; ``mode = "replace"`` (default) uses them as
    the weights, ``mode = "scale"`` multiplies the incoming weights by each profile relative
    to the ``fallback`` profile. A sample whose domain has no profile is weighted with the
    ``fallback`` profile, counted in ``terrain_loss_fallback_samples`` and warned about once.
    """

    name = "terrain_loss"
    Config = TerrainLossConfig
    table: torch.Tensor
    """``[domains + 1, components]``: each domain's profile (the fallback's where it has
    none), then the fallback's for labels outside the domains; built by ``setup``."""
    has_profile: torch.Tensor

    def __init__(self, config: TerrainLossConfig) -> None:
        super().__init__(config)
        self.warned = False

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        if tuple(ctx.task.components) != COMPONENTS:
            raise ConfigError(
                f"plugin terrain_loss weights the components {', '.join(COMPONENTS)}; task "
                f"{ctx.task.name!r} has {', '.join(ctx.task.components)}"
            )
        self.build_table(ctx.terrains, ctx.task.name)
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

    def build_table(self, domains: tuple[str, ...], task: str) -> None:
        """The weight table of the task's ``domains`` (see :func:`resolve_profiles`)."""
        config = self.config
        profiles = resolve_profiles(config, domains, task)
        reference = torch.tensor(profiles[config.fallback])
        if config.mode == "scale":
            zero = [c for c, w in zip(COMPONENTS, reference.tolist(), strict=True) if w <= 0]
            if zero:
                raise ConfigError(
                    f"plugins.terrain_loss.profiles.{config.fallback}.{zero[0]} must be > 0 "
                    f'with mode = "scale": the {config.fallback!r} profile is the reference '
                    "every other profile is divided by"
                )
        rows = [torch.tensor(profiles.get(d, profiles[config.fallback])) for d in domains]
        table = torch.stack([*rows, reference])
        self.table = table / reference if config.mode == "scale" else table
        self.has_profile = torch.tensor([d in profiles for d in domains] + [False])

    @hookimpl
    def loss_weights(
        self, weights: torch.Tensor, batch: Batch, ctx: RunContext
    ) -> torch.Tensor | None:
        if self.table.device != weights.device:
            self.table = self.table.to(weights.device)
            self.has_profile = self.has_profile.to(weights.device)
        terrain = batch["terrain"].to(weights.device)
        domains = ctx.terrains
        in_range = (terrain >= 0) & (terrain < len(domains))
        rows = torch.where(in_range, terrain, len(domains))
        profile = self.table[rows].to(weights.dtype)
        known = self.has_profile[rows]
        unknown = int((~known).sum())
        ctx.log(LOG_KEY, unknown)
        if unknown and not self.warned:
            self.warned = True
            labels = sorted(set(terrain[~known].tolist()))
            names = [domains[i] if 0 <= i < len(domains) else f"label {i}" for i in labels]
            warnings.warn(
                f"terrain_loss: no profile for {', '.join(names)}; those samples use the "
                f"{self.config.fallback!r} profile (counted in {LOG_KEY}; warned once)",
                stacklevel=2,
            )
        return profile if self.config.mode == "replace" else weights * profile
