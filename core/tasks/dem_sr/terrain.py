"""dem_sr's five terrain categories, the domains its samples are labelled with.

Categories are integers in batches (so they move to devices and collate) and names
everywhere a person reads them.
"""

from __future__ import annotations

TERRAINS: tuple[str, ...] = ("flat", "moderate", "alpine", "desert", "extreme")
"""Category names, in index order: ``TERRAINS[batch["terrain"][i]]`` names sample ``i``."""

TERRAIN_INDEX: dict[str, int] = {name: i for i, name in enumerate(TERRAINS)}


def terrain_index(name: str) -> int:
    """Index of a category name; raises ``KeyError`` naming the valid choices."""
    try:
        return TERRAIN_INDEX[name]
    except KeyError:
        raise KeyError(f"unknown terrain {name!r}; expected one of {', '.join(TERRAINS)}") from None
