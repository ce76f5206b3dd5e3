"""The five DEM loss components of RCAN-DEM, per sample, so plugins can weight both axes.

``dem_loss_components`` returns ``[B, 5]``: one masked mean per sample and component, in the
normalised units of the batch (per-pixel differences, no cell size). Reducing that matrix to a
scalar (weights, terrain balancing) is the job of the trainer and the loss plugins.

Masking: before anything else, invalid pixels of *both* prediction and target are set to the
target's value there (0 where the target is not finite). Every difference at an invalid pixel
is then exactly zero, the prediction at invalid pixels gets exactly zero gradient, and changing
it cannot change any component. Stencil components (gradient, curvature, edge) additionally
count only positions whose whole stencil is valid. A sample without valid pixels scores 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COMPONENTS: tuple[str, ...] = ("elevation", "gradient", "curvature", "edge", "spectral")
"""Column names of ``dem_loss_components``' output, in order."""

_EPS = 1e-12  # keeps sqrt differentiable where a gradient or spectrum amplitude is exactly 0

_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of ``values`` over ``valid`` ([B, ...] -> [B]); 0 where none is valid."""
    valid = valid.to(values.dtype)
    dims = tuple(range(1, values.dim()))
    return (values * valid).sum(dims) / valid.sum(dims).clamp_min(1.0)


def _stencil_valid(mask: torch.Tensor, footprint: torch.Tensor) -> torch.Tensor:
    """Interior positions whose every footprint pixel is valid ([B,1,H,W] -> [B,1,H-2,W-2])."""
    hits = F.conv2d(mask.to(footprint.dtype), footprint[None, None])
    return hits == footprint.sum()


def _sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude on the interior ([B,1,H,W] -> [B,1,H-2,W-2])."""
    kx = _SOBEL_X.to(x)
    kernels = torch.stack([kx, kx.T])[:, None]
    g = F.conv2d(x, kernels)
    return (g.square().sum(1, keepdim=True) + _EPS).sqrt()


def _log_amplitude(x: torch.Tensor) -> torch.Tensor:
    """log(1 + |FFT|) with orthonormal scaling, so tile size does not change the loss scale."""
    spectrum = torch.view_as_real(torch.fft.rfft2(x, norm="ortho"))
    return torch.log1p((spectrum.square().sum(-1) + _EPS).sqrt())


def dem_loss_components(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per-sample, per-component losses ``[B, 5]`` in ``COMPONENTS`` order.

    pred, target: ``[B, 1, H, W]`` normalised elevations; mask: ``[B, 1, H, W]`` bool, True =
    valid target pixel. Components, each a per-sample mean over valid positions:

    * elevation: ``|p - t|``.
    * gradient: ``|dp - dt|`` over first differences along x and y, where both pixels are valid.
    * curvature: ``|lap(p) - lap(t)|``, 5-point Laplacian, where the whole cross is valid.
    * edge: ``|S(p) - S(t)|`` with S the Sobel gradient magnitude, where the whole 3x3 window
      is valid, as a weighted mean with weight ``1 + S(t) / mean(S(t))`` (target only, no
      gradient): pixels on strong target edges (cliffs, ridges) count up to several times more
      than flat ones, and the weight is independent of the tile's relief.
    * spectral: mean over frequency bins of ``|log(1+|F(p)|) - log(1+|F(t)|)|`` (rfft2,
      orthonormal, so it is normalised by pixel count), with invalid pixels filled identically
      in both so they contribute nothing.
    """
    valid = mask.bool() & torch.isfinite(target)
    t = torch.where(torch.isfinite(target), target, torch.zeros_like(target))
    p = torch.where(valid, pred, t)
    diff = p - t

    elevation = _masked_mean(diff.abs(), valid)

    dx = diff[..., :, 1:] - diff[..., :, :-1]
    dy = diff[..., 1:, :] - diff[..., :-1, :]
    valid_x = valid[..., :, 1:] & valid[..., :, :-1]
    valid_y = valid[..., 1:, :] & valid[..., :-1, :]
    grad_sum = (dx.abs() * valid_x).sum((1, 2, 3)) + (dy.abs() * valid_y).sum((1, 2, 3))
    grad_count = valid_x.sum((1, 2, 3)) + valid_y.sum((1, 2, 3))
    gradient = grad_sum / grad_count.clamp_min(1).to(grad_sum.dtype)

    laplace = _LAPLACE.to(diff)
    curvature = _masked_mean(
        F.conv2d(diff, laplace[None, None]).abs(), _stencil_valid(valid, laplace.abs())
    )

    window = _stencil_valid(valid, torch.ones(3, 3, dtype=diff.dtype, device=diff.device))
    edge_t = _sobel_magnitude(t)
    strength = _masked_mean(edge_t, window).clamp_min(_EPS)
    weight = (1.0 + edge_t / strength[:, None, None, None]).detach() * window
    edge_err = (_sobel_magnitude(p) - edge_t).abs()
    edge = (edge_err * weight).sum((1, 2, 3)) / weight.sum((1, 2, 3)).clamp_min(1.0)

    spectral = (_log_amplitude(p) - _log_amplitude(t)).abs().mean((1, 2, 3))

    return torch.stack([elevation, gradient, curvature, edge, spectral], dim=1)
