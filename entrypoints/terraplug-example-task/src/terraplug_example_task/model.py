"""The noise estimator: a plain convolution stack (residual learning, as in DnCNN).

The model predicts the noise and the task subtracts it (``denoise``): the noise is a small,
structureless residual, easier to learn than the whole tile, and with the last layer
starting at zero the untrained model leaves its input unchanged, so training starts from
the noisy input's score and can only be judged against it.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn


class NoiseCNN(nn.Module):
    """``depth`` 3x3 convolutions with ``channels`` features and ReLUs between them,
    mapping ``[B, 1, H, W]`` normalised noisy tiles to their estimated noise."""

    def __init__(self, channels: int = 16, depth: int = 3) -> None:
        super().__init__()
        widths = [1, *[channels] * (depth - 1), 1]
        layers: list[nn.Module] = []
        for n_in, n_out in pairwise(widths):
            # replicate padding: a zero border would look like a cliff to remove
            layers += [nn.Conv2d(n_in, n_out, 3, padding=1, padding_mode="replicate"), nn.ReLU()]
        self.body = nn.Sequential(*layers[:-1])  # no ReLU after the last: noise has both signs
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        return self.body(noisy)


def denoise(model: nn.Module, noisy: torch.Tensor) -> torch.Tensor:
    """The denoised tiles: the input minus the model's noise estimate."""
    return noisy - model(noisy)
