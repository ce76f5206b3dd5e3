"""dem_denoise: a template third-party terraplug task that learns to remove noise from DEMs.

Registered in ``pyproject.toml`` under the ``terraplug.tasks`` entry-point group, so after
``pip install`` it trains with ``python -m core.run --task dem_denoise [--data DIR]`` and
every strategy plugin applies to it. It imports only ``terraplug`` and ``terraplug.data``
from the framework; the modules split what a task provides:

- ``config``: the ``[model]``, ``[loss]`` and ``[denoise]`` config sections (attrs classes),
- ``data``: GeoTIFF tiles made noisy (a folder, or the built-in DEM tiles), as a dataset
  the trainer and samplers can use,
- ``model``: the residual CNN,
- ``task``: the :class:`terraplug.Task` the trainer calls (losses, validation, plots).
"""

from terraplug_example_task.task import DemDenoising

__all__ = ["DemDenoising"]
