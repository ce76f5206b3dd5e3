"""``ema``: validate, plot, export and predict with an exponential moving average of the
weights, while the optimizer trains the weights themselves.

After every optimizer step the trainer took, each trainable weight's average moves towards
it: ``average += (1 - decay) * (weight - average)``. Through ``evaluation_weights`` the
averages stand in for the trained weights wherever the model is evaluated or used (the
trainer swaps them in and back, so training never sees them), and the checkpoint keeps them
as the plugin's state: a resumed run continues the same averages, and ``core.predict``
applies them to the model it rebuilds. Buffers (BatchNorm statistics) stay the model's own.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import nn

from core.context import RunContext
from core.hookspecs import hookimpl
from core.plugins import Plugin
from core.validators import open_fraction


@attrs.frozen
class EmaConfig:
    """``[plugins.ema]``."""

    decay: float = attrs.field(default=0.999, validator=open_fraction)
    """Share of the average kept at each step, in (0, 1): the average spans about
    ``1 / (1 - decay)`` steps (1,000 at 0.999)."""


class Ema(Plugin):
    """Exponential moving average of the trainable weights, used for validation and predict.

    The averages start as the weights at set-up and are the same on every process (the
    weights are), so the main process's checkpointed state serves all of them.
    """

    name = "ema"
    Config = EmaConfig

    def __init__(self, config: EmaConfig) -> None:
        super().__init__(config)
        self.averages: dict[str, torch.Tensor] = {}
        """Per trainable parameter (its name in the unwrapped model): its average."""
        self.weights: dict[str, torch.Tensor] = {}
        """The parameters the averages follow, by the same names."""

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        """Start every average at its weight; a resumed run's ``load_state_dict`` follows."""
        model: nn.Module = ctx.accelerator.unwrap_model(ctx.model)
        self.weights = {
            name: param for name, param in model.named_parameters() if param.requires_grad
        }
        self.averages = {name: param.detach().clone() for name, param in self.weights.items()}

    @hookimpl
    def after_optimizer_step(self) -> None:
        with torch.no_grad():
            for name, param in self.weights.items():
                self.averages[name].lerp_(param, 1 - self.config.decay)

    @hookimpl
    def evaluation_weights(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**weights, **self.averages}

    def state_dict(self) -> dict[str, Any]:
        return {"averages": dict(self.averages)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The saved averages, on the device of those ``setup`` made (outside training,
        where no setup runs, as they were saved: on the CPU)."""
        saved: dict[str, torch.Tensor] = state["averages"]
        if self.averages and saved.keys() != self.averages.keys():
            raise RuntimeError(
                f"plugin ema: the checkpoint averages {len(saved)} weights, the model has "
                f"{len(self.averages)} trainable ones"
            )
        self.averages = {
            name: average.to(self.averages[name].device) if self.averages else average
            for name, average in saved.items()
        }
