"""Models of the built-in tasks: RCAN-DEM for dem_sr."""

from core.models.rcan import NORMS, PRESETS, RCAN, SCALES, build_rcan

__all__ = ["NORMS", "PRESETS", "RCAN", "SCALES", "build_rcan"]
