"""Errors a user can fix. The CLIs print their message and exit with status 2, except
``StorageError`` (exit 1: the input was fine, the disk was not)."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input: the message names the offending option, key, file or plugin."""


class ConfigError(UsageError):
    """An unknown config key, a value of the wrong type, or a malformed TOML file."""


class DataError(UsageError):
    """An unreadable, empty or inconsistent raster or data folder."""


class PluginError(UsageError):
    """An unknown plugin, a broken entry point, or two plugins claiming one exclusive hook."""


class CheckpointError(UsageError):
    """A checkpoint that is missing, damaged, holds more than tensors and plain values, or
    holds non-finite weights."""


class StorageError(Exception):
    """The disk refused a write (full, over quota, over a file-size limit); the message
    names the device and the file, whose previous version is left as it was."""
