"""Data helpers for third-party tasks: GeoTIFFs read with the built-in tasks' guards (the
GeoTIFF driver only, no sidecars, voids as NaN, errors naming the file), bookkeeping of
skipped files, and the seeded per-domain train/validation split."""

from core.data.datasets import SkippedFiles, train_val_split
from core.data.geotiff import Dem, read_dem, write_dem

__all__ = ["Dem", "SkippedFiles", "read_dem", "train_val_split", "write_dem"]
