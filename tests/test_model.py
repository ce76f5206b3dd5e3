"""RCAN-DEM: shapes, sizes, norm option and the bicubic starting point."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.tasks.dem_sr.rcan import PRESETS, build_rcan


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_output_shape_for_each_scale(scale: int) -> None:
    model = build_rcan("small", scale)
    out = model(torch.randn(2, 1, 10, 12))
    assert out.shape == (2, 1, 10 * scale, 12 * scale)


@pytest.mark.parametrize(("scale", "expected"), [(2, 15_442_337), (3, 15_626_977), (4, 15_590_049)])
def test_default_preset_is_the_seed_sized_rcan(scale: int, expected: int) -> None:
    with torch.device("meta"):
        count = n_params(build_rcan("default", scale))
    assert count == expected
    assert abs(count - 15.6e6) / 15.6e6 < 0.02  # the seed's "15.6 M", whatever the upsampler


def test_small_preset_is_small() -> None:
    assert n_params(build_rcan("small", 3)) == 224_313


def test_norm_batch_adds_batchnorm_after_first_conv_of_each_rcab() -> None:
    plain = build_rcan("small", 3)
    batch = build_rcan("small", 3, norm="batch")
    bns = [m for m in batch.modules() if isinstance(m, nn.BatchNorm2d)]
    sizes = PRESETS["small"]
    assert len(bns) == sizes["n_resgroups"] * sizes["n_resblocks"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    rcab = batch.body[0].body[0]
    assert isinstance(rcab.body[0], nn.Conv2d) and isinstance(rcab.body[1], nn.BatchNorm2d)
    assert batch(torch.randn(3, 1, 8, 8)).shape == (3, 1, 24, 24)


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_untrained_model_is_bicubic_interpolation(norm: str) -> None:
    model = build_rcan("small", 3, norm=norm).eval()
    lr = torch.randn(2, 1, 16, 16)
    expected = F.interpolate(lr, scale_factor=3, mode="bicubic", align_corners=False)
    with torch.no_grad():  # the same F.interpolate plus a zero residual: float32 defaults
        torch.testing.assert_close(model(lr), expected)


def test_gradients_reach_the_head_after_one_step() -> None:
    # The zero tail blocks gradients upstream only until its first update.
    torch.manual_seed(0)
    model = build_rcan("small", 2)
    lr, hr = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 16, 16)
    for _ in range(2):
        model.zero_grad()
        (model(lr) - hr).abs().mean().backward()
        with torch.no_grad():  # plain SGD by hand: building a torch optimizer costs seconds
            for p in model.parameters():
                p -= 0.01 * p.grad
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0


def test_overrides_replace_preset_sizes() -> None:
    model = build_rcan("small", 2, n_feats=16)
    assert model.head.out_channels == 16


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"preset": "huge", "scale": 2}, "default, small"),
        ({"preset": "small", "scale": 2, "norm": "layer"}, "none, batch"),
        ({"preset": "small", "scale": 5}, "(2, 3, 4)"),
        ({"preset": "small", "scale": 2, "n_feat": 8}, "n_feats"),
    ],
)
def test_bad_arguments_name_the_valid_choices(kwargs: dict, names: str) -> None:
    with pytest.raises(ValueError, match=re.escape(names)):
        build_rcan(**kwargs)
