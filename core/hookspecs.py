"""The hooks a training strategy can implement, grouped by when the trainer calls them.

Two kinds of hook:

- **exclusive** hooks (declared ``firstresult=True``) have at most one provider among the
  active plugins. Two active plugins implementing one is a start-up error naming both; with
  none, the task's built-in behaviour runs.
- **composable** hooks run once per implementing plugin, in the order given to ``--plugins``.
  Hooks that receive a value and may return a replacement (``configure_model``,
  ``epoch_indices``, ``loss_weights``, ``evaluation_weights``) form a chain: each plugin
  receives what the previous one returned (``None`` means "unchanged").

``core.plugins`` orders the calls and makes each through pluggy, one implementation at a
time, so pluggy's ``enable_tracing`` and ``add_hookcall_monitoring`` see every call and a
missing argument raises ``pluggy.HookCallError`` (docs/hooks.md, Tracing hook calls).

Every hook receives ``ctx``, the :class:`core.context.RunContext` of the run: config,
accelerator, task, epoch, the current optimizer step and each plugin's own config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pluggy

from core.tasks import Batch

if TYPE_CHECKING:
    import torch
    from torch import nn

    from core.context import RunContext

PROJECT = "terraplug"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- set-up --------------------------------------------------------------------------------


@hookspec
def configure_model(model: nn.Module, ctx: RunContext) -> nn.Module | None:
    """Model surgery, once, before the optimizer is built and Accelerate wraps the model.

    Composable chain. Return a replacement module, or ``None`` after changing ``model`` in
    place. New parameters created here are trained. Example: ``domain_bn`` swaps every
    ``BatchNorm2d`` for a terrain-adaptive norm.
    """


@hookspec
def setup(ctx: RunContext) -> None:
    """Once, after model, data, optimizer and accelerator are ready, before the first epoch.

    Composable. ``ctx.model``, ``ctx.train_dataset`` and ``ctx.total_epochs`` are set; on a
    resumed run ``ctx.epoch`` is the epoch training resumes in.
    """


# --- sampling ------------------------------------------------------------------------------


@hookspec
def on_epoch_start(epoch: int, ctx: RunContext) -> None:
    """At the start of every training epoch (1-based ``epoch``), before sampling. Composable."""


@hookspec
def epoch_indices(indices: np.ndarray, epoch: int, ctx: RunContext) -> np.ndarray | None:
    """Choose which training samples take part in ``epoch``.

    Composable chain over an int64 array of dataset indices (all of them for the first
    plugin). Return the indices to draw, or ``None`` to keep all: a subset, or with repeats
    (an index given k times is drawn k times; nothing removes or sorts them). Must be a pure
    function of the config and ``epoch`` so every process agrees. Example: ``curriculum``.
    """


@hookspec(firstresult=True)
def batch_plan(
    dataset: Any, indices: np.ndarray, epoch: int, ctx: RunContext
) -> Sequence[Sequence[int]] | None:
    """The epoch's batches, as lists of dataset indices drawn from ``indices``.

    Exclusive. Called once per epoch on every process with the same arguments; the result
    must be a pure function of ``(ctx.config.run.seed, epoch)`` because the trainer gives
    process ``r`` of ``n`` the batches ``r, r+n, ...``. ``dataset.terrains[i]`` is the
    terrain index of sample ``i``. Default: a seeded shuffle cut into
    ``data.batch_size`` batches. Example: ``stratified``.
    """


# --- one training step ---------------------------------------------------------------------


@hookspec
def route_batch(model: nn.Module, batch: Batch, ctx: RunContext) -> None:
    """Before every forward pass, training and validation, with the batch on its device.

    Composable. Lets a plugin route samples to domain-specific layers (``domain_bn`` tells
    its norms the terrain of each sample). ``model.training`` tells training from the rest
    (validation, the probe set's training windows, plots).
    """


@hookspec(firstresult=True)
def training_forward(model: nn.Module, batch: Batch, ctx: RunContext) -> torch.Tensor | None:
    """Run the model on a training batch and return its per-sample, per-component losses.

    Exclusive. Returns a ``[B, C]`` tensor, ``C = len(ctx.task.components)``. Default: the
    task's own forward (for ``dem_sr``, RCAN-DEM on ``batch["lr"]`` scored against
    ``batch["hr"]``). Generative models whose sampling blocks gradients provide one
    (``teacher_forcing``, ``straight_through``, ...).
    """


@hookspec(firstresult=True)
def probe_losses(model: nn.Module, batch: Batch, ctx: RunContext) -> torch.Tensor | None:
    """Score the probe set's windows when ``training_forward`` trains a surrogate.

    Exclusive. Returns ``[B]`` positive losses of the model's quality, each window's on its
    own scale, which the probe's geometric mean and its model spikes read. The trainer calls
    it in eval mode, without gradients, with the generators seeded and restored. Default:
    the training forward's losses at the ``[loss]`` base weights. A plugin whose training
    objective is no level of the model's error (``reinforce``'s policy-gradient surrogate
    is negative as often as not) provides one.
    """


@hookspec
def loss_weights(weights: torch.Tensor, batch: Batch, ctx: RunContext) -> torch.Tensor | None:
    """Weight each sample's loss components.

    Composable chain over a ``[B, C]`` tensor that starts as the ``[loss]`` config weights
    broadcast over the batch. Return the new weights or ``None``. The per-sample loss is
    ``(weights * losses).sum(1)``. Example: ``terrain_loss``.
    """


@hookspec
def auxiliary_loss(model: nn.Module, batch: Batch, ctx: RunContext) -> torch.Tensor | None:
    """An extra per-sample loss term, added to the objective after ``loss_weights``.

    Composable: every implementation's ``[B]`` tensor is added to the per-sample loss, which
    the ``backward`` hook then reduces, so ``balanced_grad`` and ``pcgrad`` balance or split
    the auxiliary term with the rest. Called right after the training forward of the same
    micro-batch (in training only), so a plugin can score what it captured during that
    forward. Return ``None`` to add nothing. Example: ``terrain_head``.
    """


@hookspec
def per_sample_losses(losses: torch.Tensor, batch: Batch, ctx: RunContext) -> torch.Tensor | None:
    """See each sample's loss of a training micro-batch; optionally weight it.

    Composable. Called on every process, once per micro-batch, after ``auxiliary_loss`` and
    before ``backward``, with the ``[B]`` per-sample objective detached (every plugin sees
    the same values). Return a ``[B]`` tensor of per-sample weights, or ``None`` to only
    observe; the objective that ``backward`` receives, and ``train_loss`` reports, is
    multiplied by every plugin's weights. A hard-example miner weights the hardest samples
    here and so combines with any ``backward`` (``balanced_grad``, ``pcgrad``); the default
    backward still divides by the step's sample count.
    """


@hookspec(firstresult=True)
def backward(per_sample_loss: torch.Tensor, batch: Batch, ctx: RunContext) -> bool | None:
    """Turn the ``[B]`` per-sample losses of one micro-batch into gradients.

    Exclusive: it owns the backward objective. Called once per micro-batch; ``ctx.step``
    holds the terrain counts of the whole optimizer step (all micro-batches, all processes).
    Return ``True`` after calling ``ctx.backward`` (or writing ``.grad``) yourself. Default:
    the sample mean over the whole step. Examples: ``balanced_grad``, ``pcgrad``.
    """


@hookspec
def transform_gradients(model: nn.Module, ctx: RunContext) -> None:
    """After the step's last backward and before clipping and ``optimizer.step()``.

    Composable, in place on ``p.grad``. Gradients are final and synchronised across
    processes: a ``backward`` plugin that keeps its own (``pcgrad``) writes them before this.
    """


@hookspec
def after_optimizer_step(model: nn.Module, ctx: RunContext) -> None:
    """Right after ``optimizer.step()`` changed the weights, on every process.

    Composable. ``ctx.global_step`` already counts this step. Not called for a step the
    trainer skipped (a non-finite loss or gradient, or fp16's scaler skipping an overflow):
    the weights did not change. ``model`` is the prepared model (possibly a DDP wrapper;
    ``ctx.accelerator.unwrap_model`` gives the module). May read the weights and keep state
    of its own (``ema`` averages them here); changing the weights changes training.
    """


# --- validation and epoch end ----------------------------------------------------------------


@hookspec
def evaluation_weights(
    weights: dict[str, torch.Tensor], ctx: RunContext
) -> dict[str, torch.Tensor] | None:
    """The weights the model is evaluated and used with, in place of the trained ones.

    Composable chain over the model's state dict without frozen parameters (the keys of the
    unwrapped module); return a dict with replacement tensors for some keys, or ``None``.
    The trainer puts the result in the model for validation (with ``validation_metrics``,
    on every process), the plots and the task's ``export_model`` (main process), and puts
    the trained weights back after each, however it ends; training never sees them.
    ``core.inference`` (predict) applies it to the model it rebuilds from the checkpoint,
    after handing the plugin its saved state (without calling ``setup``). Must not change
    the tensors it receives. Example: ``ema`` returns its averages.
    """


@hookspec
def validation_metrics(model: nn.Module, ctx: RunContext) -> dict[str, Any] | None:
    """After the task's validation, on every process; return extra metrics or ``None``.

    Composable; the returned keys are merged into the epoch's ``metrics.jsonl`` row
    (a key the row already has is an error naming the plugin). Values must be JSON-able.
    """


@hookspec
def on_epoch_end(epoch: int, metrics: dict[str, Any], ctx: RunContext) -> None:
    """After the epoch's checkpoint and metrics row are written.

    Composable; ``metrics`` is read-only by convention. Use it to log, plot or adjust state.
    """


# --- end of run ------------------------------------------------------------------------------


@hookspec
def on_run_end(status: str, error: BaseException | None, ctx: RunContext) -> None:
    """Once, however the run ends, on every process, before its run folder is released.

    Composable. ``status`` is ``"completed"`` (after ``summary.json``), ``"interrupted"``
    (SIGINT or SIGTERM: the checkpoint and ``interrupted.json`` are written; ``error`` is
    the ``Interrupted`` exception; also Ctrl-C during set-up, as ``KeyboardInterrupt``) or
    ``"failed"`` (``error`` is the exception, re-raised after the hook). It may come before
    the plugin's ``setup`` ran (a failure in set-up): ``ctx.model`` may be ``None``. For
    closing files and loggers and reporting. Where the run failed or was interrupted, an
    exception from this hook becomes a note on ``error`` (the exit status stays); after a
    completed run it fails the run.
    """
