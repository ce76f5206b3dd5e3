"""Name -> implementation registries, for plugins and tasks alike.

Built-ins are listed as ``module:attribute`` strings; third parties add theirs through an
entry-point group. Nothing is imported until a run names it, so a broken or heavy
distribution costs nothing to runs that do not use it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

import attrs

from core.errors import UsageError

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
