"""Errors a user can fix, and the exit statuses of every command (DESIGN.md §3).

The CLIs print a UsageError's message and exit with ``EXIT_USAGE``; ``StorageError`` exits
with ``EXIT_FAILED`` (the input was fine, the disk was not).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
"""Anything else: a crash, a diverged run, a full disk."""
EXIT_USAGE = 2
"""A usage or input error; the message names the bad option, key, file or plugin."""
EXIT_INTERRUPTED = 130
"""Stopped by SIGINT or SIGTERM (128 + SIGINT, the shell's convention)."""


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
