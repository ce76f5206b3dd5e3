"""terraplug core: hook specs, plugin manager, config, training loop and the built-in tasks."""

__version__ = "0.1.0"
