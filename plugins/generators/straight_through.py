"""``straight_through``: a hard Gumbel-softmax sample in place of TerraMind's token sampling.

The forward pass picks one token per position, as generation does; the backward pass uses
the softmax relaxation's gradient (straight-through). The picked tokens are looked up in
the tokenizer's FSQ codebook, the latent its diffusion decoder reads, and compared with the
target's codes, so the loss is on the decoded result in code space and reaches the logits.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from core import validators as check
from core.hookspecs import Batch, hookimpl
from core.plugins import Plugin
from plugins.generators import sar2opt_task, terramind_of

if TYPE_CHECKING:
    from core.context import RunContext

_positive = check.positive


@attrs.frozen
class StraightThroughConfig:
    """``[plugins.straight_through]``: Gumbel temperature annealed from ``temperature`` to
    ``final_temperature`` over the run."""

    temperature: float = attrs.field(default=1.0, validator=_positive)
    final_temperature: float = attrs.field(default=0.5, validator=_positive)
    schedule: str = attrs.field(
        default="exponential",
        validator=attrs.validators.in_(("constant", "linear", "exponential")),
    )


def temperature_at(config: StraightThroughConfig, progress: float) -> float:
    """Temperature at ``progress`` in [0, 1] of the run."""
    start, end = config.temperature, config.final_temperature
    if config.schedule == "constant":
        return start
    if config.schedule == "linear":
        return start + (end - start) * progress
    return start * math.exp(math.log(end / start) * progress)


class StraightThrough(Plugin):
    """Straight-through Gumbel-softmax token choice, MSE in the tokenizer's code space."""

    name = "straight_through"
    Config = StraightThroughConfig

    @hookimpl
    def training_forward(self, model: nn.Module, batch: Batch, ctx: RunContext) -> torch.Tensor:
        targets = sar2opt_task(ctx, self.name).target_tokens(batch)
        codebook = terramind_of(model, ctx, self.name).codebook  # [V, d]
        progress = (ctx.epoch - 1) / max(1, ctx.total_epochs - 1)
        tau = temperature_at(self.config, progress)
        ctx.log("straight_through_temperature", tau)
        logits = model(batch["sar"], output="logits")
        choice = F.gumbel_softmax(logits.float(), tau=tau, hard=True)  # one-hot forward
        codes = choice @ codebook
        return (codes - codebook[targets]).square().mean((1, 2)).unsqueeze(1)
