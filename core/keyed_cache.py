"""Per-tile results computed once per run folder, keyed by everything that produced them.

A cache that is keyed too loosely is worse than none: a run re-started into the same folder
with another model size, pretrained weights instead of random ones, or other diffusion steps
would silently train on labels from the first attempt. So every cache here stores the full
key it was computed under (model name, a fingerprint of the weights, the settings that
change its content, a fingerprint of the input tiles) and is recomputed whenever any part
differs.

The values live on disk as ``.npy`` and are read back memory-mapped, so a large cache (the
refiner's generations: about 24 GB for 10,000 tiles at 224) costs page cache, not each
process's memory. The work is split across processes: each computes its share of the rows,
the main process joins the shares.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from core.safe_io import atomic_write, replaced_when_done

KEY_SUFFIX = ".key.json"


def fingerprint(*parts: Any) -> str:
    """SHA-256 over tensors, arrays, modules and state dicts (name, dtype, shape and bytes of
    every entry) and JSON-able values, in order."""
    digest = hashlib.sha256()
    for part in parts:
        _update(digest, part)
    return digest.hexdigest()


def _update(digest: Any, part: Any) -> None:
    if isinstance(part, nn.Module):
        part = part.state_dict()
    if isinstance(part, Mapping) and all(isinstance(v, torch.Tensor) for v in part.values()):
        for name, tensor in sorted(part.items()):  # a state dict, or part of one
            digest.update(name.encode())
            _update(digest, tensor)
    elif isinstance(part, torch.Tensor):
        tensor = part.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().data if tensor.numel() else b"")
    elif isinstance(part, np.ndarray):
        array = np.ascontiguousarray(part)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.view(np.uint8).data)
    else:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())


def _stored_key(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.with_name(path.name + KEY_SUFFIX).read_text())
    except (OSError, ValueError):
        return None


def cached_rows(
    path: Path,
    key: dict[str, Any],
    rows: int,
    compute: Callable[[np.ndarray], torch.Tensor],
    accelerator: Accelerator,
) -> np.ndarray:
    """``[rows, ...]`` values, memory-mapped from ``path`` (``.npy``) when stored under ``key``.

    Otherwise ``compute(indices)`` runs on every process for its share of the row indices
    and the result is written with ``key`` beside it (``<path>.key.json``, written last, so
    a half-written cache never matches). Every process must call this together.
    """
    key = json.loads(json.dumps(key, sort_keys=True, default=str))  # as it reads back
    accelerator.wait_for_everyone()  # nobody is writing while the key is compared
    if _stored_key(path) == key and path.exists():
        return np.load(path, mmap_mode="r", allow_pickle=False)
    rank, world = accelerator.process_index, accelerator.num_processes
    share = np.array_split(np.arange(rows), world)[rank]
    part_path = path.with_name(f"{path.name}.part{rank}.npy")
    path.parent.mkdir(parents=True, exist_ok=True)
    part_path.unlink(missing_ok=True)  # never join a share left by an interrupted run
    if len(share):  # fewer rows than processes leaves some without a share
        np.save(part_path, compute(share).cpu().numpy())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        parts = [path.with_name(f"{path.name}.part{r}.npy") for r in range(world)]
        _join_parts(path, key, [part for part in parts if part.exists()])
    accelerator.wait_for_everyone()
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _join_parts(path: Path, key: dict[str, Any], parts: list[Path]) -> None:
    """Concatenate the processes' shares into ``path`` one at a time, then write the key."""
    key_path = path.with_name(path.name + KEY_SUFFIX)
    key_path.unlink(missing_ok=True)
    shares = [np.load(part, mmap_mode="r", allow_pickle=False) for part in parts]
    first = shares[0]
    with replaced_when_done(path) as tmp:
        joined = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=first.dtype, shape=(sum(map(len, shares)), *first.shape[1:])
        )
        start = 0
        for share in shares:
            joined[start : start + len(share)] = share
            start += len(share)
        joined.flush()
        del joined, shares
    for part in parts:
        part.unlink()
    atomic_write(key_path, lambda stream: stream.write(json.dumps(key, sort_keys=True).encode()))
