"""A template third-party terraplug plugin, registered through the entry-point group."""

from __future__ import annotations

import attrs
import torch

from terraplug import ConfigError, Plugin, RunContext, hookimpl


@attrs.define
class ComponentScaleConfig:
    scales: dict[str, float] = attrs.Factory(lambda: {"edge": 2.0})
    """Loss component name -> factor applied to that component's weight."""


class ComponentScale(Plugin):
    """Scale the weights of chosen loss components (default: double the edge loss)."""

    name = "component_scale"
    Config = ComponentScaleConfig

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        unknown = set(self.config.scales) - set(ctx.task.components)
        if unknown:
            raise ConfigError(
                f"[plugins.component_scale] scales names unknown components {sorted(unknown)}; "
                f"the task has {list(ctx.task.components)}"
            )

    @hookimpl
    def loss_weights(self, weights: torch.Tensor, ctx: RunContext) -> torch.Tensor:
        factors = torch.tensor(
            [self.config.scales.get(name, 1.0) for name in ctx.task.components],
            device=weights.device,
        )
        return weights * factors
