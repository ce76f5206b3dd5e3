"""Using a trained run outside the trainer: rebuild its model with its plugins' surgery, give
it the weights validation used (the checkpoint's, with the plugins' ``evaluation_weights``:
``ema``'s averages) and route batches through their ``route_batch`` hooks, as training and
validation did. Public as ``terraplug.TrainedRun`` and ``terraplug.read_run_config``, for any
task's ``predict``.

Besides the trainer, this is the only place that calls plugin hooks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
from accelerate import Accelerator
from torch import nn

from core.config import Config, load_config
from core.context import RunContext
from core.errors import UsageError
from core.plugins import PluginManager
from core.run_folder import CHECKPOINT, CONFIG
from core.safe_io import load_checkpoint, require_finite
from core.tasks import Batch, get_task
from core.train import (
    copy_weights,
    evaluation_weights,
    load_trained_state,
    route_batches,
    trained_state,
)


def read_run_config(run_dir: Path) -> Config:
    """The resolved config a run folder trained with (its ``config.toml``); a missing one is
    a UsageError naming the folder, a bad one a ConfigError naming the file."""
    config_path = run_dir / CONFIG
    if not config_path.is_file():
        raise UsageError(f"--checkpoint {run_dir}: no {CONFIG} there")
    return load_config(config_path)


def run_task(run_dir: Path) -> str:
    """The task a run folder trained; its config.toml must be readable."""
    return read_run_config(run_dir).run.task


@attrs.define(eq=False)
class TrainedRun:
    """A run folder's model, in eval mode, with the context its plugins' hooks expect."""

    config: Config
    model: nn.Module
    ctx: RunContext
    checkpoint_meta: dict[str, Any]
    """The task's own checkpoint entries (``Task.checkpoint_meta``)."""

    @classmethod
    def restore(cls, run_dir: Path, cpu: bool = False) -> TrainedRun:
        """Rebuild the model from config.toml (the task's ``build_model``, then the plugins'
        ``configure_model``), load the checkpoint's weights (read weights-only, refused if not
        finite), hand the plugins that implement ``evaluation_weights`` their checkpointed state
        and put in the weights they choose: the model validation scored."""
        config_path, checkpoint_path = run_dir / CONFIG, run_dir / CHECKPOINT
        for needed in (config_path, checkpoint_path):
            if not needed.is_file():
                raise UsageError(f"--checkpoint {run_dir}: no {needed.name} there")
        state = load_checkpoint(checkpoint_path)  # before anything is built: a refusal is quick
        require_finite(state["model"], checkpoint_path)
        config = read_run_config(run_dir)
        plugins = PluginManager.from_names(config.run.plugins, config.plugins)
        accelerator = Accelerator(cpu=cpu or config.train.cpu)
        task = get_task(config.run.task)
        ctx = RunContext(config, accelerator, task, plugins, run_dir, config.run.epochs)
        model = plugins.chain("configure_model", task.build_model(config), "model", ctx=ctx)
        load_trained_state(model, state["model"], checkpoint_path)
        choosers = {p.name for p in plugins.active if "evaluation_weights" in p.hooks}
        # only those whose state decides the weights: others never ran their setup here
        plugins.load_state_dict({k: v for k, v in state["plugins"].items() if k in choosers})
        weights = trained_state(model)
        copy_weights(weights, evaluation_weights(weights, ctx))
        ctx.model = model.to(accelerator.device).eval()
        return cls(config, ctx.model, ctx, state["task"])

    def route(self, batch: Batch) -> Batch:
        """``batch`` after the plugins' ``route_batch``."""
        return next(route_batches([batch], self.model, self.ctx))

    def uses_hook(self, hook: str) -> bool:
        """Whether an active plugin implements ``hook`` (dem_sr: is the model terrain-aware?)."""
        return any(hook in plugin.hooks for plugin in self.ctx.plugins.active)
