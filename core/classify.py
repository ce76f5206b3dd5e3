"""``python -m core.classify PATH...``: the command name DESIGN.md §3 fixes for dem_sr's
terrain classifier, which lives with its task (``core.tasks.dem_sr.classify``)."""

import sys

from core.tasks.dem_sr.classify import main

if __name__ == "__main__":
    sys.exit(main())
