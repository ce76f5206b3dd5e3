"""Errors a user can fix, and the exit statuses of every command (DESIGN.md §3).

Every CLI reports an error through :func:`report_error`: a UsageError exits with
``EXIT_USAGE``, ``StorageError`` with ``EXIT_FAILED`` (the input was fine, the disk was not).
"""

from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_FAILED = 1
"""Anything else: a crash, a diverged run, a full disk."""
EXIT_USAGE = 2
"""A usage or input error; the message names the bad option, key, file or plugin."""
EXIT_INTERRUPTED = 130
"""Stopped by SIGINT or SIGTERM (128 + SIGINT, the shell's convention)."""


RAY_INSTALL = 'pip install "terraplug[ray]"'
"""The command that installs the optional Ray backend and Optuna, for the message that
names it where either is missing; it works inside a checkout and outside one."""


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


def report_error(error: Exception) -> int:
    """Print ``error`` as every command does and return the exit status it gets.

    ``error: MESSAGE`` on stderr, then each of its notes on a line of its own (``core.plugins``
    adds one naming the plugin and hook that raised it). A UsageError is ``EXIT_USAGE``;
    anything else a command reports without a traceback (a full disk, a diverged run) is
    ``EXIT_FAILED``.
    """
    print(f"error: {error}", *getattr(error, "__notes__", ()), sep="\n", file=sys.stderr)
    return EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILED
