"""attrs validators for numeric config keys.

Every message starts with the key's name in quotes and says the allowed range, like attrs'
own ``ge``/``gt``; ``core.config.structure`` adds the key's full path, so a bad value reads
``'lr' must be > 0: -1.0 @ config.optim.lr``. A value is checked when the config is built,
before any data is read.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
from attrs.validators import and_, ge, gt, le, lt, optional

SEED_LIMIT = 2**32
"""numpy's legacy seeding (``accelerate.utils.set_seed``) takes seeds below 2**32."""


def finite(_: Any, attribute: attrs.Attribute, value: float) -> None:
    """Refuse NaN and infinities (``ge(0)`` alone lets ``inf`` through)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"'{attribute.name}' must be a finite number: {value}")


positive_int = ge(1)
non_negative_int = ge(0)
positive = and_(finite, gt(0.0))
non_negative = and_(finite, ge(0.0))
optional_non_negative = optional(non_negative)
open_fraction = and_(finite, gt(0.0), lt(1.0))
fraction = and_(finite, ge(0.0), le(1.0))
seed = and_(ge(0), lt(SEED_LIMIT))


def step_numbers(_: Any, attribute: attrs.Attribute, value: tuple[int, ...]) -> None:
    """Optimizer step numbers count from 1."""
    if any(step < 1 for step in value):
        raise ValueError(f"'{attribute.name}' must list steps >= 1: {list(value)}")
