"""terraplug's top-level packages, ``core`` and ``plugins``, and the folder that shadows one.

The distribution installs them next to ``terraplug``. A folder of either name that comes
first on ``sys.path`` (a project's own ``core/`` in the current folder under ``python -c``
or ``python -m``, or in a ``PYTHONPATH`` entry) is imported in their place, and the import
fails inside the user's package, far from the cause. This module imports neither package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGES = ("core", "plugins")


class ShadowedPackageError(ImportError):
    """A folder on ``sys.path`` hides one of terraplug's packages."""


def package_folder(name: str) -> Path | None:
    """The folder ``import name`` would load (a regular or a namespace package), found without
    importing it; None when there is none."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    if spec.has_location and spec.origin:
        return Path(spec.origin).parent
    return next((Path(folder) for folder in spec.submodule_search_locations or ()), None)


def shadowing() -> str | None:
    """One line naming the folder that shadows a package of terraplug's, that package's own
    folder, and what to do; None when both resolve to terraplug's own."""
    home = Path(__file__).resolve().parent.parent
    for name in PACKAGES:
        found = package_folder(name)
        if found is not None and found.resolve() != (home / name).resolve():
            return (
                f"{found} shadows terraplug's {name!r} package ({home / name}): it comes first "
                f"on sys.path; run from another folder or rename {found}"
            )
    return None


def check_packages() -> None:
    """Raise :class:`ShadowedPackageError` (an ImportError) when a folder shadows ``core`` or
    ``plugins``; run before either is imported."""
    problem = shadowing()
    if problem is not None:
        raise ShadowedPackageError(problem)
