"""The data layer: GeoTIFF I/O, tile datasets, terrain labels and the built-in tile sources.

- ``geotiff``: read/write single-band DEMs, nodata as NaN, cell sizes in metres.
- ``dataset``: ``TileDataset`` (LR/HR pairs from a folder) and ``train_val_split``.
- ``labels``: terrain category from a region name or from the DEM itself.
- ``regions``, ``tiling``, ``sources``: the built-in DEM sources (SRTM 90 m by default, GLOBE,
  10 m Colorado), cut into labelled tiles with a spatially separate validation block.
- ``globe``: the GLOBE source and its artefact detectors.
- ``procedural``: small synthetic tiles for fast tests.

Submodules are imported explicitly (``from core.data.dataset import TileDataset``) so that
reading a GeoTIFF does not pull in torch.
"""
