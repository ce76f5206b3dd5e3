"""``stratified``: full round-robin batches, exact per-category draw rules, purity, real runs."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from core.errors import ConfigError
from core.hookspecs import hookimpl
from core.plugins import PluginManager
from core.tasks.dem_sr.terrain import TERRAINS, terrain_index
from plugins.samplers.stratified import (
    Stratified,
    StratifiedConfig,
    category_pools,
    epoch_batches,
    plan_batches,
)
from tests.distributed.two_processes import launch

ROOT = Path(__file__).resolve().parents[1]

# Tiles per category (flat, moderate, alpine, desert, extreme): the seed's counts / 10, tiny
# categories, absent categories, equal sizes, and one dominant category.
PROFILES = [
    (23, 45, 50, 43, 42),
    (1, 7, 30, 2, 13),
    (0, 12, 0, 5, 9),
    (16, 16, 16, 16, 16),
    (3, 100, 1, 1, 20),
]
ALL_CATEGORIES = list(range(len(TERRAINS)))


def labels_for(sizes: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A dataset's terrain labels with ``sizes`` tiles per category, interleaved."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(seed).permutation(labels).astype(np.int64)


def plan_for(labels: np.ndarray, batch_size: int, epoch: int = 1, **kwargs) -> np.ndarray:
    pools = category_pools(labels, np.arange(len(labels)), ALL_CATEGORIES)
    return plan_batches(pools, batch_size, seed=7, epoch=epoch, **kwargs)


def per_batch_counts(plan: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``[batches, 5]`` tiles of each category in each batch."""
    return np.stack([np.bincount(labels[batch], minlength=len(TERRAINS)) for batch in plan])


@pytest.mark.parametrize("sizes", PROFILES)
@pytest.mark.parametrize("batch_size", range(5, 18))
def test_every_batch_is_full_and_balanced(sizes, batch_size):
    labels = labels_for(sizes)
    present = [k for k, n in enumerate(sizes) if n]
    plan = plan_for(labels, batch_size)
    assert plan.shape == (math.ceil(sum(sizes) / batch_size), batch_size)
    counts = per_batch_counts(plan, labels)[:, present]
    assert np.all(counts.max(1) - counts.min(1) <= 1), "category counts per batch differ by <= 1"
    if batch_size >= len(present):
        assert np.all(counts > 0), "every present category in every batch"
    assert set(np.unique(labels[plan])) == set(present)


@pytest.mark.parametrize("sizes", PROFILES)
@pytest.mark.parametrize("batch_size", [5, 6, 7, 11, 16, 17])
@pytest.mark.parametrize("epoch_length", ["tiles", "smallest", "largest"])
def test_draws_without_replacement_until_a_category_runs_out(sizes, batch_size, epoch_length):
    """Within a category every tile is drawn floor(d/n) or ceil(d/n) times (d draws, n
    tiles): no repeats while d <= n, and repeats spread evenly once it runs out."""
    labels = labels_for(sizes)
    plan = plan_for(labels, batch_size, epoch_length=epoch_length)
    times = np.bincount(plan.ravel(), minlength=len(labels))
    draws = []
    for category, n in enumerate(sizes):
        if not n:
            continue
        tiles = times[labels == category]
        assert tiles.max() - tiles.min() <= 1
        draws.append(tiles.sum())
        if tiles.sum() <= n:
            assert tiles.max() <= 1
    assert max(draws) - min(draws) <= 1, "each category gets floor or ceil of L*B/K draws"
    present = [n for n in sizes if n]
    if epoch_length == "smallest" and len(present) * min(present) >= batch_size:
        assert times.max() <= 1, "'smallest' repeats no tile (given one batch's worth of tiles)"
    if epoch_length == "largest":
        assert np.all(times[np.isin(labels, np.flatnonzero(sizes))] >= 1), "every tile seen"


@pytest.mark.parametrize("sizes", PROFILES)
def test_epoch_lengths(sizes):
    present = [n for n in sizes if n]
    k = len(present)
    for batch_size in range(5, 18):
        assert epoch_batches(present, batch_size, "tiles") == math.ceil(sum(present) / batch_size)
        smallest = epoch_batches(present, batch_size, "smallest")
        assert smallest == 1 or smallest * batch_size <= k * min(present)
        assert (smallest + 1) * batch_size > k * min(present)
        largest = epoch_batches(present, batch_size, "largest")
        assert largest * batch_size >= k * max(present) > (largest - 1) * batch_size


@pytest.mark.parametrize("batch_size", [7, 8, 13])
def test_remainder_slots_rotate_so_no_category_is_favoured(batch_size):
    """B % K extra slots per batch move on through the categories, within and across epochs:
    cumulative draws per category differ by at most 1 after any number of batches."""
    labels = labels_for((30, 30, 30, 30, 30))
    stream = np.concatenate([plan_for(labels, batch_size, epoch=e) for e in range(1, 6)])
    per_batch = per_batch_counts(stream, labels)
    cumulative = per_batch.cumsum(0)
    assert np.all(cumulative.max(1) - cumulative.min(1) <= 1)
    extra = per_batch[: len(TERRAINS)] > batch_size // len(TERRAINS)
    assert np.all(extra.any(0)), "within K batches every category gets an extra slot"


def test_plan_is_a_pure_function_of_seed_and_epoch():
    labels = labels_for(PROFILES[0])
    pools = category_pools(labels, np.arange(len(labels)), ALL_CATEGORIES)
    first = plan_batches(pools, 9, seed=3, epoch=4)
    again = plan_batches([pool.copy() for pool in pools], 9, seed=3, epoch=4)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, plan_batches(pools, 9, seed=3, epoch=5))
    assert not np.array_equal(first, plan_batches(pools, 9, seed=4, epoch=4))


def test_draws_only_from_given_indices_and_configured_categories():
    labels = labels_for(PROFILES[0])
    rng = np.random.default_rng(1)
    indices = np.sort(rng.choice(len(labels), size=len(labels) // 2, replace=False))
    chosen = [terrain_index("extreme"), terrain_index("flat")]
    pools = category_pools(labels, indices, chosen)
    plan = plan_batches(pools, 6, seed=0, epoch=1)
    assert set(plan.ravel()) <= set(indices.tolist())
    assert set(labels[plan.ravel()]) == set(chosen)
    assert labels[plan[0, 0]] == chosen[0], "round-robin follows the configured order"


def test_samples_per_category_gives_the_seeds_batches():
    plugin = Stratified(StratifiedConfig(samples_per_category=2))
    labels = labels_for((0, 12, 9, 0, 20))
    pools = category_pools(labels, np.arange(len(labels)), plugin.category_indices(TERRAINS))
    batch_size = plugin.batch_size(default=10, present=len(pools))
    counts = per_batch_counts(plan_batches(pools, batch_size, 0, 1), labels)
    assert np.all(counts[:, [1, 2, 4]] == 2) and np.all(counts[:, [0, 3]] == 0)
    assert Stratified(StratifiedConfig()).batch_size(default=10, present=3) == 10
    assert Stratified(StratifiedConfig(batch_size=6)).batch_size(default=10, present=3) == 6


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"batch_size": 8, "samples_per_category": 2}, "not both"),
        ({"categories": ["flat", "alpine", "flat"]}, "twice"),
        ({"epoch_length": "forever"}, "epoch_length"),
        ({"batch_size": -1}, "batch_size"),
    ],
)
def test_bad_config_is_a_config_error(raw, message):
    with pytest.raises(ConfigError, match=message):
        PluginManager.from_names(["stratified"], {"stratified": raw})


def test_registered_as_a_batch_plan_provider():
    pm = PluginManager.from_names(["stratified"], {"stratified": {"categories": ["flat"]}})
    assert pm.provider("batch_plan") == "stratified"
    assert pm.config("stratified").categories == ["flat"]


# --- real training runs ------------------------------------------------------------------


class TrainedBatches:
    """Records the dataset indices of every training batch, per epoch."""

    name = "trained_batches"

    def __init__(self) -> None:
        self.batches: dict[int, list[list[int]]] = {}

    @hookimpl
    def route_batch(self, model, batch, ctx):
        if model.training:
            self.batches.setdefault(ctx.epoch, []).append(batch["idx"].tolist())


def test_real_run_has_no_batch_missing_a_terrain(train_run):
    probe = TrainedBatches()
    plugin = Stratified(StratifiedConfig(batch_size=7))
    rows = train_run(plugin, probe, overrides=("run.epochs=2",))
    for row in rows:
        assert row["batches_missing_a_terrain"] == 0
        assert row["active_terrains"] == list(TERRAINS)
        assert row["steps"] == len(probe.batches[row["epoch"]])
    for batches in probe.batches.values():
        assert all(len(batch) == 7 for batch in batches)
    assert probe.batches[1] != probe.batches[2]


@pytest.mark.slow
def test_two_processes_train_disjoint_shares_of_the_plan(tmp_path, procedural_dir):
    """Under ``accelerate launch`` with 2 processes each rank trains its own batches of the
    same plan: no tile twice in an epoch (epoch_length = 'smallest'), and together they
    cover the plan the trainer kept."""
    out = tmp_path / "shares"
    out.mkdir()
    command = [
        *launch(), str(ROOT / "tests" / "distributed" / "stratified_shares.py"),
        str(procedural_dir), str(tmp_path / "run"), str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    for epoch in ("1", "2"):
        plans = [rank["plans"][epoch] for rank in ranks]
        assert plans[0] == plans[1], "every rank computes the same plan"
        kept = plans[0][: len(plans[0]) // 2 * 2]
        for r, rank in enumerate(ranks):
            assert rank["trained"][epoch] == kept[r::2], f"rank {r} trains batches r, r+2, ..."
        trained = [i for rank in ranks for batch in rank["trained"][epoch] for i in batch]
        assert len(trained) == len(set(trained)), "a tile repeated within the epoch"
        assert set(trained) == {i for batch in kept for i in batch}
    assert ranks[0]["plans"]["1"] != ranks[0]["plans"]["2"]


class WithoutFlat:
    """An earlier ``epoch_indices`` plugin that removes every flat tile."""

    name = "without_flat"

    @hookimpl
    def epoch_indices(self, indices, epoch, ctx):
        return indices[ctx.train_dataset.terrains[indices] != terrain_index("flat")]


def test_no_configured_category_in_the_epoch_is_a_config_error(train_run):
    with pytest.raises(ConfigError, match=r"plugins\.stratified\.categories"):
        train_run(WithoutFlat(), Stratified(StratifiedConfig(categories=["flat"])))


def test_empty_categories_deal_out_every_domain_of_the_task():
    plugin = Stratified(StratifiedConfig())
    assert plugin.category_indices(("a", "b", "c")) == [0, 1, 2]
    chosen = Stratified(StratifiedConfig(categories=["c", "a"]))
    assert chosen.category_indices(("a", "b", "c")) == [2, 0]


def test_category_the_task_lacks_is_a_config_error_naming_the_task_domains(train_run):
    with pytest.raises(ConfigError, match=r"categories: unknown category 'glacier'.*flat"):
        train_run(Stratified(StratifiedConfig(categories=["flat", "glacier"])))
