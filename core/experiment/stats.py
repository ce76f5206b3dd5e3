"""The statistics of a comparison over seeds.

Arms are compared with the baseline seed by seed (paired): runs with the same seed validate on
the same tiles (``data.split_seed`` is fixed) and differ in initial weights and batch order, so
the paired differences cancel what the seeds share. The default test is the exact paired
sign-flip (permutation) test, which assumes no distribution of the differences; a family
correction (Holm or Benjamini-Hochberg) says which differences survive every test of the
family. The seed-level interval covers the seeds only; :func:`hierarchical_bootstrap` adds the
sampling of the validation tiles (or landscapes) to it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import attrs
import numpy as np
from scipy import stats

from core.tasks import TileMetric

EXACT_UP_TO = 20
"""Seeds up to which the sign-flip test enumerates all 2**n sign patterns (a million at 20);
above, it draws ``RANDOM_FLIPS`` patterns with a fixed seed."""
RANDOM_FLIPS = 100_000
BOOTSTRAP_RESAMPLES = 2000


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


def sign_flip_p(diffs: Sequence[float]) -> float:
    """Two-sided p-value of the paired sign-flip test of the mean difference: the share of
    the 2**n sign patterns (every one for n <= ``EXACT_UP_TO``) whose mean is at least as far
    from 0 as the observed one. Under the null hypothesis the sign of each seed's difference
    is a coin toss, so the test is exact whatever the differences' distribution; its
    smallest p is 2 / 2**n (0.0625 for 5 seeds, 0.002 for 10).

    The enumeration is built by doubling (every sum with +d and with -d), a million sums in
    milliseconds where ``scipy.stats.permutation_test`` takes seconds; above ``EXACT_UP_TO``
    it is scipy's, with random sign patterns.
    """
    values = np.asarray(diffs, dtype=np.float64)
    observed = abs(values.sum())
    tolerance = 1e-12 * np.abs(values).sum()  # sums in another order round differently
    if len(values) > EXACT_UP_TO:
        result = stats.permutation_test(
            (values,),
            lambda x, axis: np.mean(x, axis=axis),
            permutation_type="samples",
            n_resamples=RANDOM_FLIPS,
            vectorized=True,
            random_state=0,  # scipy 1.11 has no rng keyword yet
        )
        return float(result.pvalue)
    sums = np.zeros(1)
    for value in values:
        sums = np.concatenate([sums + value, sums - value])
    return float(np.mean(np.abs(sums) >= observed - tolerance))


def sign_test_p(
    values: Mapping[int, float | None], reference: Mapping[int, float | None]
) -> float | None:
    """Exact two-sided sign test of censored pairs (None: never reached, later than any
    value): a pair with one censored run has a known sign, two censored runs are a tie, and
    ties drop out. None below two untied pairs."""
    signs = []
    for seed in values.keys() & reference.keys():
        a, b = values[seed], reference[seed]
        a, b = math.inf if a is None else a, math.inf if b is None else b
        if a != b:
            signs.append(a > b)
    if len(signs) < 2:
        return None
    return float(stats.binomtest(sum(signs), len(signs), 0.5).pvalue)


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
    test: str = "signflip",
) -> Paired | None:
    """Paired sign-flip test (``signflip``, :func:`sign_flip_p`), t-test (``t``) or Wilcoxon
    signed-rank test (``wilcoxon``) of ``values - reference`` over the seeds both have, with
    the Student-t 95 % interval of the mean difference; None below two pairs.

    Differences that are all equal have no spread: p is 1 when they are all zero (the runs
    were identical) and 0 otherwise for the t-test, where scipy would return NaN; the
    sign-flip test gives its smallest p, 2 / 2**n, to equal non-zero differences.
    """
    seeds = [s for s in values if values[s] is not None and reference.get(s) is not None]
    diffs = np.array([float(values[s]) - float(reference[s]) for s in seeds])  # type: ignore[arg-type]
    if len(diffs) < 2 or not np.all(np.isfinite(diffs)):
        return None
    mean, spread = float(diffs.mean()), float(diffs.std(ddof=1))
    if spread == 0:
        p = 1.0 if mean == 0 else (sign_flip_p(diffs) if test == "signflip" else 0.0)
        return Paired(mean, 0.0, mean, mean, p, len(diffs))
    result = stats.ttest_1samp(diffs, 0.0)
    interval = result.confidence_interval(0.95)
    p = {
        "signflip": lambda: sign_flip_p(diffs),
        "t": lambda: float(result.pvalue),
        "wilcoxon": lambda: float(stats.wilcoxon(diffs).pvalue),
    }[test]()
    return Paired(mean, spread, float(interval.low), float(interval.high), p, len(diffs))


def smallest_p(n: int, test: str) -> float:
    """The smallest two-sided p a test of ``n`` paired seeds can give: 2 / 2**n for the
    sign-flip and the exact Wilcoxon test (every difference of one sign), 0 for the t-test."""
    return 0.0 if test == "t" else 2.0 / 2**n


def detectable_change(spread: float, n: int, level: float, power: float = 0.8) -> float:
    """The mean paired difference a two-sided test at ``level`` finds with ``power``, from the
    differences' standard deviation ``spread`` over ``n`` seeds (normal approximation:
    ``(z[1 - level/2] + z[power]) * spread / sqrt(n)``)."""
    z = stats.norm.ppf(1 - level / 2) + stats.norm.ppf(power)
    return float(z * spread / math.sqrt(n))


def corrected_level(alpha: float, family: int, method: str) -> float:
    """The level the family's smallest p must clear: ``alpha / family`` under Holm (its
    first step) and Benjamini-Hochberg (for one true effect among ``family``), ``alpha``
    without correction."""
    return alpha if method == "none" else alpha / max(1, family)


Tiles = Mapping[str, np.ndarray]
"""A run's ``val_tiles.csv.gz`` columns (``core.val_tiles.read_val_tiles``)."""


def hierarchical_bootstrap(
    values: Mapping[int, Tiles],
    reference: Mapping[int, Tiles],
    metric: TileMetric,
    domain: str | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> tuple[float, float] | None:
    """The 95 % percentile interval of the mean paired difference of ``metric`` (over the
    tiles of ``domain``, or all) when both the seeds and the validation tiles are resampled:
    each resample draws the seeds with replacement, and the clusters of tiles with
    replacement, the same clusters for every seed and both arms (they validate on the same
    tiles). The clusters are the tiles' regions (held-out landscapes; a tile read from its
    own file is a region of one), or the tiles themselves where no tile names one. None below
    two paired seeds, or where the runs did not validate on the same tiles.
    """
    seeds = sorted(values.keys() & reference.keys())
    if len(seeds) < 2:
        return None
    order = np.argsort(reference[seeds[0]]["tile"])
    names = reference[seeds[0]]["tile"][order]
    runs = []
    for tiles in (*(values[s] for s in seeds), *(reference[s] for s in seeds)):
        ordered = np.argsort(tiles["tile"])
        if not np.array_equal(tiles["tile"][ordered], names):
            return None
        runs.append({key: column[ordered] for key, column in tiles.items()})
    first = runs[0]
    inside = np.ones(len(names)) if domain is None else (first["terrain"] == domain) * 1.0
    regions = first.get("region")
    labels = regions if regions is not None and np.any(regions != "") else names
    clusters, cluster_of = np.unique(labels, return_inverse=True)
    numerators = np.stack([run[metric.numerator] * inside for run in runs])  # [2S, T]
    denominators = np.stack([run[metric.denominator] * inside for run in runs])
    rng = np.random.default_rng(0)
    uniform = np.full(len(clusters), 1 / len(clusters))
    tile_weights = rng.multinomial(len(clusters), uniform, size=resamples)[:, cluster_of]
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = metric.over(numerators @ tile_weights.T, denominators @ tile_weights.T)
    diffs = scores[: len(seeds)] - scores[len(seeds) :]  # [S, resamples]
    seed_weights = rng.multinomial(len(seeds), np.full(len(seeds), 1 / len(seeds)), resamples)
    means = np.einsum("bs,sb->b", seed_weights, diffs) / len(seeds)
    low, high = np.nanpercentile(means, [2.5, 97.5])
    return float(low), float(high)


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
