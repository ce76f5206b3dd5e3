"""Curriculum learning (seed §4 B): easy terrain first, harder categories join over the run.

Two schedules pick the epoch's active terrains:

- ``phases`` (default): the seed's table. Each phase starts at an epoch of a reference run
  (default 200 epochs, the seed's) or at a fraction of the run, and lasts until the next
  phase starts (the seed writes ``[1, 50], [50, 100]`` but its code uses ``start <= epoch <
  end``: epoch 50 is phase 2). Starts are scaled to the run through its progress
  ``p(e) = (e - 1) / (T - 1)``: 0 at the first epoch, 1 at the last, so a 200-epoch run
  starts phases at exactly 1, 50, 100, 150, epoch 1 is always in phase 1 and the last epoch
  always in the last phase.
- ``linear``, ``root``, ``step``: a competence ``c`` grows from ``c0`` to 1 over the first
  ``ramp`` of the run and the first ``floor(c * K)`` categories of ``order`` (at least one)
  are active; ``c0 = 0.4`` and ``ramp = 0.75`` with ``linear`` give the seed's quarters.

The plugin only filters the epoch's indices (``epoch_indices``), so the trainer's
``active_terrains`` metric shows the active set and a batch sampler such as ``stratified``
draws from it. A phase whose terrains have no tiles is widened to the next phase (with one
warning), so an epoch is never empty.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from core import validators as check
from core.context import RunContext
from core.errors import ConfigError
from core.hookspecs import hookimpl
from core.plugins import Plugin
from core.tasks.dem_sr.terrain import TERRAINS, terrain_index

ALL = "all"
SCHEDULES = ("phases", "linear", "root", "step")
PHASE_UNITS = ("epoch", "fraction")


def _phase_terrains(_: Any, attribute: attrs.Attribute, names: list[str]) -> None:
    if not names:
        raise ValueError("a curriculum phase must name at least one terrain (or 'all')")
    unknown = [name for name in names if name != ALL and name not in TERRAINS]
    if unknown:
        raise ValueError(f"unknown terrain {unknown[0]!r}; expected 'all' or one of {TERRAINS}")


@attrs.frozen
class Phase:
    """From ``start`` (an epoch or a fraction, see ``phase_unit``) on, train on ``terrains``."""

    start: float = attrs.field(validator=check.non_negative)
    terrains: list[str] = attrs.field(validator=_phase_terrains)


def seed_phases() -> list[Phase]:
    """The seed's table, ``(start, end)`` pairs ``(1, 50), (50, 100), (100, 150), (150, 200)``."""
    return [
        Phase(1, ["flat", "moderate"]),
        Phase(50, ["flat", "moderate", "alpine"]),
        Phase(100, ["flat", "moderate", "alpine", "desert"]),
        Phase(150, [ALL]),
    ]


def _order(_: Any, attribute: attrs.Attribute, names: list[str]) -> None:
    if sorted(names) != sorted(TERRAINS):
        raise ValueError(f"order must list each of {TERRAINS} once, easiest first; got {names}")


@attrs.frozen
class CurriculumConfig:
    """``[plugins.curriculum]``."""

    schedule: str = attrs.field(default="phases", validator=attrs.validators.in_(SCHEDULES))
    """``phases`` (the table below), or a pacing function: ``linear``, ``root``, ``step``."""
    phases: list[Phase] = attrs.field(factory=seed_phases)
    phase_unit: str = attrs.field(default="epoch", validator=attrs.validators.in_(PHASE_UNITS))
    """``epoch``: ``start`` is an epoch of a ``reference_epochs`` run; ``fraction``: of p(e)."""
    reference_epochs: int = attrs.field(default=200, validator=check.non_negative_int)
    """The run length the phase epochs are written for (scaled to the run); 0: the run's own."""
    order: list[str] = attrs.field(factory=lambda: list(TERRAINS), validator=_order)
    """Difficulty order for the pacing schedules, easiest first."""
    c0: float = attrs.field(default=0.4, validator=[attrs.validators.gt(0), attrs.validators.le(1)])
    """Initial competence of the pacing schedules."""
    ramp: float = attrs.field(
        default=0.75, validator=[attrs.validators.gt(0), attrs.validators.le(1)]
    )
    """Fraction of the run (of p(e)) after which competence is 1."""

    def __attrs_post_init__(self) -> None:
        starts = [phase.start for phase in self.phases]
        first = 1 if self.phase_unit == "epoch" else 0
        if not starts or starts[0] != first:
            raise ValueError(f"the first phase must start at {first} ({self.phase_unit})")
        if any(b <= a for a, b in itertools.pairwise(starts)):
            raise ValueError(f"phase starts must increase: {starts}")
        if self.phase_unit == "fraction" and starts[-1] >= 1:
            raise ValueError(f"phase fractions must lie in [0, 1): {starts}")
        if self.phase_unit == "epoch" and any(start != int(start) for start in starts):
            raise ValueError(f"phase epochs must be whole numbers: {starts}")
        if self.reference_epochs == 1 or self.reference_epochs < 0:
            raise ValueError("reference_epochs must be 0 (the run's length) or at least 2")


def progress(epoch: int, total_epochs: int) -> float:
    """``(e - 1) / (T - 1)``: 0 at the first epoch, 1 at the last (0 for a 1-epoch run)."""
    return (epoch - 1) / (total_epochs - 1) if total_epochs > 1 else 0.0


def phase_starts(config: CurriculumConfig, total_epochs: int) -> list[int]:
    """The first epoch of each phase in a ``total_epochs`` run (past the end: never reached).

    A phase starting at fraction ``f`` starts at the first epoch with ``p(e) >= f``; an
    epoch ``s`` of a reference run of ``R`` epochs is the fraction ``(s - 1) / (R - 1)``,
    computed in integers so that ``R == T`` gives ``s`` exactly.
    """
    if total_epochs == 1:  # p(1) = 0 reaches the first phase only
        return [1] + [2] * (len(config.phases) - 1)
    reference = config.reference_epochs or total_epochs
    starts = []
    for phase in config.phases:
        if config.phase_unit == "fraction":
            # round() first: 0.3 * 10 is 3.0000000000000004 in floating point
            starts.append(1 + math.ceil(round(phase.start * (total_epochs - 1), 9)))
        elif reference == total_epochs:
            starts.append(int(phase.start))
        else:
            numerator = (int(phase.start) - 1) * (total_epochs - 1)
            starts.append(1 + -(-numerator // (reference - 1)))
    return starts


def phase_index(config: CurriculumConfig, epoch: int, total_epochs: int) -> int:
    """The phase ``epoch`` trains in: the last one started by then."""
    starts = phase_starts(config, total_epochs)
    return max(i for i, start in enumerate(starts) if start <= epoch)


def phase_terrains(phase: Phase) -> list[int]:
    """The terrain indices a phase names, ``all`` expanded."""
    names = TERRAINS if ALL in phase.terrains else phase.terrains
    return sorted(terrain_index(name) for name in names)


def competence(schedule: str, p: float, c0: float, ramp: float) -> float:
    """Competence at progress ``p``: ``c0`` at 0, 1 from ``ramp`` on.

    ``linear`` grows evenly, ``root`` as ``sqrt`` (fast at first, Platanios et al. 2019),
    ``step`` stays at ``c0`` and jumps to 1 at ``ramp`` (Hacohen & Weinshall 2019).
    """
    t = min(1.0, p / ramp)
    if schedule == "linear":
        return c0 + (1 - c0) * t
    if schedule == "root":
        return math.sqrt(c0**2 + (1 - c0**2) * t)
    if schedule == "step":
        return 1.0 if t >= 1 else c0
    raise ValueError(f"unknown pacing schedule {schedule!r}; expected one of {SCHEDULES[1:]}")


def categories_for(c: float, order: Sequence[str]) -> int:
    """How many categories of ``order`` competence ``c`` admits: ``floor(c * K)``, at least 1."""
    return max(1, math.floor(c * len(order) + 1e-9))


def candidate_sets(config: CurriculumConfig, epoch: int, total_epochs: int) -> list[list[int]]:
    """The epoch's active terrains, then ever wider sets to fall back on, ending with all.

    ``phases``: the epoch's phase, then its union with each later phase. Pacing: the first
    ``n`` categories of ``order``, then ``n + 1``, ... up to all of them.
    """
    if config.schedule == "phases":
        first = phase_index(config, epoch, total_epochs)
        sets, active = [], set()
        for phase in config.phases[first:]:
            active |= set(phase_terrains(phase))
            sets.append(sorted(active))
    else:
        c = competence(config.schedule, progress(epoch, total_epochs), config.c0, config.ramp)
        order = [terrain_index(name) for name in config.order]
        sets = [sorted(order[:n]) for n in range(categories_for(c, order), len(order) + 1)]
    return [*sets, list(range(len(TERRAINS)))]


class Curriculum(Plugin):
    """Trains on easy terrain first and adds harder categories in phases (seed §4 B).

    Mixing flat plains with canyons from the first step pulls the gradient in opposite
    directions; introducing categories from easy to hard lets the model learn elevation
    first and edges later. Filters ``epoch_indices``, so it composes with any batch sampler.
    """

    name = "curriculum"
    Config = CurriculumConfig

    def __init__(self, config: CurriculumConfig) -> None:
        super().__init__(config)
        self.warned: set[tuple[int, ...]] = set()

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        if tuple(ctx.terrains) != TERRAINS:
            raise ConfigError(
                f"plugin curriculum orders the DEM terrain categories {', '.join(TERRAINS)} "
                f"from easy to hard; task {ctx.task.name!r} has the domains "
                f"{', '.join(ctx.terrains)}, which it cannot rank"
            )

    @hookimpl
    def epoch_indices(self, indices: np.ndarray, epoch: int, ctx: RunContext) -> np.ndarray:
        labels = ctx.train_dataset.terrains[indices]
        sets = candidate_sets(self.config, epoch, ctx.total_epochs)
        for active in sets:
            keep = indices[np.isin(labels, active)]
            if len(keep):
                break
        if active != sets[0] and tuple(sets[0]) not in self.warned:
            self.warned.add(tuple(sets[0]))
            if ctx.accelerator.is_main_process:
                warnings.warn(
                    f"curriculum: no training tiles of {[TERRAINS[t] for t in sets[0]]} in "
                    f"epoch {epoch}; widened to {[TERRAINS[t] for t in active]}",
                    stacklevel=2,
                )
        if self.config.schedule == "phases":
            ctx.log("curriculum_phase", phase_index(self.config, epoch, ctx.total_epochs) + 1)
        else:
            p = progress(epoch, ctx.total_epochs)
            ctx.log(
                "curriculum_competence",
                competence(self.config.schedule, p, self.config.c0, self.config.ramp),
            )
        return keep
