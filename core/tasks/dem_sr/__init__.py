"""``dem_sr``: DEM super-resolution with RCAN-DEM on GeoTIFF tiles labelled with five
terrain categories.

- ``task``: the :class:`~core.tasks.Task` the trainer runs (``DemSuperResolution``).
- ``config``: the ``[model]`` (RCAN size, norm) and ``[loss]`` (component weights) sections.
- ``data/``: tile datasets, terrain labels, the built-in sources (SRTM 90 m by default, GLOBE,
  10 m Colorado) and procedural tiles for tests.
- ``rcan``, ``losses``, ``metrics``, ``plots``, ``terrain``: the model, the five loss
  components, errors in metres and degrees, the run's PNGs, the category names.
- ``predict``, ``classify``: the tools behind ``python -m core.predict`` and
  ``python -m core.classify``.
"""
