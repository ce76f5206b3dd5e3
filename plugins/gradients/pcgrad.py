"""``pcgrad``: gradient surgery between terrains (Yu et al., 2020, "Gradient Surgery for
Multi-Task Learning", NeurIPS), treating each terrain category as a task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from torch import nn

from core.context import RunContext
from core.errors import ConfigError
from core.hookspecs import hookimpl
from core.plugins import Plugin

SUPPORTED_DISTRIBUTED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
"""Where each process holds every parameter whole, so writing ``p.grad`` is enough."""


@attrs.frozen
class PCGradConfig:
    """``[plugins.pcgrad]``."""

    combine: str = attrs.field(default="mean", validator=attrs.validators.in_(("mean", "sum")))
    """How the projected per-terrain gradients become one: ``mean`` (the scale of a plain
    step, and exactly ``balanced_grad`` when no terrains conflict) or ``sum`` (the paper's)."""


def projection_orders(num_tasks: int, seed: int, step: int) -> list[list[int]]:
    """For each task, the other tasks in the random order it is projected against.

    PCGrad draws a fresh order per task and step; seeding it by ``(seed, step)`` makes every
    process draw the same one.
    """
    rng = np.random.default_rng([seed, step])
    return [[int(j) for j in rng.permutation(num_tasks) if j != i] for i in range(num_tasks)]


def project_conflicting(grads: torch.Tensor, task: int, order: Sequence[int]) -> torch.Tensor:
    """Row ``task`` of ``grads`` ``[T, P]``, projected in ``order`` onto the normal plane of
    every (original) row it conflicts with, i.e. has a negative dot product with.

    Branch-free (the coefficient is clamped to zero when there is no conflict) so a GPU
    never waits for a host-side comparison; a non-conflicting gradient is returned unchanged.
    """
    grad = grads[task].clone()
    for other in order:
        reference = grads[other]
        squared_norm = reference.square().sum().clamp(min=torch.finfo(grad.dtype).tiny)
        grad -= torch.dot(grad, reference).clamp(max=0) / squared_norm * reference
    return grad


def pcgrad_combine(
    grads: torch.Tensor, orders: Sequence[Sequence[int]], combine: str
) -> torch.Tensor:
    """Project every row of ``grads`` ``[T, P]`` and sum or average the results ``[P]``.

    Rows are projected one at a time, so the surgery needs two ``[P]`` vectors on top of
    ``grads``.
    """
    total = torch.zeros_like(grads[0])
    for task, order in enumerate(orders):
        total += project_conflicting(grads, task, order)
    return total / len(orders) if combine == "mean" else total


def conflicting_pair_fraction(grads: torch.Tensor) -> float:
    """Share of task pairs whose gradients point against each other (negative dot product)."""
    num_tasks = len(grads)
    upper = torch.triu_indices(num_tasks, num_tasks, offset=1)
    dots = (grads @ grads.T)[upper[0], upper[1]]
    return float((dots < 0).float().mean())


class PCGrad(Plugin):
    """Project conflicting per-terrain gradients onto each other's normal planes (PCGrad).

    The seed's §3.2 sees desert gradients ("sharpen edges") and glaciated ones ("smooth")
    pull against each other. PCGrad (Yu et al., 2020) treats each terrain present in the
    optimizer step as a task: its gradient is that terrain's mean-loss gradient; each one is
    projected onto the normal plane of every other terrain gradient it conflicts with
    (negative cosine), in a random order, and the projected gradients are combined (mean
    over terrains by default, ``combine = "sum"`` for the paper's sum). Without conflicts
    the result equals ``balanced_grad``'s.

    Cost: per micro-batch, one backward pass per terrain in it (per terrain in the step on
    several processes) instead of one; ``T`` flattened gradients of memory (``T`` = terrains
    in the step, at most 5), all-reduced across processes in one collective. DDP's own
    gradient sync never fires (no ``.backward()`` runs) and is not needed. Not for fp16 mixed
    precision (its loss scaling wraps ``.backward()``) nor sharded training (FSDP, DeepSpeed).
    """

    name = "pcgrad"
    Config = PCGradConfig

    def __init__(self, config: PCGradConfig) -> None:
        super().__init__(config)
        self.terrains: list[int] = []
        """Terrain indices present in the current step, one row of ``self.grads`` each."""
        self.grads: torch.Tensor | None = None
        """``[T, P]``: each terrain's mean-loss gradient, summed so far (float32 at least)."""

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        if ctx.config.train.mixed_precision == "fp16":
            raise ConfigError(
                "train.mixed_precision = 'fp16' cannot be used with the pcgrad plugin: its "
                "per-terrain gradients bypass fp16 loss scaling; use 'bf16' or 'no'"
            )
        if ctx.accelerator.distributed_type not in SUPPORTED_DISTRIBUTED:
            raise ConfigError(
                f"the pcgrad plugin needs every process to hold whole parameters (one device "
                f"or DDP); it cannot run under {ctx.accelerator.distributed_type.value}"
            )

    @hookimpl
    def backward(
        self, per_sample_loss: torch.Tensor, batch: dict[str, Any], ctx: RunContext
    ) -> bool:
        """Add each terrain's share of its mean-loss gradient to that terrain's row; after the
        step's last micro-batch, synchronise, project, combine and write ``.grad``.

        On several processes every process differentiates every terrain of the step (zero
        where it has none of it), so all run the same backward passes in the same order and
        collectives inside a backward (``SyncBatchNorm``, ``domain_bn``'s global sync) pair up.
        """
        step = ctx.step
        params = trainable_parameters(ctx.model)
        if step.micro_batch == 0:
            self.terrains = torch.nonzero(step.terrain_counts).flatten().tolist()
            size = sum(p.numel() for p in params)
            dtype = torch.promote_types(params[0].dtype, torch.float32)
            self.grads = torch.zeros(len(self.terrains), size, dtype=dtype, device=ctx.device)
        local = batch["terrain"]
        rows = [
            row
            for row, terrain in enumerate(self.terrains)
            if ctx.world_size > 1 or bool((local == terrain).any())
        ]
        for k, row in enumerate(rows):
            terrain = self.terrains[row]
            loss = per_sample_loss[local == terrain].sum() / step.terrain_counts[terrain]
            grads = torch.autograd.grad(
                loss, params, retain_graph=k < len(rows) - 1, materialize_grads=True
            )
            offset = 0
            for grad in grads:
                self.grads[row, offset : offset + grad.numel()] += grad.reshape(-1)
                offset += grad.numel()
        if step.micro_batch == step.num_micro_batches - 1:
            self.apply(params, ctx)
        return True

    def apply(self, params: list[nn.Parameter], ctx: RunContext) -> None:
        """Sum the rows over processes (the same collective on every rank), do the surgery,
        and write the combined gradient into ``.grad``; the rows are then dropped."""
        grads = self.grads
        if ctx.world_size > 1:
            dist.all_reduce(grads)
        if len(grads) > 1:
            ctx.log("pcgrad_conflicting_pairs", conflicting_pair_fraction(grads))
        orders = projection_orders(len(grads), ctx.config.run.seed, ctx.global_step)
        combined = pcgrad_combine(grads, orders, self.config.combine)
        offset = 0
        for p in params:
            p.grad = combined[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        self.grads = None


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters PCGrad differentiates, in the same order on every process."""
    return [p for p in model.parameters() if p.requires_grad]
