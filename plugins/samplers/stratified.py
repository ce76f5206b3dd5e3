"""Stratified batching (seed §4 A): every batch deals the terrain categories out round-robin.

The epoch is one round-robin stream over the categories present, ``c0, c1, ..., cK-1, c0,
...``, cut into full batches of ``B``. So every batch holds ``B // K`` or ``B // K + 1`` tiles
of each category, and the ``B % K`` remainder slots move on by ``B % K`` categories from one
batch to the next (the stream also continues across epochs), so no category is favoured.
Each category's slots are filled from back-to-back random permutations of its tiles: a
category is drawn without replacement until it runs out, then re-permuted.

The plan is vectorised (one strided assignment per category) and a pure function of
``(run.seed, epoch, indices)``, so every process computes the same plan and the trainer's
``r, r+n, ...`` split gives each process its own share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from core.context import RunContext
from core.errors import ConfigError
from core.hookspecs import hookimpl
from core.plugins import Plugin

EPOCH_LENGTHS = ("tiles", "smallest", "largest")


def _distinct_names(_: Any, attribute: attrs.Attribute, names: list[str]) -> None:
    if len(set(names)) != len(names):
        raise ValueError(f"{attribute.name} names a category twice: {names}")


@attrs.frozen
class StratifiedConfig:
    """``[plugins.stratified]``."""

    batch_size: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    """Tiles per batch; 0: ``data.batch_size``."""
    samples_per_category: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    """The seed's YAML key: tiles of each category per batch, so the batch size is this times
    the number of categories present. 0: use ``batch_size``."""
    categories: list[str] = attrs.field(factory=list, validator=_distinct_names)
    """The categories dealt out, in round-robin order; tiles of other categories are not used.
    Empty: every domain of the task (``ctx.terrains``, for dem_sr the five terrains)."""
    epoch_length: str = attrs.field(default="tiles", validator=attrs.validators.in_(EPOCH_LENGTHS))
    """Batches per epoch: ``tiles`` ceil(N / B), N the tiles of the epoch's categories (as many
    steps as a plain shuffle); ``smallest`` until the smallest category runs out (no tile
    repeats); ``largest`` until the largest runs out (every tile at least once)."""

    def __attrs_post_init__(self) -> None:
        if self.batch_size and self.samples_per_category:
            raise ValueError("set batch_size or samples_per_category, not both")


def category_pools(
    terrains: np.ndarray, indices: np.ndarray, categories: Sequence[int]
) -> list[np.ndarray]:
    """The tiles of ``indices`` in each of ``categories`` that has any, in that order."""
    indices = np.asarray(indices, dtype=np.int64)
    labels = terrains[indices]
    pools = [indices[labels == category] for category in categories]
    return [pool for pool in pools if len(pool)]


def epoch_batches(sizes: Sequence[int], batch_size: int, epoch_length: str) -> int:
    """The number of batches in an epoch over categories of ``sizes`` tiles.

    With ``L`` batches each category gets ``floor(L*B/K)`` or ``ceil(L*B/K)`` draws, so
    ``smallest`` keeps every category's draws within its size and ``largest`` reaches it.
    """
    k = len(sizes)
    if epoch_length == "tiles":
        return math.ceil(sum(sizes) / batch_size)
    if epoch_length == "smallest":
        return max(1, k * min(sizes) // batch_size)
    if epoch_length == "largest":
        return math.ceil(k * max(sizes) / batch_size)
    raise ValueError(f"epoch_length must be one of {EPOCH_LENGTHS}, got {epoch_length!r}")


def draws(pool: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` tiles from back-to-back random permutations of ``pool``."""
    cycles = -(-count // len(pool))
    return rng.permuted(np.tile(pool, (cycles, 1)), axis=1).ravel()[:count]


def plan_batches(
    pools: Sequence[np.ndarray], batch_size: int, seed: int, epoch: int, epoch_length: str = "tiles"
) -> np.ndarray:
    """The epoch's ``[L, batch_size]`` batches: a round-robin stream over ``pools``.

    Slot ``g`` of the run's stream (counted across epochs of equal length) belongs to pool
    ``g mod K``, so pool ``k`` fills every ``K``-th slot of the epoch from its first one.
    """
    if not pools:
        raise ValueError("no tiles to plan batches from")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    k = len(pools)
    n_batches = epoch_batches([len(pool) for pool in pools], batch_size, epoch_length)
    slots = n_batches * batch_size
    offset = (epoch - 1) * slots % k
    rng = np.random.default_rng([seed, epoch])
    plan = np.empty(slots, dtype=np.int64)
    for position, pool in enumerate(pools):
        first = (position - offset) % k
        plan[first::k] = draws(pool, len(range(first, slots, k)), rng)
    return plan.reshape(n_batches, batch_size)


class Stratified(Plugin):
    """Full batches that round-robin the terrain categories (seed §4 A, stratified batching).

    Works on the task's domains (``ctx.terrains``) and refuses a task with only one.
    Random shuffling can fill a batch with one terrain, and the gradient then swings towards
    it; dealing the categories out in every batch keeps each step's terrain mix balanced.
    Draws only from the epoch's ``indices`` (so it composes with ``curriculum``) and only from
    the configured categories present in them.
    """

    name = "stratified"
    Config = StratifiedConfig

    def category_indices(self, domains: Sequence[str]) -> list[int]:
        """The configured categories as indices into the task's ``domains``, in order."""
        names = self.config.categories or list(domains)
        unknown = [name for name in names if name not in domains]
        if unknown:
            raise ConfigError(
                f"plugins.stratified.categories: unknown category {unknown[0]!r}; this task's "
                f"domains are {', '.join(domains)}"
            )
        return [list(domains).index(name) for name in names]

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        if len(ctx.terrains) < 2:
            raise ConfigError(
                f"plugin stratified deals a task's domains out round-robin, but task "
                f"{ctx.task.name!r} has only {list(ctx.terrains)}: every batch would be a plain "
                "shuffle; drop stratified from --plugins"
            )
        self.category_indices(ctx.terrains)

    def batch_size(self, default: int, present: int) -> int:
        """Tiles per batch for ``present`` categories, ``default`` being ``data.batch_size``."""
        if self.config.samples_per_category:
            return self.config.samples_per_category * present
        return self.config.batch_size or default

    @hookimpl
    def batch_plan(
        self, dataset: Any, indices: np.ndarray, epoch: int, ctx: RunContext
    ) -> list[np.ndarray]:
        categories = self.category_indices(ctx.terrains)
        pools = category_pools(dataset.terrains, indices, categories)
        if not pools:
            present = sorted({ctx.terrains[t] for t in np.unique(dataset.terrains[indices])})
            chosen = [ctx.terrains[index] for index in categories]
            raise ConfigError(
                f"epoch {epoch}: none of plugins.stratified.categories "
                f"{chosen} has tiles this epoch (present: {present})"
            )
        batch_size = self.batch_size(ctx.config.data.batch_size, len(pools))
        plan = plan_batches(pools, batch_size, ctx.config.run.seed, epoch, self.config.epoch_length)
        return list(plan)
