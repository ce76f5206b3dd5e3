"""Generator plugins: ways to train TerraMind (``--task sar2opt``) past its token sampling.

Each provides the exclusive ``training_forward`` hook, so exactly one is active per run. They
reach the task and the model through the interface ``core.tasks.sar2opt.generation``
declares, checked by its members with an error naming the plugin and what is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from core.tasks.sar2opt.generation import TokenGeneration, generation_task, terramind_in

if TYPE_CHECKING:
    from core.context import RunContext
    from core.tasks.sar2opt.terramind import TerraMindSarToOptical


def sar2opt_task(ctx: RunContext, plugin: str) -> TokenGeneration:
    """The run's task, once it implements ``TokenGeneration``; else a PluginError naming
    ``plugin`` and what the task lacks."""
    return generation_task(ctx.task, plugin)


def terramind_of(model: nn.Module, ctx: RunContext, plugin: str) -> TerraMindSarToOptical:
    """The TerraMind inside ``model`` (unwrapping DDP and a ``WrapsTerraMind`` model)."""
    sar2opt_task(ctx, plugin)
    return terramind_in(ctx.accelerator.unwrap_model(model))


def prepare_target_tokens(ctx: RunContext, plugin: str) -> None:
    """Have the task tokenize the training targets: only plugins that read them call this."""
    sar2opt_task(ctx, plugin).prepare_target_tokens(terramind_of(ctx.model, ctx, plugin), ctx)
