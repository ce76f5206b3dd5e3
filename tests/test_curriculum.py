"""``curriculum``: the seed's phase table scaled to any run, fractions, pacing, fallback, and
composition with ``stratified`` in real training runs."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest

from core.errors import ConfigError
from core.hookspecs import hookimpl
from core.plugins import PluginManager
from core.tasks.dem_sr.terrain import TERRAINS, terrain_index
from plugins.samplers.curriculum import (
    ALL,
    Curriculum,
    CurriculumConfig,
    Phase,
    candidate_sets,
    categories_for,
    competence,
    phase_index,
    phase_starts,
    phase_terrains,
    progress,
)
from plugins.samplers.stratified import Stratified, StratifiedConfig

SEED_TABLE = [
    (1, 50, ["flat", "moderate"]),
    (50, 100, ["flat", "moderate", "alpine"]),
    (100, 150, ["flat", "moderate", "alpine", "desert"]),
    (150, 200, ["all"]),
]


def seed_active_terrain(epoch: int) -> list[str]:
    """The seed's ``CurriculumScheduler.get_active_terrain``, verbatim in logic."""
    for start, end, terrains in SEED_TABLE:
        if start <= epoch < end:
            return terrains
    return ["all"]


def names(phase: Phase) -> list[str]:
    return [TERRAINS[t] for t in phase_terrains(phase)]


def active(config: CurriculumConfig, epoch: int, total: int) -> list[str]:
    return [TERRAINS[t] for t in candidate_sets(config, epoch, total)[0]]


def expand(terrains: list[str]) -> list[str]:
    return list(TERRAINS) if ALL in terrains else terrains


def test_200_epochs_is_exactly_the_seeds_schedule():
    config = CurriculumConfig()
    assert phase_starts(config, 200) == [1, 50, 100, 150]
    for epoch in range(1, 201):
        assert active(config, epoch, 200) == expand(seed_active_terrain(epoch)), epoch


def test_any_run_length_follows_the_seed_at_the_same_progress():
    """Epoch e of a T-epoch run trains what the seed trains at reference epoch
    1 + (e - 1) * 199 / (T - 1): the first epoch is phase 1, the last is phase 4."""
    config = CurriculumConfig()
    for total in range(1, 301):
        for epoch in range(1, total + 1):
            at = Fraction(epoch - 1, total - 1) if total > 1 else Fraction(0)
            reference = math.floor(1 + at * 199)
            expected = expand(seed_active_terrain(reference))
            assert active(config, epoch, total) == expected, (epoch, total)
        assert active(config, 1, total) == ["flat", "moderate"]
        if total > 1:
            assert active(config, total, total) == list(TERRAINS)


def test_10_epochs_spread_all_four_phases_evenly():
    config = CurriculumConfig()
    phases = [phase_index(config, epoch, 10) for epoch in range(1, 11)]
    assert phases == sorted(phases) and phases[0] == 0 and phases[-1] == 3
    lengths = np.bincount(phases, minlength=4)
    assert lengths.min() >= 2 and lengths.max() - lengths.min() <= 1
    assert [active(config, e, 10) for e in (1, 10)] == [["flat", "moderate"], list(TERRAINS)]


def test_phase_epochs_equal_phase_fractions():
    """``start = s`` for a reference run of R epochs is the fraction (s - 1) / (R - 1)."""
    by_epoch = CurriculumConfig(reference_epochs=200)
    by_fraction = CurriculumConfig(
        phase_unit="fraction",
        phases=[Phase((p.start - 1) / 199, p.terrains) for p in by_epoch.phases],
    )
    for total in range(1, 120):
        assert phase_starts(by_epoch, total) == phase_starts(by_fraction, total), total


@pytest.mark.parametrize("total", [1, 2, 5, 10, 21, 101, 200, 201])
def test_fraction_phases_start_where_progress_reaches_them(total):
    config = CurriculumConfig(
        phase_unit="fraction",
        phases=[
            Phase(0, ["flat"]),
            Phase(0.3, ["flat", "desert"]),
            Phase(0.5, ["flat", "desert", "extreme"]),
        ],
    )
    fractions = [Fraction(0), Fraction(3, 10), Fraction(1, 2)]
    for epoch in range(1, total + 1):
        p = Fraction(epoch - 1, total - 1) if total > 1 else Fraction(0)
        expected = max(i for i, f in enumerate(fractions) if f <= p)
        assert phase_index(config, epoch, total) == expected
        assert progress(epoch, total) == float(p)


def test_reference_epochs_zero_uses_the_epochs_as_written():
    config = CurriculumConfig(reference_epochs=0)
    assert phase_starts(config, 60) == [1, 50, 100, 150]
    assert [phase_index(config, e, 60) for e in (49, 50, 60)] == [0, 1, 1]


@pytest.mark.parametrize("schedule", ["linear", "root", "step"])
@pytest.mark.parametrize(("c0", "ramp"), [(0.4, 0.75), (0.1, 1.0), (0.2, 0.5)])
def test_pacing_competence(schedule, c0, ramp):
    grid = np.linspace(0, 1, 401)
    c = np.array([competence(schedule, p, c0, ramp) for p in grid])
    # float64 pacing formulas: exact at the ends, ~1e-16 elsewhere (approx's rel 1e-6, 1e-12)
    assert c[0] == pytest.approx(c0) and np.all(np.diff(c) >= 0)
    assert np.all(c[grid >= ramp] == pytest.approx(1.0))
    assert np.all(c[grid < ramp] < 1.0)
    if schedule == "root":
        linear = np.array([competence("linear", p, c0, ramp) for p in grid])
        assert np.all(c >= linear - 1e-12), "root pacing admits categories sooner"
    if schedule == "step":
        assert np.all(c[grid < ramp] == c0)


@pytest.mark.parametrize("schedule", ["linear", "root", "step"])
def test_pacing_admits_the_first_floor_c_k_categories_in_order(schedule):
    order = ["flat", "desert", "moderate", "alpine", "extreme"]
    config = CurriculumConfig(schedule=schedule, order=order, c0=0.2, ramp=0.8)
    previous: set[str] = set()
    for epoch in range(1, 31):
        c = competence(schedule, progress(epoch, 30), 0.2, 0.8)
        now = active(config, epoch, 30)
        # 1e-9: a float64 c * 5 that is an integer in exact arithmetic may round 1e-15 below it
        assert set(now) == set(order[: max(1, math.floor(c * 5 + 1e-9))])
        assert previous <= set(now), "categories never leave"
        previous = set(now)
    assert active(config, 1, 30) == ["flat"] and set(active(config, 30, 30)) == set(TERRAINS)
    assert [categories_for(c, order) for c in (0.0, 0.2, 0.39, 0.4, 1.0)] == [1, 1, 1, 2, 5]


def test_linear_defaults_approximate_the_seeds_quarters():
    config = CurriculumConfig(schedule="linear")
    for epoch in range(1, 201):
        paced = len(active(config, epoch, 200))
        seed = len(expand(seed_active_terrain(epoch)))
        assert abs(paced - seed) <= 1 and (paced == seed or epoch in (50, 100, 150))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"schedule": "cosine"}, "schedule"),
        ({"phases": [{"start": 2, "terrains": ["flat"]}]}, "first phase must start at 1"),
        (
            {"phases": [{"start": 1, "terrains": ["flat"]}, {"start": 1, "terrains": ["all"]}]},
            "increase",
        ),
        ({"phases": [{"start": 1, "terrains": ["glacier"]}]}, "glacier"),
        ({"phases": [{"start": 1, "terrains": []}]}, "at least one terrain"),
        (
            {"phases": [{"start": 1, "terrains": ["flat"]}, {"start": 50.5, "terrains": ["all"]}]},
            "whole numbers",
        ),
        (
            {
                "phase_unit": "fraction",
                "phases": [{"start": 0, "terrains": ["flat"]}, {"start": 1, "terrains": ["all"]}],
            },
            r"\[0, 1\)",
        ),
        ({"order": ["flat", "moderate"]}, "order"),
        ({"c0": 0}, "c0"),
        ({"reference_epochs": 1}, "reference_epochs"),
    ],
)
def test_bad_config_is_a_config_error(raw, message):
    with pytest.raises(ConfigError, match=message):
        PluginManager.from_names(["curriculum"], {"curriculum": raw})


def test_seed_yaml_phases_are_expressible_in_toml_form():
    raw = {
        "phases": [{"start": start, "terrains": terrains} for start, _end, terrains in SEED_TABLE]
    }
    pm = PluginManager.from_names(["curriculum"], {"curriculum": raw})
    assert pm.config("curriculum") == CurriculumConfig()


# --- real training runs ------------------------------------------------------------------


class TrainedTerrains:
    """Records the terrains of every training batch, per epoch."""

    name = "trained_terrains"

    def __init__(self) -> None:
        self.batches: dict[int, list[list[int]]] = {}

    @hookimpl
    def route_batch(self, model, batch, ctx):
        if model.training:
            self.batches.setdefault(ctx.epoch, []).append(batch["terrain"].tolist())


def test_composes_with_stratified_in_a_real_run(train_run):
    """A 4-epoch run has one seed phase per epoch; stratified draws only active terrains
    and puts every active terrain in every batch."""
    probe = TrainedTerrains()
    rows = train_run(
        Curriculum(CurriculumConfig()),
        Stratified(StratifiedConfig()),
        probe,
        overrides=("run.epochs=4", "train.max_steps_per_epoch=2"),
    )
    for row in rows:
        reference = math.floor(1 + Fraction(row["epoch"] - 1, 3) * 199)
        expected = expand(seed_active_terrain(reference))
        assert row["active_terrains"] == expected
        assert set(row["terrain_counts"]) == set(expected)
        assert row["batches_missing_a_terrain"] == 0
        assert row["curriculum_phase"] == row["epoch"]
        wanted = {terrain_index(name) for name in expected}
        assert len(probe.batches[row["epoch"]]) == row["steps"] == 2
        for batch in probe.batches[row["epoch"]]:
            assert set(batch) == wanted
    assert [len(row["active_terrains"]) for row in rows] == [2, 3, 4, 5]


def test_pacing_in_a_real_run_reports_competence(train_run):
    rows = train_run(Curriculum(CurriculumConfig(schedule="root")))
    for row in rows:
        c = competence("root", progress(row["epoch"], 2), 0.4, 0.75)
        assert row["curriculum_competence"] == pytest.approx(c)  # the same float64 formula
        assert len(row["active_terrains"]) == categories_for(c, TERRAINS)


class WithoutEasyTerrain:
    """An earlier ``epoch_indices`` plugin that removes flat and moderate tiles."""

    name = "without_easy_terrain"

    @hookimpl
    def epoch_indices(self, indices, epoch, ctx):
        easy = [terrain_index("flat"), terrain_index("moderate")]
        return indices[~np.isin(ctx.train_dataset.terrains[indices], easy)]


def test_absent_phase_terrains_widen_to_the_next_phase_with_one_warning(train_run):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = train_run(
            WithoutEasyTerrain(),
            Curriculum(CurriculumConfig(reference_epochs=0)),
            overrides=("run.epochs=2",),
        )
    widened = [w for w in caught if "curriculum" in str(w.message)]
    assert len(widened) == 1 and "widened" in str(widened[0].message)
    assert all(row["active_terrains"] == ["alpine"] for row in rows)
