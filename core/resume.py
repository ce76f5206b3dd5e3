"""What ``--resume`` may change, and the record of what it changed.

A resumed run must stay the run it was: its task, plugins, seed, data, model, loss and
optimizer settings are fixed (changing them would train a different model under the same
name). It may run longer (``run.epochs`` may grow, never shrink) and change how it reports
and checkpoints (``MAY_CHANGE``). Anything else is refused with exit 2, naming each key with
both values. Each resume is recorded in ``config.toml`` as a ``[[resumed]]`` note.

The checkpoint carries the config it was trained with and the identity of its data
(``data_identity``): ``config.toml`` edited since is held to the same rules as the command,
and a data folder that changed is refused.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from core.config import (
    Config,
    ResumeNote,
    config_from_plain,
    parse_override,
    read_toml,
    unstructure,
)
from core.errors import CheckpointError, ConfigError, DataError
from core.run_folder import CHECKPOINT, CHECKPOINT_FORMAT, CONFIG
from core.safe_io import load_checkpoint

MAY_GROW = frozenset({"run.epochs"})
MAY_CHANGE = frozenset(
    {
        "run.out",  # the folder may have been moved
        "data.num_workers",
        "data.strict",
        "train.cpu",
        "train.progress",
        "train.plot_every",
        "train.tensorboard",
        "train.checkpoint_every",
        "train.max_nonfinite_steps",
    }
)
GEOTIFF = frozenset({".tif", ".tiff"})
"""The suffixes of the files ``data_identity`` counts (any case), as the tasks read them."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"run": {"epochs": 2}}`` -> ``{"run.epochs": 2}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_keys(saved: Config, resumed: Config) -> dict[str, list[Any]]:
    """Each key whose value differs, as ``[saved, resumed]`` (the history excluded)."""
    before, after = (flatten(unstructure(c) | {"resumed": {}}) for c in (saved, resumed))
    missing = object()
    return {
        key: [before.get(key), after.get(key)]
        for key in sorted(before.keys() | after.keys())
        if before.get(key, missing) != after.get(key, missing)
    }


def trained_run(run_dir: Path) -> tuple[Config, dict[str, Any]]:
    """The config ``run_dir``'s checkpoint was trained with, and the checkpoint."""
    path = run_dir / CHECKPOINT
    state = load_checkpoint(path)
    if not {"config", "data"} <= state.keys():
        raise CheckpointError(
            f"{path}: it does not record the config and data it was trained with (an earlier "
            "terraplug wrote it), so a resume cannot check them; start the run again"
        )
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {state.get('format', 1)}, this terraplug resumes format "
            f"{CHECKPOINT_FORMAT} only (another version of terraplug wrote it); start the run "
            f"again in a new folder, or delete {run_dir} to start it there"
        )
    return config_from_plain(state["config"], path), state


def check_task(run_dir: Path, saved: Config, overrides: list[str]) -> None:
    """Refuse another task, asked for by the command or by an edited ``config.toml``, before
    the run's sections are read as that task's (they would be reported as unknown keys)."""
    asked = [value for path, value in map(parse_override, overrides) if path == ["run", "task"]]
    in_file = read_toml(run_dir / CONFIG).get("run", {}).get("task", saved.run.task)
    for who, task in (("this command asks for", asked[-1] if asked else None),
                      (f"{run_dir / CONFIG} has", in_file)):  # fmt: skip
        if task is not None and task != saved.run.task:
            raise ConfigError(
                f"--resume {run_dir}: a resume keeps its task: the run has "
                f"{saved.run.task!r}, {who} {task!r}"
            )


def check_resume(
    run_dir: Path, saved: Config, resumed: Config, edited: Config | None = None
) -> dict[str, list[Any]]:
    """The keys a resume changes; a ``ConfigError`` naming every key it may not change, and
    whether the command asks for it or ``config.toml`` (``edited``, as it is now) does."""
    changes = changed_keys(saved, resumed)
    in_file = changed_keys(saved, edited) if edited is not None else {}

    def asker(key: str, after: Any) -> str:
        edit = in_file.get(key)
        return f"{run_dir / CONFIG} has" if edit and edit[1] == after else "this command asks for"

    refused = [
        f"  {key}: the run has {before!r}, {asker(key, after)} {after!r}"
        for key, (before, after) in changes.items()
        if key not in MAY_CHANGE
        and not (key in MAY_GROW and before is not None and after is not None and after >= before)
    ]
    if refused:
        raise ConfigError(
            f"--resume {run_dir}: a resumed run keeps its settings; only run.epochs may grow "
            f"and {', '.join(sorted(MAY_CHANGE))} may change. Refused:\n"
            + "\n".join(refused)
            + f"\nTo train with other settings, start a new run: python -m core.run --config "
            f"{run_dir / CONFIG} --out NEW_DIR ..."
        )
    return changes


def record_resume(saved: Config, resumed: Config, after_epoch: int) -> None:
    """Append this resume to ``resumed``'s history (kept from ``saved``)."""
    note = ResumeNote(
        at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        after_epoch=after_epoch,
        changed=changed_keys(saved, resumed),
    )
    resumed.resumed = [*saved.resumed, note]


def data_identity(folder: str) -> dict[str, Any] | None:
    """What a resume checks ``data.dir`` against: the raster it names, or its GeoTIFFs
    (recursively, the files the tasks read), counted, and their names, sizes and modification
    times hashed; None for the built-in data (no folder)."""
    if not folder:
        return None
    root = Path(folder)
    if root.is_file():  # one raster
        files, root = [root], root.parent
    else:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in GEOTIFF and not p.is_dir())
    stats = [p.stat() if p.exists() else p.lstat() for p in files]  # lstat: a broken link
    return {
        "files": len(files),
        "names": _digest(str(p.relative_to(root)) for p in files),
        "sizes": _digest(s.st_size for s in stats),
        "mtimes": _digest(s.st_mtime_ns for s in stats),
    }


def _digest(values: Iterable[Any]) -> str:
    text = "\0".join(map(str, values))
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def check_data(run_dir: Path, saved: dict[str, Any] | None, folder: str) -> None:
    """A ``DataError`` saying what changed when ``folder`` no longer holds the data the run
    trained on (``saved``, its ``data_identity`` then)."""
    now = data_identity(folder)
    if now == saved:
        return
    if not (Path(folder).is_dir() or Path(folder).is_file()):
        what = f"is not there any more; the run trained on {saved['files']} GeoTIFFs there"
    elif now["files"] != saved["files"]:
        what = f"holds {now['files']} GeoTIFFs, the run trained on {saved['files']}"
    elif now["names"] != saved["names"]:
        what = f"holds {now['files']} GeoTIFFs, as many as the run trained on, by other names"
    elif now["sizes"] != saved["sizes"]:
        what = "holds the GeoTIFFs the run trained on by name, but some have another size"
    else:
        what = "holds the GeoTIFFs the run trained on by name and size, but some were modified "
        what += "since the run started"
    raise DataError(
        f"--resume {run_dir}: data.dir {folder} {what}. A resume trains on the data its run "
        f"started with: restore it, or start a new run: python -m core.run --config "
        f"{run_dir / CONFIG} --out NEW_DIR"
    )
