"""``teacher_forcing``: TerraMind's own (4M) training path, no sampling during training.

The decoder reads mask tokens at every target position and predicts each target token id,
which comes from the frozen S2 L2A tokenizer (cached once per tile). Cross-entropy on those
logits trains the LoRA adapters of encoder and decoder; sampling happens only when
validation generates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from core.hookspecs import Batch, hookimpl
from core.plugins import Plugin
from plugins.generators import prepare_target_tokens, sar2opt_task

if TYPE_CHECKING:
    from core.context import RunContext


@attrs.frozen
class TeacherForcingConfig:
    """``[plugins.teacher_forcing]``."""

    label_smoothing: float = attrs.field(
        default=0.0, validator=[attrs.validators.ge(0.0), attrs.validators.lt(1.0)]
    )


class TeacherForcing(Plugin):
    """Cross-entropy of TerraMind's token logits against the target's token ids."""

    name = "teacher_forcing"
    Config = TeacherForcingConfig

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        prepare_target_tokens(ctx, self.name)

    @hookimpl
    def training_forward(self, model: nn.Module, batch: Batch, ctx: RunContext) -> torch.Tensor:
        targets = sar2opt_task(ctx, self.name).target_tokens(batch)
        logits = model(batch["sar"], output="logits")
        token_loss = F.cross_entropy(
            logits.transpose(1, 2),
            targets,
            reduction="none",
            label_smoothing=self.config.label_smoothing,
        )
        return token_loss.mean(1, keepdim=True)
