"""Reading and writing files without trusting what is on disk, shared by the trainer and
the prediction commands.

- A file is written under a fresh temporary name in its own folder (created exclusively,
  so a symlink planted at a predictable name is never followed) and renamed over the
  target only when complete: a crash, a signal or a full disk leaves the previous version
  whole and no temporary file behind.
- A write the disk refuses (full, over quota, over a file-size limit) becomes a
  ``StorageError`` naming the device and the file, instead of the zip writer's
  "unexpected pos" or GDAL's message on stderr.
- A checkpoint is read with torch's weights-only unpickler: tensors and plain Python values
  only, so a crafted file cannot run code; a checkpoint whose weights are NaN or inf is
  refused.
- An output path is checked before any work: never the input, never an existing file
  unless the user says ``--overwrite`` (rio's convention).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import signal
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO

import psutil
import torch

from core.errors import CheckpointError, StorageError, UsageError

REFUSED_WRITES = {
    errno.ENOSPC: "no space left on",
    errno.EDQUOT: "disk quota exceeded on",
    errno.EFBIG: "file size limit (ulimit -f, or the file system's) exceeded on",
}


class SignalInterrupt(BaseException):
    """SIGINT or SIGTERM arrived; raised in the main thread so every ``finally`` runs.

    A ``BaseException``, like ``KeyboardInterrupt``, so ``except Exception`` on the way up
    cannot swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``SignalInterrupt`` inside the block; the previous
    handlers come back after it."""

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        raise SignalInterrupt(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --- writes ----------------------------------------------------------------------------------


def device_of(path: Path) -> str:
    """The device holding ``path``'s folder and its mount point, as ``df`` shows them."""
    folder = os.path.realpath(path.parent)
    point = folder
    while not os.path.ismount(point):
        point = os.path.dirname(point)
    devices = {part.mountpoint: part.device for part in psutil.disk_partitions(all=True)}
    return f"{devices.get(point, 'the device')} (mounted at {point})"


def storage_error(error: BaseException, path: Path) -> StorageError | None:
    """A ``StorageError`` for ``path`` if the disk refused a write inside ``error``, else None.

    torch's zip writer turns the ``OSError`` of a failed write into a ``RuntimeError``
    ("unexpected pos ..."); the ``OSError`` stays in the chain as its context.
    """
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno in REFUSED_WRITES:
            return StorageError(
                f"{REFUSED_WRITES[cause.errno]} {device_of(path)}, writing {path} (left as it was)"
            )
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


@contextlib.contextmanager
def _refused_writes_named(path: Path) -> Iterator[None]:
    try:
        yield
    except Exception as error:
        refused = storage_error(error, path)
        if refused is None:
            raise
        raise refused from error


def _temporary_beside(path: Path) -> tuple[int, Path]:
    """A new, empty file with a unique name in ``path``'s folder, opened exclusively, with
    the permissions a plain ``open`` would give it (``mkstemp`` makes it private)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, Path(name)


@contextlib.contextmanager
def replaced_when_done(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that opens files by name (GDAL);
    renamed over ``path`` when the block ends normally, removed on every other exit."""
    with _refused_writes_named(path):
        fd, tmp = _temporary_beside(path)
        os.close(fd)
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


ROOM_PROBE_BYTES = 16 * 2**20
"""What ``probe_refused_write`` appends: more than the largest block a GeoTIFF writer sends
at once (256 x 256 pixels x 12 bands x 8 bytes is 6 MiB)."""


def probe_refused_write(tmp: Path) -> None:
    """Append ``ROOM_PROBE_BYTES`` to ``tmp``, a temporary file about to be removed, and sync
    them: GDAL reports a refused write only to its error handler, without the errno, so the
    same write from Python raises the ``OSError`` that says why (ENOSPC, EDQUOT, EFBIG).
    Random bytes, since a file system that compresses would store zeros in no space."""
    with open(tmp, "ab") as handle:
        handle.write(os.urandom(ROOM_PROBE_BYTES))
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write`` with a binary file that becomes ``path`` once it has succeeded."""
    with _refused_writes_named(path):
        fd, tmp = _temporary_beside(path)
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def save_tensors(path: Path, state: Any) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda handle: torch.save(state, handle))


# --- checkpoints -----------------------------------------------------------------------------


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """A checkpoint's contents, read without running any code stored in it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = str(error).rsplit("WeightsUnpickler error:", 1)[-1].strip()
        reason = detail.splitlines()[0].split(". ")[0]  # e.g. "Unsupported global: ... os.system"
        raise CheckpointError(
            f"{path}: refused: it holds Python objects other than tensors and plain values "
            f"({reason}); loading it could run code. Use a checkpoint terraplug wrote."
        ) from None
    except Exception as error:  # torch raises several types for a damaged file
        raise CheckpointError(f"{path}: not a readable checkpoint ({error})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a terraplug checkpoint (a {type(state).__name__})")
    return state


def nonfinite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in ``state`` holding a NaN or an infinity."""
    return [
        name
        for name, tensor in state.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def require_finite(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse weights a diverged run left: they would predict nothing but NaN."""
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} of {len(state)} weight tensors hold NaN or inf "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): the run diverged"
        )


# --- outputs ---------------------------------------------------------------------------------


def check_output(output: Path, source: Path, overwrite: bool) -> None:
    """Refuse an output that cannot or should not be written, before any work is done.

    Never the input itself (by any name: ``os.path.samefile`` sees links), never a folder,
    never an existing file unless ``overwrite``; the folder must exist and accept a new
    file (tried for real: permissions, ACLs and read-only mounts all count). A symlink at
    ``output`` is replaced by the new file, never written through.
    """
    if output.is_dir():
        raise UsageError(f"{output}: is a folder; give the output file's name")
    folder = output.parent
    if not folder.is_dir():
        raise UsageError(f"{output}: folder {folder} does not exist")
    with _refused_writes_named(output):
        try:
            fd, probe = _temporary_beside(output)
        except OSError as error:
            raise UsageError(
                f"{output}: cannot create a file in {folder} ({error.strerror})"
            ) from error
        os.close(fd)
        probe.unlink()
    if output.exists() and source.exists() and os.path.samefile(output, source):
        raise UsageError(f"{output}: is the input {source}; choose another output")
    if os.path.lexists(output) and not overwrite:
        raise UsageError(f"{output}: exists; pass --overwrite to replace it")
