"""``python -m core.experiment``: SIGINT and SIGTERM stop the runs as Ctrl-C does (they
checkpoint), also where the shell started it with SIGINT ignored, as it starts a script's
background job (``cmd &``), where Python would leave SIGINT ignored."""

import signal
import sys

from core.experiment.cli import main

for stop in (signal.SIGINT, signal.SIGTERM):
    signal.signal(stop, signal.default_int_handler)
sys.exit(main())
