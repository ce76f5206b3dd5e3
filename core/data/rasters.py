"""Rasters a process keeps open for windowed reads, so a sample costs one read, not an open.

A dataset over rasters of any size reads one window per sample (``core.data.window_index``);
opening a GeoTIFF for each window would cost more than reading it. Each process keeps its
own handles: a GDAL handle must not cross a fork, so a DataLoader worker opens its own.
"""

from __future__ import annotations

import collections
import os

import rasterio
from rasterio.io import DatasetReader

from core.data.geotiff import GEOTIFF_ONLY

GDAL_CACHE_MB = 64
"""GDAL's block cache while windows are read: enough for the blocks a batch touches, and a
cap on what a large raster would otherwise fill (5 % of RAM by default)."""
OPEN_FILES = 64
"""Rasters a process keeps open; a folder of ten thousand tiles must not exhaust the
operating system's file handles."""


class OpenRasters:
    """The rasters one process has open (GeoTIFF driver only), least recently used closed
    first; a forked DataLoader worker opens its own."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._open: collections.OrderedDict[str, DatasetReader] = collections.OrderedDict()

    def get(self, path: str) -> DatasetReader:
        if self._pid != os.getpid():
            self._pid, self._open = os.getpid(), collections.OrderedDict()
        ds = self._open.get(path)
        if ds is None:
            with rasterio.Env(**GEOTIFF_ONLY):
                ds = rasterio.open(path, driver="GTiff")
            self._open[path] = ds
            if len(self._open) > OPEN_FILES:
                self._open.popitem(last=False)[1].close()
        self._open.move_to_end(path)
        return ds

    def __getstate__(self) -> dict:
        return {}  # open handles stay with their process

    def __setstate__(self, state: dict) -> None:
        self.__init__()
