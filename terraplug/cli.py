"""The ``terraplug`` command: ``python -m core.run`` under another name.

The console script enters through ``terraplug``, whose import names a folder that shadows
``core`` or ``plugins`` before anything is imported from it.
"""

from core.run import exit_process
from core.run import main as run_main


def main() -> None:
    """Run ``python -m core.run`` with the command line, and exit as it does."""
    exit_process(run_main())
