"""Datasets cut or generated once, on first use, into a cache folder with a manifest."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

Manifest = dict[str, Any]


def cache_root() -> Path:
    """``$TERRAPLUG_CACHE``, else ``~/.cache/terraplug``: where built datasets are kept."""
    root = os.environ.get("TERRAPLUG_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "terraplug"


def read_manifest(
    folder: Path, version: str, complete: Callable[[Manifest], bool]
) -> Manifest | None:
    """The manifest of a complete cache folder, else None (missing, stale or damaged)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("version") != version or not complete(manifest):
        return None
    return manifest


def build_once(
    folder: Path,
    build: Callable[[Path], Manifest],
    read: Callable[[Path], Manifest | None],
) -> Manifest:
    """``folder``'s manifest, building the folder first if ``read`` finds it incomplete.

    ``build`` fills a temporary sibling folder that is then renamed into place, so an
    interrupted or concurrent first run never leaves a partial dataset behind.
    """
    manifest = read(folder)
    if manifest is not None:
        return manifest
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        manifest = build(staging)
        finished = read(folder)
        if finished is not None:  # another process built it meanwhile: keep theirs
            return finished
        if folder.exists():  # a stale or partial cache: replace it
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except OSError:
        manifest = read(folder)  # another process finished first
        if manifest is None:
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
