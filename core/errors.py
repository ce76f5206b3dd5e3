"""Errors a user can fix. The CLIs print their message and exit with status 2."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input: the message names the offending option, key, file or plugin."""


class ConfigError(UsageError):
    """An unknown config key, a value of the wrong type, or a malformed TOML file."""


class DataError(UsageError):
    """An unreadable, empty or inconsistent raster or data folder."""


class PluginError(UsageError):
    """An unknown plugin, a broken entry point, or two plugins claiming one exclusive hook."""
