"""One run per run folder: an OS lock on ``run.lock``, held for the run's life.

``fcntl.flock`` belongs to the open file, so the kernel drops it when the process ends in
any way (SIGKILL and crashes included): a dead run never leaves a stale lock behind. The
holder writes its pid, host and start time into the file, so a refused run can say who holds
the folder. Only the main process of a multi-process run locks; the others learn the outcome
from it (see ``Trainer.resolve_run_dir``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import IO

from core.errors import UsageError
from core.run_folder import LOCK_FILE, METRICS


class RunFolderBusy(UsageError):
    """Another live process holds the run folder."""


class RunLock:
    """An exclusive, non-blocking lock on ``run_dir``; ``release`` (or the process's end)
    frees it."""

    def __init__(self, handle: IO[str]) -> None:
        self._handle: IO[str] | None = handle

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Lock ``run_dir`` (which must exist) or raise ``RunFolderBusy`` naming the holder."""
        handle = open_lock_file(run_dir / LOCK_FILE)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = describe_holder(handle.read())
            handle.close()
            raise RunFolderBusy(
                f"run folder {run_dir} is in use by another run ({holder}); wait for it to "
                "finish or choose another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
        handle.write(json.dumps(holder))
        handle.flush()
        return cls(handle)

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file drops the lock
            self._handle = None


def open_lock_file(path: Path) -> IO[str]:
    """``path`` opened for reading and writing, created if missing, refused (UsageError naming
    it) unless it is a plain file of its own.

    The lock must stay on one file for the run's life, so it cannot be written beside and
    renamed into place as a checkpoint is: instead a symlink planted at ``path`` is never
    followed (``O_NOFOLLOW``), and a hard link to another file, a folder or a FIFO is never
    written to.
    """
    # O_NONBLOCK: opening a FIFO returns at once, to be refused below
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as error:
        problem = {
            errno.ELOOP: "is a symbolic link, never followed to lock a run; remove it",
            errno.EISDIR: "is a folder, not a lock file; remove it",
        }.get(error.errno, f"cannot be opened as the run's lock file ({error.strerror})")
        raise UsageError(f"{path}: {problem}") from None
    status = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(status.st_mode):
        problem = "is not a regular file, so not a lock file"
    elif status.st_nlink != 1:
        problem = "has other names (hard links): locking the run would write into them"
    if problem is not None:
        os.close(fd)
        raise UsageError(f"{path}: {problem}; remove it")
    return os.fdopen(fd, "r+")


def describe_holder(text: str) -> str:
    """``pid 123 on host, started 2026-...`` from the lock file, or what is known of it."""
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "its pid is not written yet"


def claim_run_dir(run_dir: Path, *, resume: bool) -> RunLock:
    """Create and lock ``run_dir``; a folder holding a finished or interrupted run is
    refused unless resuming (checked under the lock, so two new runs cannot both pass)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"run folder {run_dir} is a file, not a folder; choose another --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"run folder {run_dir} cannot be created: {error.strerror}") from None
    lock = RunLock.acquire(run_dir)
    if not resume and (run_dir / METRICS).exists():
        lock.release()
        raise UsageError(
            f"run folder {run_dir} already holds a run; continue it with --resume "
            f"{run_dir} or choose another --out"
        )
    return lock
