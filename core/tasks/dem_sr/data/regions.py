"""Named lat/lon boxes of the built-in elevation sources, each with its terrain category.

Names carry what elevation cannot (a basin floor and a farmed plain are equally level), so the
built-in datasets label tiles by the box they fall in, as the seed labels its tiles by region,
unless the tile's own measurements clearly contradict the box's category; a tile outside every
box is left to the automatic classifier (``core.tasks.dem_sr.data.labels``). Boxes are in
degrees of the source's own geographic CRS; docs/data-format.md shows the SRTM boxes with the
measurements behind them.
"""

from __future__ import annotations

import attrs

from core.tasks.dem_sr.terrain import TERRAINS


@attrs.frozen
class Region:
    """A named lat/lon box (degrees) of one terrain category, and why it has that category."""

    name: str
    category: str = attrs.field(validator=attrs.validators.in_(TERRAINS))
    south: float
    north: float
    west: float
    east: float
    reason: str = ""

    def contains(self, south: float, north: float, west: float, east: float) -> bool:
        """Whether the box holds the whole of the given bounds."""
        return (
            self.south <= south and north <= self.north and self.west <= west and east <= self.east
        )


GLOBE_REGIONS: tuple[Region, ...] = (
    Region("ganges_plain", "flat", 25.6, 27.2, 79.2, 84.8),
    Region("punjab_plain", "flat", 29.6, 31.6, 71.6, 75.6),
    Region("mesopotamia", "flat", 30.8, 33.2, 44.0, 46.8),
    Region("sindh_plain", "flat", 25.6, 28.4, 67.8, 69.4),
    Region("hungarian_plain", "flat", 46.0, 47.6, 19.6, 21.6),
    Region("massif_central", "moderate", 44.4, 46.2, 2.0, 4.4),
    Region("bohemian_massif", "moderate", 48.4, 50.0, 12.4, 16.4),
    Region("vosges_black_forest", "moderate", 47.6, 48.8, 6.8, 8.8),
    Region("aravalli", "moderate", 24.0, 26.8, 72.8, 75.2),
    Region("vindhya", "moderate", 23.2, 25.2, 77.2, 81.6),
    Region("alps", "alpine", 45.6, 47.2, 6.4, 13.6),
    Region("pyrenees", "alpine", 42.4, 43.2, 0.0, 2.8),
    Region("carpathians", "alpine", 45.2, 45.8, 22.4, 26.0),
    Region("caucasus", "alpine", 42.4, 43.6, 40.0, 47.0),
    Region("zagros", "alpine", 30.4, 33.6, 49.2, 51.6),
    Region("tian_shan", "alpine", 41.6, 43.0, 76.0, 81.0),
    Region("great_sand_sea", "desert", 24.0, 28.4, 24.0, 27.2),
    Region("grand_erg_oriental", "desert", 28.4, 31.2, 6.0, 9.6),
    Region("rub_al_khali", "desert", 18.4, 21.6, 48.0, 54.0),
    Region("thar", "desert", 25.6, 28.4, 70.0, 72.8),
    Region("karakum", "desert", 38.4, 40.8, 58.8, 63.2),
    Region("taklamakan", "desert", 38.0, 40.4, 79.2, 86.8),
    Region("himalaya", "extreme", 27.6, 28.8, 83.6, 88.4),
    Region("karakoram", "extreme", 35.2, 36.4, 74.4, 77.6),
    Region("indus_gorge", "extreme", 34.8, 35.6, 73.2, 74.4),
    Region("hindu_kush", "extreme", 35.2, 36.8, 69.6, 72.4),
    Region("pamir", "extreme", 37.2, 39.2, 71.6, 75.2),
)
"""NOAA GLOBE tile G's named regions (Europe, North Africa, Asia to 90°E)."""


SRTM_REGIONS: tuple[Region, ...] = (
    Region(
        "san_joaquin_valley",
        "flat",
        36.63,
        37.45,
        -120.76,
        -120.30,
        "Central Valley floor, 30-210 m: an alluvial plain, 0.8° mean slope",
    ),
    Region(
        "sierra_foothills",
        "moderate",
        37.85,
        38.45,
        -120.60,
        -120.05,
        "western Sierra foothills, 330-2070 m: rolling ridges cut by river canyons",
    ),
    Region(
        "southern_foothills",
        "moderate",
        36.90,
        37.30,
        -119.95,
        -119.60,
        "foothills east of Madera, 100-770 m: low rounded hills",
    ),
    Region(
        "yosemite_high_country",
        "alpine",
        37.78,
        38.15,
        -119.55,
        -119.20,
        "Tuolumne high country, 2370-3580 m: glaciated granite domes and U-shaped valleys",
    ),
    Region(
        "high_sierra",
        "alpine",
        37.00,
        37.45,
        -118.95,
        -118.60,
        "John Muir Wilderness, 2300-3870 m: cirques, glaciated crests and basins",
    ),
    Region(
        "white_mountains",
        "alpine",
        37.45,
        37.90,
        -118.35,
        -118.15,
        "White Mountains, 1450-3900 m: a high range of rounded summits and ridges",
    ),
    Region(
        "owens_valley",
        "desert",
        36.63,
        37.30,
        -118.28,
        -118.15,
        "Owens Valley, 1160-2360 m: an arid graben floor and its alluvial fans",
    ),
    Region(
        "round_valley",
        "desert",
        37.30,
        37.55,
        -118.60,
        -118.38,
        "Bishop basin and volcanic tableland, 1260-1920 m: arid floor and fans",
    ),
    Region(
        "fish_lake_valley",
        "desert",
        37.45,
        37.85,
        -118.05,
        -117.92,
        "Fish Lake Valley, 1440-2450 m: an arid basin east of the White Mountains",
    ),
    Region(
        "saline_valley",
        "desert",
        36.63,
        36.90,
        -117.90,
        -117.65,
        "Saline Valley, 320-1730 m: a closed basin with a salt pan and bajadas",
    ),
    Region(
        "eureka_valley",
        "desert",
        37.00,
        37.30,
        -117.80,
        -117.66,
        "Eureka Valley, 880-1940 m: a closed basin with dunes and fans",
    ),
    Region(
        "columbus_basin",
        "desert",
        37.95,
        38.30,
        -118.20,
        -117.70,
        "Great Basin floors by Columbus Salt Marsh, 1380-2150 m: playas, fans, low hills",
    ),
    Region(
        "clayton_basin",
        "desert",
        37.70,
        38.30,
        -117.64,
        -117.31,
        "Great Basin floors around Clayton Valley, 1300-2160 m: playas, fans, low hills",
    ),
    Region(
        "kings_canyon",
        "extreme",
        36.75,
        36.97,
        -118.85,
        -118.50,
        "South and Middle Fork Kings canyons, 1360-3500 m: walls up to 2 km deep",
    ),
    Region(
        "sierra_escarpment",
        "extreme",
        36.63,
        37.25,
        -118.50,
        -118.28,
        "eastern Sierra front, Palisades to Independence, 1260-3920 m: a fault scarp",
    ),
    Region(
        "inyo_escarpment",
        "extreme",
        36.63,
        36.90,
        -118.05,
        -117.85,
        "Inyo Mountains above Saline Valley, 520-3040 m: a fault scarp cut by gorges",
    ),
    Region(
        "yosemite_valley",
        "extreme",
        37.70,
        37.78,
        -119.70,
        -119.50,
        "Yosemite Valley, 1220-2560 m: 1 km vertical granite walls (El Capitan, Half Dome)",
    ),
    Region(
        "tuolumne_canyon",
        "extreme",
        37.88,
        37.98,
        -119.85,
        -119.50,
        "Grand Canyon of the Tuolumne and Hetch Hetchy, 1150-2880 m: a deep gorge",
    ),
)
"""The SRTM 90 m source's named regions (central California to western Nevada)."""

COLORADO_REGIONS: tuple[Region, ...] = (
    Region(
        "elk_mountains",
        "alpine",
        38.93,
        39.00,
        -107.15,
        -107.05,
        "Elk Mountains near Crested Butte, 2730-3760 m: glaciated peaks and cirques",
    ),
)
"""The 10 m Colorado source: one alpine region covering the whole raster."""
