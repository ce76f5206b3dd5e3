"""pcgrad: the surgery on hand-built gradients, then the plugin inside the real trainer."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.errors import ConfigError, PluginError
from core.hookspecs import hookimpl
from core.plugins import PluginManager
from core.tasks.dem_sr.terrain import terrain_index
from plugins.gradients.pcgrad import (
    PCGrad,
    PCGradConfig,
    conflicting_pair_fraction,
    pcgrad_combine,
    project_conflicting,
    projection_orders,
)

sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))
from gradient_probe import (
    Float64Training,
    GradientProbe,
    StepRecord,
    assert_same_gradient,
    launch,
    load_records,
    naive_mean_gradient,
    naive_terrain_gradients,
)

RTOL = 1e-5
"""The trainer's float64 gradient against a float64 naive recomputation: the ill-conditioned
``gradient`` loss (square roots near 0) amplifies float64 rounding to ~3e-8 of the largest
element, so 1e-5 leaves a margin of 300 (in float32 it reached 1.5e-4: ``Float64Training``)."""


def conflicting_pairs(dim: int, count: int) -> list[torch.Tensor]:
    """Random float64 gradient pairs ``[2, dim]`` with a negative dot product."""
    generator = torch.Generator().manual_seed(dim)
    pairs = []
    while len(pairs) < count:
        pair = torch.randn(2, dim, generator=generator, dtype=torch.float64)
        if torch.dot(pair[0], pair[1]) < 0:
            pairs.append(pair)
    return pairs


@pytest.mark.parametrize("dim", [2, 3])
def test_projection_removes_the_conflict_of_a_pair(dim):
    for grads in conflicting_pairs(dim, 20):
        g1, g2 = (project_conflicting(grads, i, [1 - i]) for i in (0, 1))
        scale = grads.norm(dim=1).prod()  # 1e-12 of it: float64 dot products of 2-3 terms
        # each lies on the normal plane of the other's original gradient ...
        assert torch.dot(g1, grads[1]).abs() <= 1e-12 * scale
        assert torch.dot(g2, grads[0]).abs() <= 1e-12 * scale
        # ... so the projected pair no longer conflicts, and neither does their sum with
        # either original gradient (the combined step lowers both losses to first order)
        assert torch.dot(g1, g2) >= -1e-12 * scale
        for original in grads:
            assert torch.dot(g1 + g2, original) >= -1e-12 * scale


def test_hand_built_2d_conflict():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    assert torch.equal(project_conflicting(grads, 0, [1]), torch.tensor([0.5, 0.5]).double())
    assert torch.equal(project_conflicting(grads, 1, [0]), torch.tensor([0.0, 1.0]).double())


def test_non_conflicting_gradients_are_unchanged():
    grads = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    orders = projection_orders(3, seed=0, step=0)
    for task, order in enumerate(orders):
        assert torch.equal(project_conflicting(grads, task, order), grads[task])
    # float64 means of 3 rows: ~1e-16 against allclose's default rtol 1e-5
    assert torch.allclose(pcgrad_combine(grads, orders, "mean"), grads.mean(0))
    assert conflicting_pair_fraction(grads) == 0.0


def test_only_the_conflicting_component_is_removed():
    # g0 conflicts with g1 only; g2 is orthogonal to g0, so g0 loses exactly its g1 part
    grads = torch.tensor([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 5.0]], dtype=torch.float64)
    for order in itertools.permutations([1, 2]):
        projected = project_conflicting(grads, 0, order)
        assert torch.equal(projected, torch.tensor([0.0, 1.0, 0.0]).double())
    assert torch.equal(project_conflicting(grads, 2, [0, 1]), grads[2])
    assert conflicting_pair_fraction(grads) == pytest.approx(1 / 3)  # float32 1/3: 1e-8 off


def test_three_way_conflict_ends_orthogonal_to_the_last_conflicting_gradient():
    grads = torch.tensor(
        [[1.0, 0.2, 0.0], [-0.8, 1.0, 0.1], [-0.5, -1.0, 0.3]], dtype=torch.float64
    )
    for task in range(3):
        others = [j for j in range(3) if j != task]
        for order in itertools.permutations(others):
            projected = project_conflicting(grads, task, order)
            last = grads[order[-1]]
            assert torch.dot(projected, last) >= -1e-12  # float64 of unit-size vectors


def test_orders_are_seeded_permutations_of_the_other_tasks():
    for num_tasks in (1, 2, 5):
        orders = projection_orders(num_tasks, seed=3, step=7)
        assert orders == projection_orders(num_tasks, seed=3, step=7)
        for task, order in enumerate(orders):
            assert sorted(order) == [j for j in range(num_tasks) if j != task]
    draws = {tuple(map(tuple, projection_orders(5, seed=0, step=step))) for step in range(20)}
    assert len(draws) > 1, "the order must be redrawn from step to step"


def test_sum_is_the_number_of_terrains_times_the_mean():
    grads = conflicting_pairs(4, 1)[0]
    orders = projection_orders(2, seed=0, step=0)
    # float64: ~1e-16 against allclose's default rtol 1e-5
    assert torch.allclose(
        pcgrad_combine(grads, orders, "sum"), 2 * pcgrad_combine(grads, orders, "mean")
    )


# --- the plugin in the real trainer ---------------------------------------------------------


def naive_pcgrad(config, record: StepRecord, per_terrain: dict, combine: str) -> torch.Tensor:
    """The surgery on naive per-terrain gradients, in the order the run drew for the step."""
    grads = torch.stack([per_terrain[t] for t in sorted(per_terrain)])
    orders = projection_orders(len(grads), config.run.seed, record.global_step)
    return pcgrad_combine(grads, orders, combine)


class OnlyAlpine:
    name = "only_alpine"

    @hookimpl
    def epoch_indices(self, indices, epoch, ctx):
        return indices[ctx.train_dataset.terrains[indices] == terrain_index("alpine")]


def test_one_terrain_gives_the_plain_mean_gradient(train_run):
    probe = GradientProbe()
    plugin = PCGrad(PCGradConfig(combine="sum"))  # one terrain: sum, mean and plain agree
    train_run(plugin, OnlyAlpine(), Float64Training(), probe, overrides=("data.batch_size=2",))
    assert len(probe.steps) >= 4
    for record in probe.steps:
        alpine = {int(t) for batch in record.batches for t in batch["terrain"]}
        assert alpine == {terrain_index("alpine")}
        expected = naive_mean_gradient(probe.config, record.weights, record.batches)
        assert_same_gradient(record.grads, expected, RTOL)


class ReverseFlat:
    """Flat tiles ask for the opposite of their loss, so their gradient conflicts with the
    others' from the first step on (the surgery then has something to do)."""

    name = "reverse_flat"

    @hookimpl
    def loss_weights(self, weights, batch, ctx):
        flat = batch["terrain"] == terrain_index("flat")
        return torch.where(flat[:, None], -weights, weights)


def test_accumulated_micro_batches_give_pcgrad_over_their_union(train_run):
    probe = GradientProbe()
    rows = train_run(
        PCGrad(PCGradConfig()),
        ReverseFlat(),
        Float64Training(),
        probe,
        overrides=("optim.accumulation_steps=2", "run.epochs=1"),
    )
    assert len(probe.steps) == 2
    surgery_mattered = 0
    for record in probe.steps:
        assert len(record.batches) == 2
        per_terrain = naive_terrain_gradients(probe.config, record.weights, record.batches)
        expected = naive_pcgrad(probe.config, record, per_terrain, "mean")
        assert_same_gradient(record.grads, expected, RTOL)
        unprojected = torch.stack(list(per_terrain.values())).mean(0)
        # 1e-3: far above the float64 rounding of the same per-terrain gradients (~1e-16)
        surgery_mattered += bool((expected - unprojected).norm() > 1e-3 * expected.norm())
    assert surgery_mattered == len(probe.steps), "the surgery must change every step's gradient"
    assert 0 < rows[0]["pcgrad_conflicting_pairs"] <= 1


@pytest.mark.slow
def test_two_processes_equal_the_single_process_computation(procedural_dir, tmp_path):
    # several steps: every DDP forward after the first follows a step without .backward();
    # a collective in every backward pass fails the run unless both processes run the same
    # backward passes, also when a micro-batch lacks a terrain on one process only
    result = launch(
        "pcgrad",
        procedural_dir,
        tmp_path / "run",
        "optim.accumulation_steps=2",
        "data.batch_size=4",
        "run.epochs=2",
        backward_collective=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config, (rank0, rank1), collectives = load_records(tmp_path / "run", 2)
    assert len(rank0) == len(rank1) >= 4
    assert collectives[0] == collectives[1] > 0
    one_sided = 0
    for first, second in zip(rank0, rank1, strict=True):
        for a, b in zip(first.weights, second.weights, strict=True):
            assert torch.equal(a, b), "both processes must step from the same weights"
        for a, b in zip(first.grads, second.grads, strict=True):
            assert torch.equal(a, b), "both processes must apply the same gradient"
        seen = [{int(t) for b in rank.batches for t in b["terrain"]} for rank in (first, second)]
        one_sided += seen[0] != seen[1]
        union = first.batches + second.batches
        per_terrain = naive_terrain_gradients(config, first.weights, union)
        assert_same_gradient(first.grads, naive_pcgrad(config, first, per_terrain, "mean"), RTOL)
    assert one_sided, "some step must have a terrain on one process only"


def test_fp16_is_refused(train_run):
    with pytest.raises(ConfigError, match=r"fp16.*pcgrad"):
        train_run(PCGrad(PCGradConfig()), overrides=("train.mixed_precision='fp16'",))


def test_unknown_combine_is_a_config_error():
    with pytest.raises(ConfigError, match=r"combine.*median.*plugins\.pcgrad"):
        PluginManager.from_names(["pcgrad"], {"pcgrad": {"combine": "median"}})


def test_balanced_grad_and_pcgrad_conflict_at_start_up(tmp_path):
    with pytest.raises(PluginError, match=r"'balanced_grad' and 'pcgrad'.*'backward'"):
        PluginManager.from_names(["balanced_grad", "pcgrad"])
    result = subprocess.run(
        [sys.executable, "-m", "core.run", "--plugins", "balanced_grad,pcgrad"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "'balanced_grad' and 'pcgrad'" in result.stderr and "backward" in result.stderr
    assert not (tmp_path / "runs").exists(), "nothing may start before the conflict is reported"
