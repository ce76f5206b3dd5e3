"""``python -m core.experiment``: SIGTERM stops the runs as Ctrl-C does (they checkpoint)."""

import signal
import sys

from core.experiment.cli import main

signal.signal(signal.SIGTERM, signal.default_int_handler)
sys.exit(main())
