"""RCAN-DEM: the residual channel attention network of Zhang et al. (ECCV 2018) for one-band DEMs.

Laid out like EDSR-PyTorch's ``src/model/rcan.py``: channel attention -> RCAB -> residual group
-> head / body / tail with a long skip. Differences, all for DEMs:

* one band in and out, and no RGB mean shift: tiles arrive normalised (zero mean, and unit
  std per tile or one global scale), so the data layer already does what ``MeanShift`` did;
* a global bicubic skip: the network predicts the residual over the bicubic upsampled input,
  and the tail's last conv starts at zero, so an untrained model *is* bicubic interpolation
  and training starts from interpolation quality instead of from noise;
* ``norm="batch"`` puts a ``BatchNorm2d`` after the first conv of every RCAB, the seam where a
  plugin swaps in a terrain-adaptive norm (RCAN itself, like EDSR, uses none).

Two more seams, reached by forward hooks so parameter names stay as they are: the output of
every ``ResidualGroup`` (where ``terrain_embedding`` applies its per-terrain FiLM) and the
output of ``RCAN.body`` (the deep features ``terrain_head`` pools and classifies).

Parameter counts (``norm="none"``; ``"batch"`` adds 64 per RCAB in "default", 32 in "small"):

========  =============  =============  =============
preset    scale 2        scale 3        scale 4
========  =============  =============  =============
default   15,442,337     15,626,977     15,590,049
small          178,073        224,313        215,065
========  =============  =============  =============

"default" is RCAN's 10 groups x 20 blocks x 64 features, the seed's 15.6 M-parameter
RCAN-DEM v2. "small" (2 x 3 x 32) takes about 0.07 s for forward + backward + Adam step on a
batch of ten 16x16 LR tiles at scale 3 on 2 CPU cores (about 5 s per epoch of 600 tiles).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SCALES: tuple[int, ...] = (2, 3, 4)
NORMS: tuple[str, ...] = ("none", "batch")

PRESETS: dict[str, dict[str, int]] = {
    "default": {"n_resgroups": 10, "n_resblocks": 20, "n_feats": 64, "reduction": 16},
    "small": {"n_resgroups": 2, "n_resblocks": 3, "n_feats": 32, "reduction": 8},
}
"""Architecture sizes by name; ``build_rcan`` takes one and lets keyword overrides win."""


def conv3x3(in_channels: int, out_channels: int, bias: bool = True) -> nn.Conv2d:
    """A 'same'-padded 3x3 convolution, the only spatial kernel RCAN uses."""
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: rescale each channel by a gate computed from its global mean."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class RCAB(nn.Module):
    """Residual channel attention block: conv [-> BN] -> ReLU -> conv -> attention, plus skip."""

    def __init__(self, n_feats: int, reduction: int, norm: str) -> None:
        super().__init__()
        batch_norm = norm == "batch"
        layers: list[nn.Module] = [conv3x3(n_feats, n_feats, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(n_feats))
        layers += [
            nn.ReLU(inplace=True),
            conv3x3(n_feats, n_feats),
            ChannelAttention(n_feats, reduction),
        ]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResidualGroup(nn.Module):
    """A chain of RCABs closed by a conv, with a short skip around the whole group."""

    def __init__(self, n_feats: int, n_resblocks: int, reduction: int, norm: str) -> None:
        super().__init__()
        blocks = [RCAB(n_feats, reduction, norm) for _ in range(n_resblocks)]
        self.body = nn.Sequential(*blocks, conv3x3(n_feats, n_feats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Upsampler(nn.Sequential):
    """Sub-pixel convolution: one x3 stage for scale 3, x2 stages for scales 2 and 4."""

    def __init__(self, scale: int, n_feats: int) -> None:
        factors = [3] if scale == 3 else [2] * (scale.bit_length() - 1)
        layers: list[nn.Module] = []
        for factor in factors:
            layers += [conv3x3(n_feats, factor * factor * n_feats), nn.PixelShuffle(factor)]
        super().__init__(*layers)


class RCAN(nn.Module):
    """RCAN for single-band DEMs: ``[B, 1, h, w] -> [B, 1, h*scale, w*scale]``, both normalised."""

    def __init__(
        self,
        scale: int,
        n_resgroups: int,
        n_resblocks: int,
        n_feats: int,
        reduction: int = 16,
        norm: str = "none",
    ) -> None:
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f"unsupported scale {scale!r}; expected one of {SCALES}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(NORMS)}")
        self.scale = scale
        self.head = conv3x3(1, n_feats)
        groups = [ResidualGroup(n_feats, n_resblocks, reduction, norm) for _ in range(n_resgroups)]
        self.body = nn.Sequential(*groups, conv3x3(n_feats, n_feats))
        self.tail = nn.Sequential(Upsampler(scale, n_feats), conv3x3(n_feats, 1))
        # Zero residual at init: the model starts as exactly bicubic interpolation.
        nn.init.zeros_(self.tail[-1].weight)
        nn.init.zeros_(self.tail[-1].bias)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        base = F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False)
        features = self.head(lr)
        features = features + self.body(features)
        return base + self.tail(features)


def build_rcan(preset: str, scale: int, norm: str = "none", **overrides: int) -> RCAN:
    """Build a preset RCAN; ``overrides`` (e.g. ``n_feats=48``) replace the preset's sizes."""
    if preset not in PRESETS:
        raise ValueError(f"unknown RCAN preset {preset!r}; expected one of {', '.join(PRESETS)}")
    sizes = PRESETS[preset]
    unknown = sorted(set(overrides) - set(sizes))
    if unknown:
        raise ValueError(
            f"unknown RCAN override(s) {', '.join(unknown)}; expected any of {', '.join(sizes)}"
        )
    return RCAN(scale=scale, norm=norm, **{**sizes, **overrides})
