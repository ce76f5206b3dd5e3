"""docs/results/world-experiment.toml and the weight search behind its ``terrain_weights``
arm (docs/results/world-tuning/): what their comments and README promise."""

from __future__ import annotations

import csv
import gzip
import math
import statistics
from pathlib import Path

import pytest

from core.config import Config, load_config
from core.experiment import build_experiment, build_parser, check_arms
from core.experiment.report import write_report
from core.experiment.spec import Experiment, run_overrides
from core.experiment.summary import check_primaries
from core.tasks import get_task
from core.tasks.dem_sr.data.world import VALIDATION
from core.tasks.dem_sr.losses import COMPONENTS

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
WORLD = RESULTS / "world-experiment.toml"
TUNING = RESULTS / "world-tuning"
TUNING_REGIONS = (
    "san_joaquin_valley",
    "sierra_foothills",
    "yosemite_high_country",
    "fish_lake_valley",
    "yosemite_valley",
)
DEM = get_task("dem_sr")


def experiment_of(path: Path) -> Experiment:
    return build_experiment(build_parser().parse_args(["--config", str(path), "--out", "x"]))


def arm_config(experiment: Experiment, name: str, tmp_path: Path) -> Config:
    arm = next(arm for arm in experiment.arms if arm.name == name)
    return load_config(None, run_overrides(experiment, arm, experiment.seeds[0], tmp_path))


def test_the_world_experiment_asks_each_question_on_held_out_landscapes(tmp_path: Path):
    world = experiment_of(WORLD)
    check_arms(world, tmp_path)
    check_primaries(world, DEM.report_metrics, DEM.terrains)  # every primary is a column
    config = arm_config(world, "baseline", tmp_path)
    # the source's own held-out landscapes (world.VALIDATION), not a list of the file's
    assert config.data.source == "world" and not config.data.val_regions
    assert world.epochs * config.train.max_steps_per_epoch >= 3 * 480
    assert config.train.validate_every_steps > 0 and len(world.seeds) >= 10
    assert {arm.control for arm in world.arms} == {None, "sham", "frozen", "unstable"}
    assert world.control("sham").seed_offset > 0
    assert arm_config(world, "frozen", tmp_path).optim.lr == 0
    unstable = arm_config(world, "unstable", tmp_path).optim
    steps = world.epochs * config.train.max_steps_per_epoch
    assert unstable.schedule == "constant" and all(s < steps for s in unstable.lr_spike_steps)
    assert {arm.name: arm.primary for arm in world.questions()} == {
        "stratified": "probe_rise",
        "curriculum": "val_auc",
        "terrain_loss": "val_rmse_m_extreme",
        "terrain_embedding": "val_rmse_m_extreme",
        "balanced_grad": "val_rmse_m",
        "pcgrad": "val_rmse_m",
        "terrain_weights": "val_rmse_m",
        "global_scale": "val_rmse_m",
    }
    scale = arm_config(world, "global_scale", tmp_path).data
    assert scale.normalisation == "global" and scale.global_scale_m == 100.0


def weights_of(config: Config) -> dict[str, float]:
    """Each terrain's weight: its ``terrain_loss`` profile is that weight times the [loss]
    base weights, every component alike."""
    found = {}
    for terrain, profile in config.plugins["terrain_loss"]["profiles"].items():
        ratios = [profile[c] / getattr(config.loss, c) for c in COMPONENTS]
        assert ratios == pytest.approx([ratios[0]] * len(COMPONENTS), rel=1e-9), terrain
        found[terrain] = ratios[0]
    return found


def test_the_weights_are_the_documented_family_and_the_chosen_one_is_in_the_experiment(
    tmp_path: Path,
):
    """w_t = s_t^-gamma scaled to a mean of 1 over the training windows, from the shares of
    the baseline's training loss that tuning.toml and the README give; 3 significant
    digits in the files."""
    losses = {"flat": 0.5312, "moderate": 0.2870, "alpine": 0.1193, "desert": 0.1906}
    losses["extreme"] = 0.0934
    windows = {"flat": 1499, "moderate": 3166, "alpine": 636, "desert": 173, "extreme": 65}
    total = sum(windows[t] * losses[t] for t in windows)
    shares = {t: windows[t] * losses[t] / total for t in windows}
    tuning = experiment_of(TUNING / "tuning.toml")
    check_arms(tuning, tmp_path)
    for gamma in ("0.25", "0.5", "1"):
        raw = {t: shares[t] ** -float(gamma) for t in windows}
        scale = sum(windows[t] * raw[t] for t in windows) / sum(windows.values())
        expected = {t: raw[t] / scale for t in windows}
        # 3 significant digits: a relative rounding of at most 0.5 / 100
        assert weights_of(arm_config(tuning, f"gamma{gamma}", tmp_path)) == pytest.approx(
            expected, rel=5e-3
        )
    world = experiment_of(WORLD)
    chosen = arm_config(tuning, "gamma0.25", tmp_path).plugins
    assert arm_config(world, "terrain_weights", tmp_path).plugins == chosen
    # the search kept the experiment's held-out landscapes out of its training and scored
    # other ones, with other seeds
    regions = arm_config(tuning, "baseline", tmp_path).data.val_regions
    assert set(regions) == {*VALIDATION, *TUNING_REGIONS} and not set(VALIDATION) & set(
        TUNING_REGIONS
    )
    assert not set(tuning.seeds) & set(world.seeds)


def pooled_rmse(rows: list[dict[str, str]]) -> float:
    pixels = sum(float(row["pixels"]) for row in rows)
    return math.sqrt(sum(float(row["sq_err_m2"]) for row in rows) / pixels)


def test_the_tuning_scores_follow_from_the_kept_tiles_of_the_tuning_landscapes():
    with open(TUNING / "scores.csv", newline="") as handle:
        scores = list(csv.DictReader(handle))
    assert {row["arm"] for row in scores} == {"baseline", "gamma0.25", "gamma0.5", "gamma1"}
    for row in scores:
        path = TUNING / "per-run" / row["arm"] / f"seed{row['seed']}" / "tuning_tiles.csv.gz"
        with gzip.open(path, "rt", newline="") as handle:
            tiles = list(csv.DictReader(handle))
        assert {tile["region"] for tile in tiles} == set(TUNING_REGIONS)  # nothing else kept
        assert len(tiles) == int(row["tiles"]) == 381
        assert float(row["rmse_m"]) == pytest.approx(pooled_rmse(tiles), rel=1e-12)
        flat = [tile for tile in tiles if tile["terrain"] == "flat"]
        assert float(row["rmse_m_flat"]) == pytest.approx(pooled_rmse(flat), rel=1e-12)
    means = {
        arm: statistics.fmean(float(row["rmse_m"]) for row in scores if row["arm"] == arm)
        for arm in {row["arm"] for row in scores}
    }
    assert min(means, key=means.get) == "gamma0.25"  # the declared rule: the lowest mean


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_committed_report_is_the_committed_runs(tmp_path: Path):
    """docs/results/README.md: the report rebuilt from world/runs/ (every run's config,
    summary, per-tile errors and metrics) has the committed tables, results.md byte for byte
    and results.csv to the float sums' last bits; every arm has its 10 seeds of 1440 steps,
    and the baseline validates on the 13 held-out landscapes."""
    archive = RESULTS / "world" / "runs"
    args = ["--config", str(WORLD), "--out", str(archive)]
    experiment = build_experiment(build_parser().parse_args(args))
    summary = write_report(experiment, archive, tmp_path)
    assert (tmp_path / "results.md").read_text() == (RESULTS / "world" / "results.md").read_text()
    rebuilt, committed = (
        read_csv(folder / "results.csv") for folder in (tmp_path, RESULTS / "world")
    )
    assert [row.keys() for row in rebuilt] == [row.keys() for row in committed]
    for new, old in zip(rebuilt, committed, strict=True):
        for key, value in old.items():
            try:
                # the bootstrap's float sums may differ in their last bits between machines
                # (numpy's pairwise summation follows memory alignment): ulps, not digits
                assert float(new[key]) == pytest.approx(float(value), rel=1e-9, abs=1e-12)
            except ValueError:  # names, and empty cells
                assert new[key] == value, (old["arm"], old["seed"], key)
    assert summary.complete_runs == 120
    for arm in experiment.arms:
        assert sorted(summary.per_seed[arm.name]) == list(range(10)), arm.name
        assert {run["steps"] for run in summary.per_seed[arm.name].values()} == {1440}
    assert set(summary.region_shares["validation tiles"]) == set(VALIDATION)
