"""Metrics in metres and degrees: Horn slope, the per-terrain accumulator, the spike measures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.spikes import (
    batch_loss_outliers,
    probe_indices,
    probe_jumps,
    probe_loss,
    probe_rise,
)
from core.tasks.dem_sr.metrics import ValidationAccumulator, horn_slope_deg
from core.tasks.dem_sr.terrain import TERRAINS, terrain_index


def plane(a: float, b: float, dy: float, dx: float, shape: tuple[int, int] = (7, 9)) -> np.ndarray:
    """z = a*x + b*y in metres, x east along columns, y along rows."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return a * cols * dx + b * rows * dy


@pytest.mark.parametrize(("a", "b"), [(0.3, -0.5), (1.0, 0.0), (0.0, 2.5), (0.0, 0.0)])
def test_horn_slope_of_a_plane_with_anisotropic_cells(a: float, b: float) -> None:
    dy, dx = 20.0, 30.0
    dem = plane(a, b, dy, dx)[None, None]
    slope = horn_slope_deg(dem, (dy, dx))
    assert isinstance(slope, np.ndarray) and slope.shape == (1, 1, 5, 7)
    # float64 Horn stencils on an exact plane: ~1e-14 degrees of rounding
    np.testing.assert_allclose(slope, math.degrees(math.atan(math.hypot(a, b))), atol=1e-9)


def test_horn_slope_uses_each_samples_cell_size_on_tensors() -> None:
    # The same grid of values means a gentler slope where the cells are larger.
    values = torch.from_numpy(plane(0.5, 0.25, 1.0, 1.0)).float()
    dem = torch.stack([values, values])[:, None]
    cells = torch.tensor([[10.0, 10.0], [10.0, 40.0]])
    slope = horn_slope_deg(dem, cells)
    assert isinstance(slope, torch.Tensor) and slope.shape == (2, 1, 5, 7)
    # float32 defaults (atol 1e-5): float32 rounding of ~3 degrees is ~3e-7, and the 7-digit
    # constants are within 3e-6 degrees of the exact hypot(0.5 / dx, 0.25 / dy)
    torch.testing.assert_close(slope[0], torch.full((1, 5, 7), math.degrees(math.atan(0.0559017))))
    torch.testing.assert_close(slope[1], torch.full((1, 5, 7), math.degrees(math.atan(0.0279508))))


def numpy_horn(z: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """Horn's slope written out cell by cell: a b c / d e f / g h i."""
    a, b, c = z[:-2, :-2], z[:-2, 1:-1], z[:-2, 2:]
    d, f = z[1:-1, :-2], z[1:-1, 2:]
    g, h, i = z[2:, :-2], z[2:, 1:-1], z[2:, 2:]
    dz_dx = ((c + 2 * f + i) - (a + 2 * d + g)) / (8 * dx)
    dz_dy = ((g + 2 * h + i) - (a + 2 * b + c)) / (8 * dy)
    return np.degrees(np.arctan(np.hypot(dz_dx, dz_dy)))


def full_windows(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    return np.all([mask[r : r + h - 2, c : c + w - 2] for r in range(3) for c in range(3)], 0)


def make_batch(seed: int, terrains: list[str]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = len(terrains)
    hr = torch.randn(n, 1, 12, 12, generator=gen).cumsum(-1)
    hr = (hr - hr.mean((2, 3), keepdim=True)) / hr.std((2, 3), keepdim=True)
    mask = torch.rand(hr.shape, generator=gen) > 0.1
    mask[0] = True
    return {
        "pred": hr + 0.2 * torch.randn(hr.shape, generator=gen),
        "hr": torch.where(mask, hr, torch.nan),  # nodata in the truth is masked, not an error
        "mask": mask,
        "mean": 100 + 1000 * torch.rand(n, generator=gen),
        "std": 5 + 50 * torch.rand(n, generator=gen),
        "terrain": torch.tensor([terrain_index(t) for t in terrains]),
        "cell_size": torch.tensor([[30.0, 30.0 * (0.5 + 0.1 * i)] for i in range(n)]),
        "loss": torch.rand(n, generator=gen),
    }


BATCHES = [make_batch(0, ["flat", "desert", "flat"]), make_batch(1, ["desert", "desert"])]


def update(acc: ValidationAccumulator, batch: dict[str, torch.Tensor]) -> None:
    acc.update(
        batch["pred"],
        batch["hr"],
        batch["mask"],
        batch["mean"],
        batch["std"],
        batch["terrain"],
        batch["cell_size"],
        loss=batch["loss"],
    )


def direct_metrics() -> dict[str, dict[str, list[float]]]:
    """Per-terrain lists of elevation errors, slope errors and losses, computed in numpy."""
    out: dict[str, dict[str, list[float]]] = {}
    for batch in BATCHES:
        for i, t in enumerate(batch["terrain"].tolist()):
            m = batch["mask"][i, 0].numpy()
            std, mean = float(batch["std"][i]), float(batch["mean"][i])
            pred = batch["pred"][i, 0].double().numpy() * std + mean
            hr = batch["hr"][i, 0].double().numpy() * std + mean
            dy, dx = batch["cell_size"][i].double().tolist()
            slope_err = numpy_horn(pred, dy, dx) - numpy_horn(hr, dy, dx)
            entry = out.setdefault(TERRAINS[t], {"err": [], "slope": [], "loss": []})
            entry["err"] += (pred - hr)[m].tolist()
            entry["slope"] += slope_err[full_windows(m)].tolist()
            entry["loss"].append(float(batch["loss"][i]))
    return out


def rmse(values: list[float]) -> float:
    return float(np.sqrt(np.mean(np.square(values))))


def test_accumulator_matches_a_direct_numpy_computation() -> None:
    acc = ValidationAccumulator()
    for batch in BATCHES:
        update(acc, batch)
    summary = acc.summary()
    direct = direct_metrics()
    every = {k: [v for d in direct.values() for v in d[k]] for k in ("err", "slope", "loss")}
    # rel 1e-6: both sides sum in float64 from the same float32 inputs; only the order differs
    # (~1e-15 relative)
    assert summary["val_rmse_m"] == pytest.approx(rmse(every["err"]), rel=1e-6)
    assert summary["val_mae_m"] == pytest.approx(np.mean(np.abs(every["err"])), rel=1e-6)
    assert summary["val_slope_rmse_deg"] == pytest.approx(rmse(every["slope"]), rel=1e-6)
    assert summary["val_loss"] == pytest.approx(np.mean(every["loss"]), rel=1e-6)
    for key in ("val_rmse_m_by_terrain", "val_slope_rmse_deg_by_terrain", "val_loss_by_terrain"):
        assert list(summary[key]) == ["flat", "desert"]
    for name, d in direct.items():
        assert summary["val_rmse_m_by_terrain"][name] == pytest.approx(rmse(d["err"]), rel=1e-6)
        mae = np.mean(np.abs(d["err"]))
        assert summary["val_mae_m_by_terrain"][name] == pytest.approx(mae, rel=1e-6)
        slope = rmse(d["slope"])
        assert summary["val_slope_rmse_deg_by_terrain"][name] == pytest.approx(slope, rel=1e-6)


def flat(summary: dict) -> dict[str, float]:
    """Summary with the by-terrain dicts spread into ``key/terrain`` entries, for approx."""
    out = {}
    for key, value in summary.items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        out |= {f"{key}/{name}": v for name, v in items}
    return out


def test_reduce_sums_across_processes() -> None:
    whole, first, second = ValidationAccumulator(), ValidationAccumulator(), ValidationAccumulator()
    for batch in BATCHES:
        update(whole, batch)
    update(first, BATCHES[0])
    update(second, BATCHES[1])
    first.reduce(lambda t: t + second.sums)  # what a 2-process all-reduce sum does
    # approx's default rel 1e-6: float64 sums grouped otherwise differ by ~1e-15 relative
    assert flat(first.summary()) == pytest.approx(flat(whole.summary()))

    expected = flat(whole.summary())
    whole.reduce(lambda t: t * 2)  # every process saw the same data: ratios unchanged
    assert flat(whole.summary()) == pytest.approx(expected)


def test_empty_accumulator_reports_nan_and_no_terrains() -> None:
    summary = ValidationAccumulator().summary()
    assert math.isnan(summary["val_rmse_m"]) and math.isnan(summary["val_slope_rmse_deg"])
    assert summary["val_rmse_m_by_terrain"] == {}
    assert "val_loss" not in summary


def test_perfect_prediction_scores_zero() -> None:
    batch = BATCHES[0]
    acc = ValidationAccumulator()
    acc.update(
        batch["hr"].nan_to_num(),
        batch["hr"],
        batch["mask"],
        batch["mean"],
        batch["std"],
        batch["terrain"],
        batch["cell_size"],
    )
    summary = acc.summary()
    assert summary["val_rmse_m"] == 0 and summary["val_slope_rmse_deg"] == 0


def test_batch_loss_outliers_on_a_constructed_series() -> None:
    losses = [1.0 + 0.01 * (i % 3) for i in range(40)]
    losses[3] = 9.0  # before a baseline of window // 2 = 10 values: not an outlier
    losses[15] = 1.6  # above 1.5 x median 1.01
    losses[16] = 1.4  # below it
    losses[30] = 5.0
    losses[31] = 4.0  # right after an outlier: the median baseline is not dragged up
    losses[35] = math.nan  # a blow-up counts and stays out of the baseline
    assert batch_loss_outliers(losses) == [15, 30, 31, 35]
    assert len(batch_loss_outliers(losses, factor=2.0)) == 3
    assert batch_loss_outliers(losses, window=4) == [3, 15, 30, 31, 35]
    assert batch_loss_outliers([]) == []
    assert batch_loss_outliers([*losses[:35], None]) == [15, 30, 31, 35]  # null in JSON


def test_model_spikes_on_a_constructed_probe_series() -> None:
    """The probe loss is the windows' geometric mean: a 20 % rise on every window is a 20 %
    rise whatever their scales; a spike is a rise above the threshold since the probe before."""
    flat, steep = np.array([1.0, 0.9, 1.1]), np.array([0.01, 0.02, 0.015])
    before = probe_loss([*flat, *steep])
    assert probe_loss([*(flat * 1.2), *(steep * 1.2)]) == pytest.approx(1.2 * before)
    assert probe_loss([*flat, *steep, math.nan]) == math.inf
    values = [1.0, 0.9, 0.95, 1.2, 1.1, math.inf, 1.0]
    jumps = probe_jumps(values)
    assert jumps[:5] == pytest.approx([None, -0.1, 0.95 / 0.9 - 1, 1.2 / 0.95 - 1, 1.1 / 1.2 - 1])
    assert jumps[5:] == [math.inf, None]  # a blow-up, then nothing to compare with
    assert probe_rise(values[:5]) == pytest.approx(math.log(0.95 / 0.9) + math.log(1.2 / 0.95))
    assert probe_rise([2.0, 1.5, 1.0]) == 0.0


def test_the_probe_set_takes_every_domain_in_turn() -> None:
    domains = np.array([0] * 10 + [1] * 2 + [2] * 30)
    chosen = probe_indices(domains, 8, seed=0)
    assert np.bincount(domains[chosen]).tolist() == [3, 2, 3]  # domain 1 has only 2
    assert chosen.tolist() == probe_indices(domains, 8, seed=0).tolist()  # fixed by the seed
    assert len(set(chosen.tolist())) == 8
    assert len(probe_indices(domains, 100, seed=0)) == len(domains)
