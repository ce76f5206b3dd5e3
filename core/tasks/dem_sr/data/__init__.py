"""dem_sr's data: tile datasets, terrain labels and the built-in DEM sources.

- ``dataset``: ``TileDataset`` (LR/HR pairs from a folder of GeoTIFFs) and ``load_split``.
- ``labels``: terrain category from a region name or from the DEM itself.
- ``regions``, ``tiling``, ``sources``: the built-in DEM sources (SRTM 90 m by default, GLOBE,
  10 m Colorado), cut into labelled tiles with a spatially separate validation block.
- ``globe``: the GLOBE source and its artefact detectors.
- ``procedural``: small synthetic tiles for fast tests.
"""
