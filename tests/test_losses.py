"""The five per-sample DEM loss components: zeros, masks, NaN safety and gradients."""

from __future__ import annotations

import pytest
import torch

from core.tasks.dem_sr.losses import COMPONENTS, dem_loss_components


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rough terrain-like targets, a noisy prediction and a partial mask (sample 2: all valid)."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(3, 1, 24, 24, generator=gen).cumsum(-1).cumsum(-2) / 10
    pred = target + 0.1 * torch.randn(target.shape, generator=gen)
    mask = torch.rand(target.shape, generator=gen) > 0.2
    mask[2] = True
    return pred, target, mask


def test_shape_and_order(batch: tuple[torch.Tensor, ...]) -> None:
    pred, target, mask = batch
    assert COMPONENTS == ("elevation", "gradient", "curvature", "edge", "spectral")
    assert dem_loss_components(pred, target, mask).shape == (3, len(COMPONENTS))


def test_zero_for_perfect_prediction_positive_otherwise(batch: tuple[torch.Tensor, ...]) -> None:
    pred, target, mask = batch
    assert torch.equal(dem_loss_components(target, target, mask), torch.zeros(3, 5))
    assert (dem_loss_components(pred, target, mask) > 0).all()


def test_each_component_on_a_known_case() -> None:
    target = torch.zeros(1, 1, 8, 8)
    mask = torch.ones_like(target, dtype=torch.bool)
    # The known values are exact in float32 (means of 0.5 and 1, stencils of small integers):
    # approx's default rel 1e-6, and 1e-5 for the zeros, admit convolution rounding (~1e-7
    # of the inputs, up to 8) from any kernel; rel 1e-4 for the Sobel mean (measured 1 ulp off).
    offset = dem_loss_components(target + 0.5, target, mask)[0]
    assert offset[0] == pytest.approx(0.5)  # elevation sees a constant offset
    assert offset[1:4].abs().max() < 1e-5  # derivatives do not
    assert offset[4] > 0  # the DC amplitude does
    ramp = torch.arange(8.0).expand(1, 1, 8, 8)
    slope = dem_loss_components(ramp, target, mask)[0]
    assert slope[1] == pytest.approx(0.5)  # dx = 1 on 56 pairs, dy = 0 on 56 pairs
    assert slope[2] < 1e-5  # a plane has no curvature
    assert slope[3] == pytest.approx(8.0, rel=1e-4)  # Sobel |g| of a unit ramp is 8


def test_masked_pixels_of_pred_are_ignored_exactly(batch: tuple[torch.Tensor, ...]) -> None:
    pred, target, mask = batch
    changed = torch.where(mask, pred, pred + 100 * torch.randn_like(pred))
    assert torch.equal(
        dem_loss_components(pred, target, mask), dem_loss_components(changed, target, mask)
    )


def test_nan_target_and_pred_outside_the_mask_are_harmless(
    batch: tuple[torch.Tensor, ...],
) -> None:
    pred, target, mask = batch
    reference = dem_loss_components(pred, target, mask)
    nodata_pred = torch.where(mask, pred, torch.nan).requires_grad_()
    nodata_target = torch.where(mask, target, torch.nan)
    # A NaN target changes the fill (0 instead of the target) but not which pixels count:
    # only the fill-dependent spectral component may move.
    losses = dem_loss_components(nodata_pred, nodata_target, mask)
    assert torch.isfinite(losses).all()
    # float32 defaults: the same pixels counted in the same order, at most a last-bit change
    torch.testing.assert_close(losses[:, :4], reference[:, :4])
    losses.sum().backward()
    assert torch.isfinite(nodata_pred.grad).all()
    assert (nodata_pred.grad[~mask] == 0).all()


def test_sample_without_valid_pixels_scores_zero(batch: tuple[torch.Tensor, ...]) -> None:
    pred, target, mask = batch
    mask = mask.clone()
    mask[0] = False
    pred = pred.clone().requires_grad_()
    losses = dem_loss_components(pred, target, mask)
    assert torch.equal(losses[0], torch.zeros(5))
    assert (losses[1:] > 0).all()
    losses.sum().backward()
    assert torch.isfinite(pred.grad).all()
    assert (pred.grad[0] == 0).all()


def test_every_component_sends_gradient_to_pred(batch: tuple[torch.Tensor, ...]) -> None:
    pred, target, mask = batch
    pred = pred.clone().requires_grad_()
    losses = dem_loss_components(pred, target, mask)
    for k, name in enumerate(COMPONENTS):
        (grad,) = torch.autograd.grad(losses[:, k].sum(), pred, retain_graph=True)
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


def test_no_nan_gradient_at_the_optimum_of_a_flat_tile() -> None:
    target = torch.zeros(2, 1, 12, 12)
    pred = target.clone().requires_grad_()
    dem_loss_components(pred, target, torch.ones_like(target, dtype=torch.bool)).sum().backward()
    assert torch.isfinite(pred.grad).all()


def test_per_sample_independence(batch: tuple[torch.Tensor, ...]) -> None:
    pred, target, mask = batch
    full = dem_loss_components(pred, target, mask)
    # float32 defaults (atol 1e-5): a batch of 3 may pick other convolution kernels than a
    # batch of 1, whose rounding moves losses below 0.4 by ~1e-7
    torch.testing.assert_close(dem_loss_components(pred[1:2], target[1:2], mask[1:2]), full[1:2])
