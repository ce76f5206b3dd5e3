"""The five terrain categories every task and plugin agrees on.

Categories are integers in batches (so they move to devices and collate) and names
everywhere a person reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TERRAINS: tuple[str, ...] = ("flat", "moderate", "alpine", "desert", "extreme")
"""Category names, in index order: ``TERRAINS[batch["terrain"][i]]`` names sample ``i``."""

TERRAIN_INDEX: dict[str, int] = {name: i for i, name in enumerate(TERRAINS)}


def terrain_index(name: str) -> int:
    """Index of a category name; raises ``KeyError`` naming the valid choices."""
    try:
        return TERRAIN_INDEX[name]
    except KeyError:
        raise KeyError(f"unknown terrain {name!r}; expected one of {', '.join(TERRAINS)}") from None


def require_terrain_labels(terrain: Any, domains: Sequence[str], plugin: str) -> None:
    """Refuse a ``[B]`` tensor of terrain labels outside ``0..len(domains) - 1``, naming
    ``plugin``; a plugin that indexes per-terrain tables with the labels calls it first."""
    if bool(((terrain < 0) | (terrain >= len(domains))).any()):
        raise ValueError(
            f"plugin {plugin}: terrain labels {sorted(set(terrain.tolist()))} outside "
            f"0..{len(domains) - 1} ({', '.join(domains)})"
        )
