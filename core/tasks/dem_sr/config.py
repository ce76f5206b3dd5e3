"""dem_sr's config sections: ``[model]`` (RCAN-DEM) and ``[loss]`` (the five components)."""

from __future__ import annotations

import attrs

from core import validators as check


@attrs.define
class RcanSection:
    """RCAN-DEM's size (a preset, with optional overrides) and its norm layers."""

    preset: str = "small"
    norm: str = attrs.field(default="none", validator=attrs.validators.in_(("none", "batch")))
    """``none`` (RCAN's default) or ``batch``, which gives ``domain_bn`` layers to swap."""
    n_resgroups: int = attrs.field(default=0, validator=check.non_negative_int)
    n_resblocks: int = attrs.field(default=0, validator=check.non_negative_int)
    n_feats: int = attrs.field(default=0, validator=check.non_negative_int)
    """Overrides of the preset; 0 keeps the preset's value."""


@attrs.define
class DemLossSection:
    """Base weights of the five DEM loss components (the seed's ``moderate`` profile)."""

    elevation: float = attrs.field(default=1.0, validator=check.non_negative)
    gradient: float = attrs.field(default=0.5, validator=check.non_negative)
    curvature: float = attrs.field(default=0.2, validator=check.non_negative)
    edge: float = attrs.field(default=0.2, validator=check.non_negative)
    spectral: float = attrs.field(default=0.1, validator=check.non_negative)
