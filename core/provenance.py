"""Where terraplug's top-level packages were imported from.

The distribution installs two generically named packages, ``core`` and ``plugins``. Another
distribution (or a folder on ``sys.path``) with either name shadows them; the version line
names the files actually imported so that such a clash can be diagnosed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import core


def package_location(name: str) -> str:
    """The folder a top-level package resolves to, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return "not found"
    return str(Path(spec.origin).parent)


def version_line() -> str:
    """``terraplug <version> (core: <folder>, plugins: <folder>)``."""
    return (
        f"terraplug {core.__version__} (core: {package_location('core')}, "
        f"plugins: {package_location('plugins')})"
    )
