"""The task's config sections: ``[model]``, ``[loss]`` and its own ``[denoise]`` of
``config.toml`` (``DemDenoising.sections`` declares all three).

Every key has a default, so ``--task dem_denoise`` alone is a complete run; ``--set
denoise.noise_m=10`` overrides one. terraplug structures each section strictly (unknown keys
and wrong types are refused, naming ``config.denoise.<key>``); the attrs validators here add
the ranges. The task reads ``[denoise]`` as ``config.task_sections["denoise"]``.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
from attrs.validators import and_, ge, gt, instance_of


def _finite(_: Any, attribute: attrs.Attribute, value: float) -> None:
    """NaN and inf pass ``gt``/``ge`` checks poorly (``inf > 0``); refuse them by name."""
    if not math.isfinite(value):
        raise ValueError(f"'{attribute.name}' must be finite, got {value}")


@attrs.define
class DenoiseSection:
    """``[denoise]``: what the task is about, apart from the model that learns it."""

    noise_m: float = attrs.field(default=5.0, validator=and_(_finite, gt(0.0)))
    """Standard deviation in metres of the Gaussian noise added to every tile. A model is
    trained for one noise level, so a resume refuses another one, like a [model] key."""


@attrs.define
class DenoiseModelSection:
    """The CNN's size."""

    channels: int = attrs.field(default=16, validator=and_(instance_of(int), ge(1)))
    """Features of each hidden convolution."""
    depth: int = attrs.field(default=3, validator=and_(instance_of(int), ge(2)))
    """Convolutions in the stack (3x3 each), the first and last included."""


@attrs.define
class DenoiseLossSection:
    """Base weights of the loss components (``DemDenoising.components``); weighting plugins
    such as ``terrain_loss`` scale them per sample."""

    l1: float = attrs.field(default=1.0, validator=and_(_finite, ge(0.0)))
    """Mean absolute error of the denoised tile (normalised units)."""
    gradient: float = attrs.field(default=0.5, validator=and_(_finite, ge(0.0)))
    """Mean absolute error of its finite-difference slopes: keeps edges and ridges sharp
    where a plain L1 loss would accept a blurred tile."""
