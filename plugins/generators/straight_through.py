"""``straight_through``: the token choice made differentiable, scored in the tokenizer's code space.

Nothing is decoded: the loss compares FSQ codes (the latent the diffusion decoder reads),
not images, ``||c_j - c_t||^2`` per position for the token ``j`` chosen against the target's
``t``. Two estimators, which agree only at temperature 1:

- ``expected`` (default): the expected error under ``p = softmax(logits / tau)``,
  ``sum_j p_j ||c_j - c_t||^2``, computed exactly. Each position's loss depends on its own
  token only, so it costs one ``[B, N, V] x [V, d]`` product: differentiable, no sampling, no
  variance. Below temperature 1 it scores an ever sharper choice.
- ``gumbel``: a hard Gumbel-softmax sample. The forward pass picks one token per position as
  generation does; the Gumbel-max pick is distributed as ``softmax(logits)`` whatever the
  temperature, so its value is a sample of the expected error at temperature 1 at every
  temperature. The backward pass uses the softmax relaxation's gradient, whose sharpness the
  temperature sets: a biased, noisy estimate of the gradient, of an objective that differs
  from ``expected``'s below temperature 1 (see docs/terramind.md for the measurement).

The temperature is annealed per optimizer step over the run.
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
from plugins.generators import prepare_target_tokens, sar2opt_task, terramind_of

if TYPE_CHECKING:
    from core.context import RunContext

_positive = check.positive


@attrs.frozen
class StraightThroughConfig:
    """``[plugins.straight_through]``: temperature annealed from ``temperature`` to
    ``final_temperature`` over the run's optimizer steps."""

    temperature: float = attrs.field(default=1.0, validator=_positive)
    final_temperature: float = attrs.field(default=0.5, validator=_positive)
    schedule: str = attrs.field(
        default="exponential",
        validator=attrs.validators.in_(("constant", "linear", "exponential")),
    )
    estimator: str = attrs.field(
        default="expected", validator=attrs.validators.in_(("gumbel", "expected"))
    )
    """``expected``: the exact expected error; ``gumbel``: a hard Gumbel-softmax sample."""


def temperature_at(config: StraightThroughConfig, progress: float) -> float:
    """Temperature at ``progress`` in [0, 1] of the run."""
    start, end = config.temperature, config.final_temperature
    if config.schedule == "constant":
        return start
    if config.schedule == "linear":
        return start + (end - start) * progress
    return start * math.exp(math.log(end / start) * progress)


def expected_code_error(
    logits: torch.Tensor, codebook: torch.Tensor, targets: torch.Tensor, tau: float
) -> torch.Tensor:
    """``[B, N]``: ``sum_j p_j ||c_j - c_t||^2`` with ``p = softmax(logits / tau)``, exactly
    (expanded as ``p . |c|^2 - 2 (p C) . c_t + |c_t|^2``, never forming ``[B, N, V, d]``)."""
    p = torch.softmax(logits / tau, dim=-1)
    target_codes = codebook[targets]
    return (
        p @ codebook.square().sum(-1)
        - 2 * ((p @ codebook) * target_codes).sum(-1)
        + target_codes.square().sum(-1)
    )


def gumbel_code_error(
    logits: torch.Tensor, codebook: torch.Tensor, targets: torch.Tensor, tau: float
) -> torch.Tensor:
    """``[B, N]``: ``||c_sample - c_t||^2`` of one hard Gumbel-softmax sample per position
    (one-hot forward, the relaxation's gradient backward)."""
    choice = F.gumbel_softmax(logits, tau=tau, hard=True)
    return (choice @ codebook - codebook[targets]).square().sum(-1)


ESTIMATORS = {"gumbel": gumbel_code_error, "expected": expected_code_error}


class StraightThrough(Plugin):
    """Code-space error of TerraMind's token choice: Gumbel straight-through or exact."""

    name = "straight_through"
    Config = StraightThroughConfig

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        prepare_target_tokens(ctx, self.name)

    @hookimpl
    def training_forward(self, model: nn.Module, batch: Batch, ctx: RunContext) -> torch.Tensor:
        targets = sar2opt_task(ctx, self.name).target_tokens(batch)
        codebook = terramind_of(model, ctx, self.name).codebook  # [V, d]
        progress = ctx.step.progress if ctx.step else 0.0  # outside a step: the start
        tau = temperature_at(self.config, progress)
        ctx.log("straight_through_temperature", tau)
        logits = model(batch["sar"], output="logits").float()
        error = ESTIMATORS[self.config.estimator](logits, codebook, targets, tau)
        return (error / codebook.shape[-1]).mean(1, keepdim=True)
