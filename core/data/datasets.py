"""What every task's datasets share: bookkeeping of skipped input files, and the seeded
train/validation split per domain."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from core.errors import DataError

T = TypeVar("T", bound=tuple)
D = TypeVar("D", bound=Any)
"""A dataset with a ``terrains`` array (one domain label per sample) and ``subset(indices)``."""


class SkippedFiles:
    """Bad input files: with ``strict`` the first raises; otherwise each is skipped with a
    warning and listed in ``entries`` as ``(path, reason)`` (the run's ``summary.json``)."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.entries: list[tuple[str, str]] = []

    def add(self, path: Path, error: DataError) -> None:
        if self.strict:
            raise error
        warnings.warn(f"skipping {error}", stacklevel=3)
        self.entries.append((str(path), str(error)))

    def keep_common_shape(self, loaded: list[T], shape_of: Callable[[T], tuple]) -> list[T]:
        """The items of the most common shape; the others are bad input (``item[0]`` is the
        path): one dataset stacks one tile shape."""
        common = Counter(shape_of(item) for item in loaded).most_common(1)[0][0]
        kept = []
        for item in loaded:
            if shape_of(item) != common:
                self.add(
                    item[0],
                    DataError(
                        f"{item[0]}: shape {shape_of(item)} differs from {common} of most "
                        "files; one dataset needs one tile shape"
                    ),
                )
            else:
                kept.append(item)
        return kept


def train_val_split(
    dataset: D, val_fraction: float, seed: int
) -> tuple[D, D]:
    """Split per domain (``dataset.terrains``) so validation covers every domain with at
    least two samples; ``dataset.subset(indices)`` makes each part.

    Each terrain gives ``round(val_fraction * n)`` tiles to validation, at least one and at
    most ``n - 1``; a terrain with a single tile keeps it for training. Same seed, same split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for terrain in np.unique(dataset.terrains):
        members = np.flatnonzero(dataset.terrains == terrain)
        if len(members) < 2:
            continue
        n_val = min(max(round(val_fraction * len(members)), 1), len(members) - 1)
        val.extend(rng.permutation(members)[:n_val].tolist())
    is_val = np.zeros(len(dataset), dtype=bool)
    is_val[val] = True
    return dataset.subset(np.flatnonzero(~is_val)), dataset.subset(np.flatnonzero(is_val))
