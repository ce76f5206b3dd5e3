"""``domain_bn``: terrain-adaptive batch normalisation (seed Solution D), per sample.

Works on the task's domains (``ctx.terrains``; for dem_sr the five terrain categories).
The seed's ``TerrainAdaptiveBatchNorm`` holds one ``BatchNorm2d`` per terrain and picks one
for the whole batch. Here one layer keeps per-terrain running statistics as ``[terrains, C]``
buffers and normalises every sample with its own terrain's statistics in one vectorised pass,
so mixed batches (the default shuffle, ``stratified``) are normalised correctly.

Under several processes (``sync = "global"``, the default) the per-terrain moments are
combined over all processes in the forward pass and their gradients in the backward pass, as
``nn.SyncBatchNorm`` does: every sample is normalised with its terrain's statistics over the
*global* batch, exactly as one process would on the whole batch. ``sync = "running"`` keeps
each process's own batch statistics for normalising (as a plain ``BatchNorm2d`` under DDP)
and combines only the moments that update the running statistics, with no collective in the
backward pass. Either way every process updates its running statistics identically, which
is why DDP's ``broadcast_buffers`` (rank 0's buffers copied to all ranks before every
forward) is harmless here, and why a terrain that one process never sees still gets its
statistics from the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import torch
import torch.distributed as dist
from torch import nn

from core.context import require_terrain_labels
from core.errors import ConfigError
from core.hookspecs import Batch, hookimpl
from core.plugins import Plugin

if TYPE_CHECKING:
    from core.context import RunContext


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward sums the gradients over processes too."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


SYNC_MODES = ("global", "running")
"""How per-terrain statistics are shared between processes; see ``DomainBNConfig.sync``."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _combine_over_processes(
    count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global per-terrain (count, mean, sum of squared deviations) from each process's own.

    Every process contributes its row of a ``[world, terrains, 2C+1]`` table (one all-reduce,
    a fixed size whatever terrains a process holds, so none can hang), then the rows are
    merged with Chan's parallel formula, which stays exact where ``E[x²] - E[x]²`` would not.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    channels = mean.shape[1]
    row = torch.cat([count[:, None], mean, m2], dim=1)
    slot = (torch.arange(world, device=row.device) == rank).to(row.dtype)
    table = _AllReduceSum.apply(slot[:, None, None] * row[None])
    counts, means, m2s = table[..., :1], table[..., 1 : 1 + channels], table[..., 1 + channels :]
    total = counts.sum(0)
    global_mean = (counts * means).sum(0) / total.clamp(min=1)
    global_m2 = (m2s + counts * (means - global_mean).square()).sum(0)
    return total[:, 0], global_mean, global_m2


class TerrainBatchNorm2d(nn.Module):
    """``BatchNorm2d`` with per-terrain statistics and one shared affine transform.

    ``route(terrain)`` (the ``domain_bn`` plugin's ``route_batch`` hook) gives the layer the
    terrain index of each sample of the next forward. Training normalises each sample with its
    terrain's moments over the batch and updates that terrain's running statistics with the BN
    momentum; evaluation uses the terrain's running statistics. A terrain never seen in
    training (``num_batches_tracked == 0``) is evaluated with the statistics of an equal mixture
    of the seen terrains; before any training all rows hold the original BN's statistics.
    """

    def __init__(
        self,
        num_features: int,
        num_terrains: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        sync: str = "global",
    ) -> None:
        super().__init__()
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)}, got {sync!r}")
        self.num_features, self.num_terrains = num_features, num_terrains
        self.eps, self.momentum = eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.sync = sync
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_terrains, num_features))
            self.register_buffer("running_var", torch.ones(num_terrains, num_features))
            self.register_buffer("num_batches_tracked", torch.zeros(num_terrains, dtype=torch.long))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.terrain: torch.Tensor | None = None

    @classmethod
    def from_batchnorm(
        cls, bn: nn.BatchNorm2d, num_terrains: int, sync: str = "global"
    ) -> TerrainBatchNorm2d:
        """A layer with ``bn``'s settings, affine and running statistics (in every row)."""
        layer = cls(
            bn.num_features,
            num_terrains,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
            sync,
        )
        reference = bn.weight if bn.affine else bn.running_mean
        if reference is not None:
            layer.to(device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            if bn.affine:
                layer.weight.copy_(bn.weight)
                layer.bias.copy_(bn.bias)
                layer.weight.requires_grad_(bn.weight.requires_grad)
                layer.bias.requires_grad_(bn.bias.requires_grad)
            if bn.track_running_stats:
                layer.running_mean.copy_(bn.running_mean.expand(num_terrains, -1))
                layer.running_var.copy_(bn.running_var.expand(num_terrains, -1))
        layer.train(bn.training)
        return layer

    def route(self, terrain: torch.Tensor) -> None:
        """Set the terrain index (``[B]`` int64) of each sample of the following forwards."""
        self.terrain = terrain

    @property
    def seen(self) -> torch.Tensor:
        """``[terrains]`` bool: which terrains have running statistics from training."""
        return self.num_batches_tracked > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        terrain = self.terrain
        if terrain is None:
            raise RuntimeError(
                "TerrainBatchNorm2d (plugin domain_bn) was called without the terrain of each "
                "sample: activate the domain_bn plugin, whose route_batch hook sets it, or "
                "call layer.route(batch['terrain']) before the forward"
            )
        if terrain.shape != (x.shape[0],):
            raise RuntimeError(
                f"TerrainBatchNorm2d (plugin domain_bn): routed {tuple(terrain.shape)} terrain "
                f"labels for a batch of {x.shape[0]}; route each batch before its forward"
            )
        with torch.autocast(x.device.type, enabled=False):  # statistics in float32, as BN
            xf = x.float()
            if self.training or not self.track_running_stats:
                mean, var = self._batch_moments(xf, terrain)
            else:
                mean, var = self._running_moments()
            scale = torch.rsqrt(var + self.eps)
            if self.affine:
                scale = scale * self.weight.float()
            shift = -mean * scale
            if self.affine:
                shift = shift + self.bias.float()
            # One pass over x, as BatchNorm's own kernels do: x * scale[t] + shift[t].
            out = torch.addcmul(
                shift[terrain][..., None, None], xf, scale[terrain][..., None, None]
            )
        return out.to(x.dtype)

    def _batch_moments(
        self, xf: torch.Tensor, terrain: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-terrain mean and biased variance ``[terrains, C]`` of the batch (of the global
        batch under several processes with ``sync = "global"``); updates the running
        statistics in training (always from the global batch).

        Each sample's own moments come from one ``var_mean`` pass; Chan's formula merges them
        per terrain exactly, with no full-size temporary besides the output.
        """
        pixels = xf.shape[2] * xf.shape[3]
        sample_var, sample_mean = torch.var_mean(xf, dim=(2, 3), correction=0)  # [B, C]
        terrains = torch.arange(self.num_terrains, device=terrain.device)
        onehot = (terrain[:, None] == terrains).to(xf.dtype)  # F.one_hot syncs on CUDA

        count = onehot.sum(0) * pixels
        mean = onehot.T @ sample_mean * pixels / count.clamp(min=1)[:, None]
        m2 = onehot.T @ ((sample_mean - mean[terrain]).square() + sample_var) * pixels
        distributed = self.training and _distributed()
        if distributed and self.sync == "global":
            count, mean, m2 = _combine_over_processes(count, mean, m2)
        if self.training and self.track_running_stats:
            running = (count, mean.detach(), m2.detach())
            if distributed and self.sync == "running":
                running = _combine_over_processes(*running)
            self._update_running(*running)
        return mean, m2 / count.clamp(min=1)[:, None]

    @torch.no_grad()
    def _update_running(self, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Move each terrain present in the batch towards its batch moments (BN momentum)."""
        present = (count > 0)[:, None]
        self.num_batches_tracked += present[:, 0].long()
        if self.momentum is None:  # cumulative moving average, as BatchNorm2d does
            factor: Any = 1.0 / self.num_batches_tracked.clamp(min=1)[:, None].to(mean.dtype)
        else:
            factor = self.momentum
        unbiased = m2 / (count - 1).clamp(min=1)[:, None]
        for running, batch in ((self.running_mean, mean), (self.running_var, unbiased)):
            updated = (1 - factor) * running + factor * batch.to(running.dtype)
            running.copy_(torch.where(present, updated, running))

    def _running_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Running statistics per terrain; unseen rows take the seen terrains' mixture."""
        seen = self.seen[:, None]
        mean, var = self.running_mean.float(), self.running_var.float()
        share = seen.float() / seen.sum().clamp(min=1)
        mix_mean = (share * mean).sum(0)
        mix_var = (share * (var + mean.square())).sum(0) - mix_mean.square()
        own = seen | ~seen.any()  # before any training every row is the original BN's
        return torch.where(own, mean, mix_mean), torch.where(own, var, mix_var)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, terrains={self.num_terrains}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, sync={self.sync!r}"
        )


def swap_batchnorms(model: nn.Module, num_terrains: int, sync: str = "global") -> int:
    """Replace every ``nn.BatchNorm2d`` inside ``model`` in place; returns how many.

    A BN module registered at several places stays one shared layer.
    """
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.BatchNorm2d)
    ]
    replacements: dict[int, TerrainBatchNorm2d] = {}
    for parent, name, child in targets:
        if id(child) not in replacements:
            replacements[id(child)] = TerrainBatchNorm2d.from_batchnorm(child, num_terrains, sync)
        setattr(parent, name, replacements[id(child)])
    return len(replacements)


@attrs.frozen
class DomainBNConfig:
    """``[plugins.domain_bn]``."""

    sync: str = attrs.field(default="global", validator=attrs.validators.in_(SYNC_MODES))
    """Under several processes: ``global`` normalises with each terrain's statistics over all
    processes (exact, one all-reduce per layer in forward and one in backward); ``running``
    normalises with each process's own and combines only the running-statistics update (one
    all-reduce per layer in forward, none in backward)."""


class DomainBN(Plugin):
    """Terrain-adaptive BatchNorm: per-terrain running statistics, shared affine (seed Solution D).

    ``configure_model`` swaps every ``nn.BatchNorm2d`` of the model (RCAN-DEM has them with
    ``model.norm = "batch"``) for a ``TerrainBatchNorm2d`` that starts from the original BN's
    affine and running statistics; ``route_batch`` tells those layers the terrain of each
    sample. Training normalises each sample with its own terrain's batch statistics and
    updates that terrain's running statistics with the BN momentum; evaluation uses them, and
    a terrain unseen in training uses the mixture of the seen terrains' statistics. Under
    several processes the statistics are combined over all of them (``sync``), so a process
    whose batches lack a terrain neither hangs nor loses that terrain's statistics.
    """

    name = "domain_bn"
    Config = DomainBNConfig

    @hookimpl
    def configure_model(self, model: nn.Module, ctx: RunContext) -> nn.Module | None:
        """Refuses a model without BatchNorm, before any step: the plugin, not the framework,
        knows what it needs (for a task with a ``model.norm`` option, ``"batch"``)."""
        if not swap_batchnorms(model, len(ctx.terrains), self.config.sync):
            message = (
                f"plugin 'domain_bn': the model of task {ctx.task.name!r} has no "
                "nn.BatchNorm2d to make terrain-adaptive"
            )
            if hasattr(ctx.config.model, "norm"):
                message += "; set model.norm = 'batch' (--set model.norm=batch)"
            raise ConfigError(message)
        return model

    @hookimpl
    def route_batch(self, model: nn.Module, batch: Batch, ctx: RunContext) -> None:
        terrain = batch["terrain"]
        require_terrain_labels(terrain, ctx.terrains, self.name)
        for module in model.modules():
            if isinstance(module, TerrainBatchNorm2d):
                module.route(terrain)
