"""The experiment's statistics: exact sign-flip and sign tests, intervals over seeds and
tiles, one primary endpoint per question, the power at the corrected level, and which
terrain carries each measure."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from core.experiment import build_experiment, build_parser, main, markdown, summarise
from core.experiment.report import censored_median, primary_column
from core.experiment.stats import (
    adjust,
    corrected_level,
    detectable_change,
    hierarchical_bootstrap,
    paired_test,
    sign_flip_p,
    sign_test_p,
    smallest_p,
)
from core.experiment.summary import (
    REGION_GAIN,
    REGION_SPREAD,
    column_names,
    domain_shares,
    region_gains,
)
from core.tasks import TileMetric, get_task
from tests.test_experiment import synthetic_rows

DEM = get_task("dem_sr")
RMSE = TileMetric("sq_err_m2", "pixels", root=True)


@pytest.mark.parametrize("n", [3, 5, 8, 12])
def test_the_sign_flip_test_is_scipys_exact_permutation_test(n: int):
    diffs = np.random.default_rng(n).normal(0.3, 1.0, n)
    exact = stats.permutation_test(
        (diffs,),
        lambda x, axis: np.mean(x, axis=axis),
        permutation_type="samples",
        n_resamples=np.inf,
        vectorized=True,
    )
    assert sign_flip_p(diffs) == pytest.approx(exact.pvalue, rel=1e-12)
    assert sign_flip_p(np.full(n, 0.5)) == smallest_p(n, "signflip") == 2 / 2**n
    equal = paired_test(dict.fromkeys(range(n), 1.5), dict.fromkeys(range(n), 1.0))
    assert equal.p == 2 / 2**n and equal.std == 0  # no spread: the smallest p, not 0


def test_above_twenty_seeds_the_sign_flip_test_draws_patterns():
    """25 seeds: 100,000 random sign patterns, seeded, so the same p every time; with
    normal differences it agrees with the t-test's p (the draws' error is about 0.002)."""
    diffs = np.random.default_rng(0).normal(0.5, 1.0, 25)
    p = sign_flip_p(diffs)
    assert p == sign_flip_p(diffs)
    assert p == pytest.approx(stats.ttest_1samp(diffs, 0).pvalue, abs=0.01)


def test_the_sign_test_counts_a_censored_run_as_the_later():
    arm = {0: 10, 1: None, 2: 30, 3: None, 4: 20}
    base = {0: 20, 1: 40, 2: 40, 3: None, 4: 30}
    # arm earlier in seeds 0, 2, 4; later in 1 (never); seed 3 a tie: 1 of 4, binomial
    assert sign_test_p(arm, base) == pytest.approx(stats.binomtest(1, 4).pvalue)
    assert sign_test_p({0: None}, {0: 10}) is None  # one pair


def test_the_power_at_the_corrected_level():
    """(z[1 - level/2] + z[0.8]) sd / sqrt(n): at 0.05, 2.80 sd / sqrt(n); Holm over 4
    questions puts the first test at 0.0125, which needs 3.34 sd / sqrt(n)."""
    assert detectable_change(1.0, 1, 0.05) == pytest.approx(1.959964 + 0.841621, rel=1e-6)
    assert detectable_change(2.0, 16, 0.0125) == pytest.approx(
        (2.497705 + 0.841621) * 2 / 4, rel=1e-6
    )
    assert corrected_level(0.05, 4, "holm") == corrected_level(0.05, 4, "bh") == 0.0125
    assert corrected_level(0.05, 4, "none") == 0.05


def tiles(effect: np.ndarray, regions: list[str] | None = None) -> dict[str, np.ndarray]:
    """val_tiles columns of 8 tiles, 100 pixels each, whose squared error is ``effect``^2."""
    count = len(effect)
    return {
        "tile": np.array([f"t{i}" for i in range(count)]),
        "terrain": np.array(["flat", "extreme"] * (count // 2)),
        "region": np.array(regions or [""] * count),
        "sq_err_m2": np.square(effect) * 100,
        "pixels": np.full(count, 100.0),
    }


def test_the_bootstrap_over_seeds_and_tiles():
    base = np.full(8, 2.0)
    same = {s: tiles(base) for s in range(5)}
    assert hierarchical_bootstrap(same, same, RMSE) == (0.0, 0.0)
    # an arm that helps some tiles and hurts others, the same way in every seed: the seeds
    # see no spread at all, the tiles a wide one around the mean change
    mixed = base + np.array([-1.0, 1.0, -0.8, 0.9, -1.2, 1.1, -0.9, 1.0])
    arm = {s: tiles(mixed) for s in range(5)}
    low, high = hierarchical_bootstrap(arm, same, RMSE)
    change = math.sqrt(np.mean(np.square(mixed))) - 2.0
    assert low < change < high and high - low > 0.2
    # the extreme tiles alone: every one of them is worse
    low, high = hierarchical_bootstrap(arm, same, RMSE, domain="extreme")
    assert low > 0
    # two landscapes, one helped and one hurt: resampling whole regions draws all-help or
    # all-hurt sets, far wider than resampling the tiles
    regions = ["a", "b"] * 4
    by_region = {s: tiles(mixed, regions) for s in range(5)}
    base_regions = {s: tiles(base, regions) for s in range(5)}
    wide = hierarchical_bootstrap(by_region, base_regions, RMSE)
    assert wide[1] - wide[0] > 1.5 * (high - low)
    other = {s: {**tiles(base), "tile": np.array([f"u{i}" for i in range(8)])} for s in range(5)}
    assert hierarchical_bootstrap(arm, other, RMSE) is None  # not the same validation tiles


def primaries(tmp_path: Path, seeds: int) -> tuple:
    """Arms a, b and c against the baseline, b deciding on slope RMSE; a sham control."""
    path = tmp_path / "spec.toml"
    path.write_text(
        f"seeds = {list(range(seeds))}\nprimary = 'val_rmse_m'\n[[arms]]\nname = 'baseline'\n"
        "[[arms]]\nname = 'a'\n[[arms]]\nname = 'b'\nprimary = 'val_slope_rmse_deg'\n"
        "[[arms]]\nname = 'c'\n"
        "[[arms]]\nname = 'sham'\ncontrol = 'sham'\n"
    )
    experiment = build_experiment(build_parser().parse_args(["--config", str(path), "--out", "x"]))
    wobble = [0.03, -0.02, 0.01, -0.04, 0.02, 0.0, -0.01, 0.015, -0.005, 0.025]
    shift = {"baseline": 0.0, "a": -0.5, "b": 0.05, "c": -0.005, "sham": 0.0}
    runs = {
        arm: {s: synthetic_rows(10.0 + s + shift[arm] + wobble[s] * (arm != "baseline"))
              for s in range(seeds)}
        for arm in shift
    }  # fmt: skip
    summary = summarise(experiment, runs, DEM.report_metrics, DEM.terrains, "bicubic")
    return experiment, summary


def test_each_question_is_decided_on_its_primary_endpoint(tmp_path: Path):
    """Three questions: Holm over their three primary tests alone (level 0.05 / 3), the
    power figure at that level, and verdicts that say what the test can and cannot say."""
    experiment, summary = primaries(tmp_path, seeds=10)
    assert summary.questions == {"a": "val_rmse_m", "b": "val_slope_rmse_deg", "c": "val_rmse_m"}
    assert summary.level == pytest.approx(0.05 / 3)
    a, b, c = (summary.stats[arm] for arm in ("a", "b", "c"))
    family = [a["paired_p"]["val_rmse_m"], b["paired_p"]["val_slope_rmse_deg"]]
    family.append(c["paired_p"]["val_rmse_m"])
    assert [
        a["adjusted_p"]["val_rmse_m"],
        b["adjusted_p"]["val_slope_rmse_deg"],
        c["adjusted_p"]["val_rmse_m"],
    ] == pytest.approx(adjust(family, "holm"))
    spread = b["paired_diff_std"]["val_slope_rmse_deg"]
    assert b["detectable_80"]["val_slope_rmse_deg"] == pytest.approx(
        detectable_change(spread, 10, 0.05 / 3)
    )
    assert a["detectable_80"]["val_slope_rmse_deg"] is None  # not a's question
    assert summary.stats["sham"]["primary"]["val_rmse_m"] is None  # a control asks none
    text = markdown(experiment, summary, primary_column(DEM.report_metrics))
    rows = text.split("## Questions")[1].split("##")[0]
    assert "| `a` | val RMSE (m) | -0.497 (-3.43 %) | [-0.513, -0.482] | – |" in rows
    assert "**better**" in rows and "**worse**" in rows  # b: slope RMSE up 0.36 %
    assert "| `b` | val slope RMSE (°) |" in rows and "holds 3 tests" in rows
    assert "| no difference shown |" in rows.split("| `c` |")[1]  # 0.005 m in 0.02 m noise
    _, five = primaries(tmp_path, seeds=5)
    text = markdown(experiment, five, primary_column(DEM.report_metrics))
    assert "cannot be decided: with 5 seeds the smallest p is 0.0625" in text


def test_a_primary_endpoint_that_is_no_column_exits_2(procedural_dir: Path, tmp_path: Path, capsys):
    path = tmp_path / "spec.toml"
    path.write_text("[[arms]]\nname = 'baseline'\n[[arms]]\nname = 'a'\nprimary = 'rmse'\n")
    out = tmp_path / "exp"
    assert main(["--config", str(path), "--out", str(out), "--data", str(procedural_dir)]) == 2
    err = capsys.readouterr().err
    assert "arm 'a': primary 'rmse' is not a tested column of task 'dem_sr'" in err
    assert "val_rmse_m" in err and not out.exists()


def test_which_terrain_carries_each_measure():
    """Shares from a run's last row and its tiles: windows, training loss (windows x mean
    loss), validation tiles, val_loss and the squared error behind val RMSE."""
    row = {
        "epoch": 1,
        "terrain_counts": {"flat": 30, "extreme": 10},
        "train_loss_by_terrain": {"flat": 0.9, "extreme": 0.3},
    }
    columns = {**tiles(np.array([0.5, 4.0, 0.5, 2.0])), "loss": np.array([0.8, 0.1, 0.9, 0.2])}
    shares = domain_shares([row], columns, DEM.report_metrics[0])
    assert shares["training windows"] == {"flat": 0.75, "extreme": 0.25}
    assert shares["training loss"] == pytest.approx({"flat": 27 / 30, "extreme": 3 / 30})
    assert shares["validation tiles"] == {"extreme": 0.5, "flat": 0.5}
    assert shares["val_loss"] == pytest.approx({"flat": 0.85, "extreme": 0.15})
    squared = shares["val RMSE (m): sq_err_m2"]
    assert squared == pytest.approx({"flat": 0.5 / 20.5, "extreme": 20 / 20.5})


def test_a_censored_median_counts_never_as_the_latest():
    assert censored_median([30, 10, 20]) == 20
    assert censored_median([30, None, 10]) == 30  # one of three never got there
    assert censored_median([10, None]) == math.inf  # half never did: the median is never
    assert censored_median([10, 20, 30, 40]) == 25


def with_bicubic(effect: np.ndarray, bicubic: np.ndarray, regions: list[str]) -> dict:
    """:func:`tiles` with bicubic's RMSE per tile, as dem_sr writes it."""
    return {**tiles(effect, regions), "bicubic_rmse_m": bicubic}


def test_the_spread_of_the_regions_gain_over_bicubic(tmp_path: Path):
    """Per region, the RMSE and bicubic's each pooled over its tiles' pixels, the gain in % of
    bicubic's; the spread is the sample standard deviation of the regions' gains."""
    rmse = np.array([1.0, 3.0, 2.0, 2.0, 5.0, 0.0])
    columns = with_bicubic(
        rmse,
        np.array([2.0, 4.0, 2.0, 4.0, 5.0, np.nan]),  # the last tile had no valid pixel
        ["a", "a", "b", "c", "c", "d"],
    )
    columns["pixels"] = np.array([100.0, 100.0, 100.0, 300.0, 100.0, 0.0])
    columns["sq_err_m2"] = np.square(rmse) * columns["pixels"]
    gains = region_gains(columns, DEM.report_metrics[0])
    pooled_c = math.sqrt((300 * 4 + 100 * 25) / 400) / math.sqrt((300 * 16 + 100 * 25) / 400)
    expected = {
        "a": 100 * (1 - math.sqrt(5 / 10)),
        "b": 0.0,
        "c": 100 * (1 - pooled_c),
    }  # region d: no valid pixel, no gain
    assert gains == pytest.approx(expected)
    # in the report: a headline column, a possible primary endpoint, tested over seeds
    assert REGION_SPREAD in column_names(DEM.report_metrics, DEM.terrains)
    path = tmp_path / "spec.toml"
    path.write_text("seeds = [0, 1, 2]\n[[arms]]\nname = 'baseline'\n[[arms]]\nname = 'a'\n")
    experiment = build_experiment(build_parser().parse_args(["--config", str(path), "--out", "x"]))
    runs = {arm: {s: synthetic_rows(10.0) for s in range(3)} for arm in ("baseline", "a")}
    even = with_bicubic(np.full(4, 1.0), np.full(4, 2.0), ["a", "b", "a", "b"])
    per_run = {"baseline": {s: columns for s in range(3)}, "a": {s: even for s in range(3)}}
    summary = summarise(experiment, runs, DEM.report_metrics, DEM.terrains, "bicubic", per_run)
    spread = summary.per_seed["baseline"][0][REGION_SPREAD]
    assert spread == pytest.approx(np.std(list(expected.values()), ddof=1))
    assert summary.per_seed["a"][1][REGION_SPREAD] == 0.0  # both regions gain 50 %
    assert summary.stats["a"]["paired_diff_mean"][REGION_SPREAD] == pytest.approx(-spread)
    assert summary.per_seed["bicubic"][0].get(REGION_SPREAD) is None  # the reference's own
    one_region = with_bicubic(np.full(4, 1.0), np.full(4, 2.0), ["a"] * 4)
    alone = summarise(
        experiment, runs, DEM.report_metrics, DEM.terrains, "bicubic",
        {"a": {0: one_region}},
    )  # fmt: skip
    assert alone.per_seed["a"][0][REGION_SPREAD] is None  # one region has no spread
    assert alone.per_seed["a"][1][REGION_SPREAD] is None  # no val_tiles.csv.gz
    assert "spread of the regions' gain (pp)" in markdown(
        experiment, summary, primary_column(DEM.report_metrics)
    )


def test_which_region_carries_the_pooled_metric():
    """The baseline's regions, averaged over its seeds: shares of the tiles, of val_loss and
    of the squared error behind the pooled RMSE, with each region's gain over bicubic; one
    region of large errors carries the pooled metric whatever its number of tiles, and the
    report's table says so. A seed without a region's tiles leaves that region's gain to the
    others; tiles that are each their own region (a tile folder's files) give no table."""
    rmse = np.array([1.0, 1.0, 1.0, 10.0])
    first = with_bicubic(rmse, np.array([2.0, 2.0, 2.0, 8.0]), ["a", "a", "a", "b"])
    first["loss"] = np.array([0.1, 0.1, 0.1, 0.7])
    second = with_bicubic(rmse, np.array([4.0, 4.0, 4.0, 8.0]), ["a", "a", "a", "c"])
    second["loss"] = np.array([0.1, 0.1, 0.1, 0.7])
    args = ["--arms", "baseline;a", "--seeds", "0,1", "--out", "x"]
    experiment = build_experiment(build_parser().parse_args(args))
    runs = {arm: {s: synthetic_rows(10.0) for s in range(2)} for arm in ("baseline", "a")}
    per_run = {"baseline": {0: first, 1: second}}
    summary = summarise(experiment, runs, DEM.report_metrics, DEM.terrains, "bicubic", per_run)
    shares = summary.region_shares
    assert shares["validation tiles"] == {"a": 0.75, "b": 0.125, "c": 0.125}  # b, c: one seed
    assert shares["val_loss"] == pytest.approx({"a": 0.3, "b": 0.35, "c": 0.35})
    squared = shares["val RMSE (m): sq_err_m2"]
    assert squared == pytest.approx({"a": 300 / 10300, "b": 5e3 / 10300, "c": 5e3 / 10300})
    # a: 1 m against 2 and 4 m; b and c each from their own seed alone, not halved by a zero
    assert shares[REGION_GAIN] == pytest.approx({"a": 62.5, "b": -25.0, "c": -25.0})
    text = markdown(experiment, summary, primary_column(DEM.report_metrics))
    assert "## Which region carries each measure (`baseline`)" in text
    assert "| a | 75.0 | 30.0 | 2.9 | +62.5 |" in text  # tiles, val_loss, squared error, gain
    own = with_bicubic(rmse, np.full(4, 2.0), ["t0", "t1", "t2", "t3"])
    alone = summarise(
        experiment, runs, DEM.report_metrics, DEM.terrains, "bicubic", {"baseline": {0: own}}
    )
    assert alone.region_shares == {}
    assert "Which region" not in markdown(experiment, alone, primary_column(DEM.report_metrics))
