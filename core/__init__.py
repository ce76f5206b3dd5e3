"""terraplug core: hook specs, plugin manager, config, training loop, CLIs and the experiment
runner; the built-in tasks are slices under ``core/tasks/``."""

__version__ = "0.2.0"
