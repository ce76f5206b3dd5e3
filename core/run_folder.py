"""The names of the files in a run folder (DESIGN.md §3), spelled once.

::

    RUN_DIR/config.toml      the resolved config; --config it to repeat the run
    RUN_DIR/metrics.jsonl    one JSON object per epoch
    RUN_DIR/checkpoint.pt    the last checkpoint (weights-only, see docs/safety.md)
    RUN_DIR/summary.json     written when the run finishes
    RUN_DIR/val_tiles.csv.gz the last validation's errors per tile (tasks that give them)
    RUN_DIR/interrupted.json written when a signal stopped it: how to resume
    RUN_DIR/run.lock         held by the live run (core.runlock)
    RUN_DIR/cache/           per-tile caches a task or plugin keeps for the run
    RUN_DIR/*.png            plots: loss_curves.png and the task's own
"""

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
VAL_TILES_CSV = "val_tiles.csv.gz"
INTERRUPTED = "interrupted.json"
LOCK_FILE = "run.lock"
CACHE = "cache"
LOSS_CURVES = "loss_curves.png"

CHECKPOINT_FORMAT = 2
"""The layout of ``checkpoint.pt``'s state; a resume refuses any other. Format 2 added the
probe loss and the within-epoch validation curve to each process's state."""
