"""balanced_grad: the gradient the optimizer receives is the mean over terrains of each
terrain's mean gradient, checked through the real trainer against a naive per-terrain
recomputation, across accumulated micro-batches and across two real processes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from core.plugins import NoConfig
from core.tasks.dem_sr.terrain import TERRAINS
from plugins.gradients.balanced_grad import BalancedGrad, balanced_weights

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


def naive_balanced_gradient(config, record: StepRecord, batches: list) -> torch.Tensor:
    """For each terrain a separate backward of its mean loss, then the mean over terrains."""
    per_terrain = naive_terrain_gradients(config, record.weights, batches)
    return torch.stack(list(per_terrain.values())).mean(0)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_terrain_present_weighs_the_same(world_size):
    terrain = torch.tensor([0, 0, 0, 0, 3, 4, 4])
    counts = torch.bincount(terrain, minlength=len(TERRAINS)).float()
    weights = balanced_weights(terrain, counts, world_size)
    share = torch.zeros(len(TERRAINS), dtype=weights.dtype).index_add_(0, terrain, weights)
    # after DDP divides by world_size, each of the 3 terrains present carries 1/3 (float32
    # shares within an ulp, 3e-8, of it: allclose's rtol 1e-5)
    assert torch.allclose(share / world_size, torch.tensor([1 / 3, 0, 0, 1 / 3, 1 / 3]))


def test_one_terrain_gives_the_plain_mean_weights():
    terrain = torch.full((6,), 2)
    counts = torch.bincount(terrain, minlength=len(TERRAINS)).float()
    # float32 1/6 within an ulp (1.5e-8): allclose's rtol 1e-5
    assert torch.allclose(balanced_weights(terrain, counts, 1), torch.full((6,), 1 / 6))


def test_gradient_equals_naive_per_terrain_mean_with_accumulation(train_run):
    probe = GradientProbe()
    train_run(
        BalancedGrad(NoConfig()),
        Float64Training(),
        probe,
        overrides=("optim.accumulation_steps=2", "run.epochs=1"),
    )
    assert len(probe.steps) == 2
    differs_from_plain_mean = 0
    for record in probe.steps:
        assert len(record.batches) == 2
        expected = naive_balanced_gradient(probe.config, record, record.batches)
        assert_same_gradient(record.grads, expected, RTOL)
        plain = naive_mean_gradient(probe.config, record.weights, record.batches)
        differs_from_plain_mean += bool((expected - plain).norm() > 1e-3 * expected.norm())
    assert differs_from_plain_mean, "the batches must be unbalanced for the test to mean much"


@pytest.mark.slow
def test_two_processes_match_naive_computation_over_both_ranks(procedural_dir, tmp_path):
    result = launch(
        "balanced_grad",
        procedural_dir,
        tmp_path / "run",
        "optim.accumulation_steps=2",
        "data.batch_size=4",
        "run.epochs=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config, (rank0, rank1), _ = load_records(tmp_path / "run", 2)
    assert len(rank0) == len(rank1) >= 4
    for first, second in zip(rank0, rank1, strict=True):
        for a, b in zip(first.weights, second.weights, strict=True):
            assert torch.equal(a, b), "both processes must step from the same weights"
        union = first.batches + second.batches
        assert len(union) == 4
        assert not set(torch.cat([b["idx"] for b in first.batches]).tolist()) & set(
            torch.cat([b["idx"] for b in second.batches]).tolist()
        ), "the ranks must train on different tiles"
        expected = naive_balanced_gradient(config, first, union)
        assert_same_gradient(first.grads, expected, RTOL)
        assert_same_gradient(second.grads, expected, RTOL)
