"""The data layer: GeoTIFF I/O, tile datasets, terrain labels and the built-in tile sources.

- ``geotiff``: read/write single-band DEMs, nodata as NaN, cell sizes in metres.
- ``dataset``: ``TileDataset`` (LR/HR pairs from a folder) and ``train_val_split``.
- ``labels``: terrain category from a region name or from the DEM itself.
- ``globe``: the embedded default dataset, cut from NOAA GLOBE tile G.
- ``procedural``: small synthetic tiles for fast tests.

Submodules are imported explicitly (``from core.data.dataset import TileDataset``) so that
reading a GeoTIFF does not pull in torch.
"""
