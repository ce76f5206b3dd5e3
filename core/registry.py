"""Name -> implementation registries, for plugins and tasks alike.

Built-ins are listed as ``module:attribute`` strings; third parties add theirs through an
entry-point group. Nothing is imported until a run names it, so a broken or heavy
distribution costs nothing to runs that do not use it.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
from collections.abc import Collection, Iterable, Mapping
from importlib.metadata import entry_points
from typing import Any

import attrs

from core.errors import EXIT_USAGE, UsageError

BUILTIN = "built-in"


@attrs.frozen
class Registration:
    """Where a plugin or task comes from, before it is imported."""

    kind: str
    """``plugin`` or ``task``: how messages name it."""
    name: str
    """The name users type."""
    origin: str
    """``built-in``, or the distribution that registered the entry point, with its version."""
    target: str
    """``module:attribute`` or ``module``."""
    error: type[UsageError] = UsageError
    """What a failure to load raises (exit 2, naming the name and its origin)."""

    def load(self) -> Any:
        """Import the target; any failure becomes ``error`` naming the origin.

        ``sys.exit()`` in the imported code is such a failure too; Ctrl-C and the signals
        terraplug turns into exceptions still stop the command.
        """
        module_name, _, attribute = self.target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in filter(None, attribute.split(".")):
                obj = getattr(obj, part)
        except (Exception, SystemExit) as error:
            raise self.error(
                f"{self.kind} {self.name!r} from {self.origin} ({self.target}) failed to load: "
                f"{failure(error)}"
            ) from error
        return obj

    def problem(self) -> str | None:
        """Why the target fails to load (``Type: message``); None when it loads."""
        try:
            self.load()
        except self.error as error:
            return failure(error.__cause__ or error)
        return None


def summary(obj: Any) -> str:
    """The first line of ``obj``'s docstring: a plugin's or task's line in the listings."""
    doc = inspect.getdoc(obj) or ""
    return doc.splitlines()[0] if doc else ""


def failure(error: BaseException) -> str:
    """``Type: message`` of an import's failure; a ``SystemExit``'s message is only its code."""
    if isinstance(error, SystemExit):
        return f"SystemExit: sys.exit({error.code!r}) called on import"
    return f"{type(error).__name__}: {error}"


def registrations(
    kind: str, builtins: Mapping[str, str], group: str | None, error: type[UsageError]
) -> dict[str, Registration]:
    """Built-ins, then the entry points of ``group`` (None: built-ins only); a name may
    appear once."""
    found = {
        name: Registration(kind, name, BUILTIN, target, error) for name, target in builtins.items()
    }
    for entry_point in entry_points(group=group) if group else ():
        dist = entry_point.dist
        origin = f"{dist.name} {dist.version}" if dist else "an unknown distribution"
        if entry_point.name in found:
            raise error(
                f"{kind} name {entry_point.name!r} from {origin} is already taken by "
                f"{found[entry_point.name].origin}; rename the entry point"
            )
        found[entry_point.name] = Registration(
            kind, entry_point.name, origin, entry_point.value, error
        )
    return found


def broken_names(known: Mapping[str, Registration]) -> set[str]:
    """The names whose target fails to load. Imports every one of them, as the listings do,
    so it serves error messages only: a run imports nothing it does not name."""
    return {name for name, registration in known.items() if registration.problem() is not None}


def unknown_message(
    kind: str, name: str, available: Iterable[str], broken: Collection[str] = ()
) -> str:
    """``unknown <kind> 'name'.``, the closest known name, and every known one, those in
    ``broken`` marked: a name that exists but does not load is not the fix."""
    names = sorted(available)
    message = f"unknown {kind} {name!r}."
    close = difflib.get_close_matches(name, names, n=1)
    if close:
        message += f" Did you mean {close[0]!r}?"
    listed = [f"{known} (broken)" if known in broken else known for known in names]
    return message + f" Available: {', '.join(listed) or 'none'}"


BROKEN = "BROKEN: "
"""How a listing's summary column starts for an entry point that fails to load."""


def print_listing(kind: str, rows: list[dict[str, str]], strict: bool) -> int:
    """``--list-plugins`` and ``--list-tasks``: a table of ``rows`` (their keys are the
    columns; ``summary`` among them). With ``strict`` a broken row is an error naming it
    and its distribution: the exit status is then ``EXIT_USAGE``."""
    headers = {key: key for key in rows[0]}
    widths = {key: max(len(row[key]) for row in [headers, *rows]) for key in headers}
    for row in [headers, *rows]:
        print("  ".join(row[key].ljust(widths[key]) for key in headers).rstrip())
    broken = [row for row in rows if row["summary"].startswith(BROKEN)]
    if not (strict and broken):
        return 0
    for row in broken:
        print(
            f"error: {kind} {row['name']!r} from {row['origin']} failed to load: "
            f"{row['summary'].removeprefix(BROKEN)}",
            file=sys.stderr,
        )
    return EXIT_USAGE
