"""Per-tile scores of generated Sentinel-2 L2A against the target, in reflectance.

Each function returns one value per tile (``[B]`` or ``[B, bands]``), so the task can sum
them over tiles and processes and divide once: the metrics do not depend on how tiles were
batched or shared between processes. ``mask`` (``[B, 1, H, W]``, the sample's valid pixels)
keeps filled nodata pixels out of every score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.tasks.sar2opt.data import OPTICAL_BANDS

RED, NIR = OPTICAL_BANDS.index("B04"), OPTICAL_BANDS.index("B08")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per tile, the mean of ``values`` ``[B, C, H, W]`` over the pixels ``mask`` keeps
    (every channel of them): the plain mean when every pixel is valid."""
    weight = mask.to(values.dtype).expand_as(values)
    return (values * weight).sum((1, 2, 3)) / weight.sum((1, 2, 3)).clamp_min(1)


def psnr(generated: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """dB, for reflectance in [0, 1]."""
    return -10 * torch.log10(masked_mean((generated - target).square(), mask).clamp_min(1e-10))


def band_l1(generated: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, 12]``: mean absolute reflectance error of each band."""
    weight = mask.to(generated.dtype)
    error = ((generated - target).abs() * weight).sum((2, 3))
    return error / weight.sum((2, 3)).clamp_min(1)


def spectral_angle(
    generated: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean angle in degrees between generated and target spectra, per pixel: 0 when the
    spectral shape is right whatever the brightness."""
    cosine = F.cosine_similarity(generated, target, dim=1, eps=1e-8).clamp(-1, 1)
    return masked_mean(torch.rad2deg(torch.arccos(cosine))[:, None], mask)


def ndvi(optical: torch.Tensor) -> torch.Tensor:
    red, nir = optical[:, RED], optical[:, NIR]
    return (nir - red) / (nir + red).clamp_min(1e-6)


def ndvi_error(generated: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute NDVI error: vegetation as a downstream user reads it."""
    return masked_mean((ndvi(generated) - ndvi(target)).abs()[:, None], mask)


def token_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile: cross-entropy of the token logits against the target's tokens (what
    ``teacher_forcing`` minimises) and the share of positions whose most likely token is
    the target's."""
    cross_entropy = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)
    accuracy = (logits.argmax(-1) == targets).float().mean(1)
    return cross_entropy, accuracy
