"""Generator plugins: ways to train TerraMind (``--task sar2opt``) past its token sampling.

Each provides the exclusive ``training_forward`` hook, so exactly one is active per run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from core.errors import PluginError
from core.tasks.sar2opt.task import SarToOptical

if TYPE_CHECKING:
    from core.context import RunContext
    from core.tasks.sar2opt.terramind import TerraMindSarToOptical


def sar2opt_task(ctx: RunContext, plugin: str) -> SarToOptical:
    """The run's task, refusing any task but ``sar2opt`` with a message naming ``plugin``.

    Generator plugins use the sar2opt task's own interface beyond ``Task`` (cached target
    tokens and per-tile caches), so they check for that class, not a name."""
    if not isinstance(ctx.task, SarToOptical):
        raise PluginError(
            f"plugin {plugin!r} trains TerraMind past its token sampling: run it with "
            f"--task sar2opt (this run's task is {ctx.task.name})"
        )
    return ctx.task


def terramind_of(model: nn.Module, ctx: RunContext, plugin: str) -> TerraMindSarToOptical:
    """The TerraMind wrapper inside ``model`` (unwrapping DDP and the refiner)."""
    sar2opt_task(ctx, plugin)
    model = ctx.accelerator.unwrap_model(model)
    return getattr(model, "terramind_generator", model)


def prepare_target_tokens(ctx: RunContext, plugin: str) -> None:
    """Have the task tokenize the training targets: only plugins that read them call this."""
    sar2opt_task(ctx, plugin).prepare_target_tokens(terramind_of(ctx.model, ctx, plugin), ctx)
