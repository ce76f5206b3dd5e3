"""Two measures of a rough run, whatever the task: one of the batches, one of the model.

**Batch-loss outliers** (``batch_loss_outliers`` in ``metrics.jsonl``): optimizer steps whose
training loss is far above the recent steps'. A step's loss is the loss of that step's batch,
so the count follows the batches' composition as much as the model: a frozen model fed the
same batches shows as many. It measures the spread of the batch losses, not an instability.

**Model spikes** (``model_spikes``): jumps of the loss on a fixed probe set of training
windows, evaluated every ``train.probe_every`` optimizer steps with the ``[loss]`` base
weights, before any plugin reweights it. The probe's windows never change, so the measure
moves only when the weights do: a frozen model shows none, whatever its batches, and a step
taken at a hundred times the learning rate shows one (``tests/test_experiment_nulls.py``).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import deque
from collections.abc import Sequence

import numpy as np


def batch_loss_outliers(
    losses: Sequence[float | None], window: int = 20, factor: float = 1.5
) -> list[int]:
    """Indices of the steps whose batch loss is an outlier among the recent ones.

    Step ``i`` is an outlier when its loss exceeds ``factor`` x the median of the last
    ``window`` finite losses before it, provided at least ``window // 2`` such losses exist
    (early steps have no baseline, so warm-up never counts). The median, unlike a mean, is not
    dragged up by an earlier outlier. A non-finite loss (the run blew up, written as null)
    counts once a baseline exists; it never enters the baseline.
    """
    history: deque[float] = deque(maxlen=window)
    outliers: list[int] = []
    for step, value in enumerate(losses):
        value = math.nan if value is None else float(value)
        finite = math.isfinite(value)
        if len(history) >= max(1, window // 2) and (
            not finite or value > factor * statistics.median(history)
        ):
            outliers.append(step)
        if finite:
            history.append(value)
    return outliers


def probe_indices(domains: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` indices into ``domains``, taken in turn from each domain present (a seeded
    order within each), so every domain has as many probe windows as it can."""
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(domains == d))) for d in np.unique(domains)]
    chosen: list[int] = []
    while len(chosen) < min(count, len(domains)):
        for pool in pools:
            if pool and len(chosen) < count:
                chosen.append(int(pool.pop(0)))
    return np.array(sorted(chosen), dtype=np.int64)


def probe_loss(losses: Sequence[float]) -> float:
    """The probe set's loss: the geometric mean of its windows' losses, so a rise of x % on
    every window is x % whatever each window's scale (per-window normalisation makes flat
    windows' losses ten times the steep ones'). Non-finite where any loss is."""
    values = np.asarray(losses, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        return math.inf
    return float(np.exp(np.log(np.maximum(values, 1e-12)).mean()))


def probe_jumps(values: Sequence[float | None]) -> list[float | None]:
    """The relative change of each probe loss against the one before (``None`` for the
    first, and after a non-finite one); a non-finite probe loss is an infinite jump."""
    jumps: list[float | None] = [None]
    for before, now in itertools.pairwise(values):
        if before is None or not math.isfinite(before):
            jumps.append(None)
        elif now is None or not math.isfinite(now):
            jumps.append(math.inf)
        else:
            jumps.append(now / before - 1)
    return jumps


def probe_rise(values: Sequence[float | None]) -> float:
    """The probe loss's total climb: the sum of its rises in log units (each fall counts 0).
    0 for a curve that only falls or stays flat; threshold-free, unlike the spike count."""
    jumps = [j for j in probe_jumps(values) if j is not None]
    return float(sum(math.log1p(j) for j in jumps if j > 0))
