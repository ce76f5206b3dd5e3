"""``sar2opt``: TerraTorch's TerraMind generating Sentinel-2 L2A from Sentinel-1 GRD, tuned
with LoRA through a generator plugin.

- ``task``: the :class:`~core.tasks.Task` the trainer runs (``SarToOptical``).
- ``config``: the ``[model]`` section (TerraMind size, LoRA, generation); ``[loss]`` is empty.
- ``data``: co-registered SAR/optical pair datasets and the procedural default pairs;
  ``bigearthnet``: the six real BigEarthNet pairs that validate by default.
- ``terramind``, ``adapters``, ``terratorch_import``: TerraMind's differentiable paths, LoRA
  adapters in peft's format, and the import shim for a CUDA build of torchvision.
- ``metrics``, ``plots``, ``predict``: reflectance and token scores, the run's PNG, and the
  tool behind ``python -m core.predict`` for sar2opt runs.
"""
