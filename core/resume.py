"""What ``--resume`` may change, and the record of what it changed.

A resumed run must stay the run it was: its task, plugins, seed, data, model, loss and
optimizer settings are fixed (changing them would train a different model under the same
name). It may run longer (``run.epochs`` may grow, never shrink) and change how it reports
and checkpoints (``MAY_CHANGE``). Anything else is refused with exit 2, naming each key with
both values. Each resume is recorded in ``config.toml`` as a ``[[resumed]]`` note.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from core.config import Config, ResumeNote, unstructure
from core.errors import ConfigError

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


def check_resume(run_dir: Path, saved: Config, resumed: Config) -> dict[str, list[Any]]:
    """The keys a resume changes; a ``ConfigError`` naming every key it may not change."""
    changes = changed_keys(saved, resumed)
    refused = [
        f"  {key}: the run has {before!r}, this command asks for {after!r}"
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
            f"{run_dir / 'config.toml'} --out NEW_DIR ..."
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
