"""The statistics of a comparison over seeds, from scipy.stats.

Arms are compared with the baseline seed by seed (paired): runs with the same seed validate on
the same tiles (``data.split_seed`` is fixed) and differ in initial weights and batch order, so
the paired differences cancel what the seeds share. A table holds many such tests; a family
correction (Holm or Benjamini-Hochberg) says which differences survive them all.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import attrs
import numpy as np
from scipy import stats


@attrs.frozen
class Paired:
    """A paired comparison of one arm's per-seed values with the baseline's."""

    mean: float
    """Mean of the per-seed differences (arm - baseline)."""
    std: float
    low: float
    high: float
    """The 95 % confidence interval of the mean difference (Student's t)."""
    p: float
    """Two-sided p-value of the chosen test."""
    n: int


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (0 for one value) and count of the values present."""
    present = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not present:
        return None, None, 0
    spread = statistics.stdev(present) if len(present) > 1 else 0.0
    return statistics.fmean(present), spread, len(present)


def delta_pct(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return (value - reference) / reference * 100


def paired_test(
    values: Mapping[int, float | None],
    reference: Mapping[int, float | None],
    test: str = "t",
) -> Paired | None:
    """Paired t-test (``t``) or Wilcoxon signed-rank test (``wilcoxon``) of ``values -
    reference`` over the seeds both have; None below two pairs.

    Differences that are all equal have no spread: p is 1 when they are all zero (the runs
    were identical) and 0 otherwise, where scipy would return NaN.
    """
    seeds = [s for s in values if values[s] is not None and reference.get(s) is not None]
    diffs = np.array([float(values[s]) - float(reference[s]) for s in seeds])  # type: ignore[arg-type]
    if len(diffs) < 2 or not np.all(np.isfinite(diffs)):
        return None
    mean, spread = float(diffs.mean()), float(diffs.std(ddof=1))
    if spread == 0:
        p = 1.0 if mean == 0 else 0.0
        return Paired(mean, 0.0, mean, mean, p, len(diffs))
    result = stats.ttest_1samp(diffs, 0.0)
    interval = result.confidence_interval(0.95)
    p = float(result.pvalue) if test == "t" else float(stats.wilcoxon(diffs).pvalue)
    return Paired(mean, spread, float(interval.low), float(interval.high), p, len(diffs))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input's order."""
    order = np.argsort(p_values)
    adjusted = np.empty(len(p_values))
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, (len(p_values) - rank) * p_values[index])
        adjusted[index] = min(1.0, running)
    return adjusted.tolist()


def adjust(p_values: Sequence[float], method: str) -> list[float]:
    """Adjusted p-values for one table's family of tests: ``holm``, ``bh``
    (Benjamini-Hochberg, false discovery rate) or ``none``."""
    if not p_values or method == "none":
        return list(p_values)
    if method == "holm":
        return holm(p_values)
    return stats.false_discovery_control(np.asarray(p_values), method="bh").tolist()
