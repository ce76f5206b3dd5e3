"""Loss spikes: the trainer's own measure of a rough run, whatever the task.

The seed's problem is "loss spikes when encountering hard terrain batches"; every run counts
them per epoch (``loss_spikes`` in ``metrics.jsonl``) and the experiment report plots them.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence


def spike_steps(losses: Sequence[float], window: int = 20, factor: float = 1.5) -> list[int]:
    """Indices of loss spikes: the seed's "loss spikes when encountering hard terrain batches".

    Step ``i`` is a spike when its loss exceeds ``factor`` x the median of the last ``window``
    finite losses before it, provided at least ``window // 2`` such losses exist (early steps
    have no baseline, so warm-up never counts). The median, unlike a mean, is not dragged up by
    an earlier spike. A non-finite loss (the run blew up) counts as a spike once a baseline
    exists; it never enters the baseline.
    """
    history: deque[float] = deque(maxlen=window)
    spikes: list[int] = []
    for step, value in enumerate(losses):
        value = float(value)
        finite = math.isfinite(value)
        if len(history) >= max(1, window // 2) and (
            not finite or value > factor * statistics.median(history)
        ):
            spikes.append(step)
        if finite:
            history.append(value)
    return spikes


def count_loss_spikes(losses: Sequence[float], window: int = 20, factor: float = 1.5) -> int:
    """Number of loss spikes, as defined by ``spike_steps``."""
    return len(spike_steps(losses, window, factor))
