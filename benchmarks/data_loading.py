"""Data loading: tiles per second from GeoTIFF and from the loader, against what the model
consumes in training at the ``small`` and ``default`` presets.

Three rates, measured interleaved in one process on the same tiles:

* GeoTIFF: ``TileDataset.from_folder`` (read, check, label, block-mean to LR). The dataset
  does this once, when it is built, and keeps every tile in memory;
* loader: one epoch of the trainer's ``DataLoader`` (``num_workers=0``: per-tile
  normalisation and collation), the part repeated every epoch;
* model: training steps (forward, the five losses, backward, AdamW) on batches already
  collated, at each preset.

With ``num_workers=0`` loading and compute run one after the other, so loading's share of
an epoch is ``1 / (1 + loader rate / model rate)``::

    python benchmarks/data_loading.py [--per-terrain 120] [--batch-size 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from benchlib import (
    add_common_arguments,
    finish,
    interleave,
    paired,
    ratio_line,
    spread,
    start,
    synchronize,
    tiles_folder,
)
from torch.utils.data import DataLoader

from core.config import Config
from core.tasks.dem_sr.data.dataset import TileDataset
from core.tasks.dem_sr.losses import dem_loss_components
from core.tasks.dem_sr.rcan import build_rcan
from core.tasks.dem_sr.task import base_loss_weights
from core.train import to_device

SCALE = 3


def read_rate(folder: Path) -> Callable[[], float]:
    """Seconds per tile to build the dataset from its GeoTIFFs."""

    def run() -> float:
        started = time.perf_counter()
        dataset = TileDataset.from_folder(folder, SCALE)
        return (time.perf_counter() - started) / len(dataset)

    return run


def loader_rate(dataset: TileDataset, batch_size: int) -> Callable[[], float]:
    """Seconds per tile for one shuffled epoch through the trainer's kind of DataLoader."""
    epoch = iter(range(1, 1_000_000))

    def run() -> float:
        order = np.random.default_rng([0, next(epoch)]).permutation(len(dataset))
        batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
        started = time.perf_counter()
        for _ in DataLoader(dataset, batch_sampler=batches, num_workers=0):
            pass
        return (time.perf_counter() - started) / len(dataset)

    return run


def model_rate(preset: str, batches: list[dict], device: torch.device) -> Callable[[], float]:
    """Seconds per tile of training steps on ``batches`` (collated; copied to ``device`` in
    the step, as the trainer does)."""
    model = build_rcan(preset, SCALE).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    weights = base_loss_weights(Config()).to(device)

    def run() -> float:
        synchronize(device)
        started = time.perf_counter()
        for batch in batches:
            moved = to_device(batch, device)
            losses = dem_loss_components(model(moved["lr"]), moved["hr"], moved["mask"])
            (losses @ weights).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return (time.perf_counter() - started) / sum(len(b["terrain"]) for b in batches)

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--data", type=Path, help="GeoTIFF folder (default: procedural tiles)")
    parser.add_argument("--per-terrain", type=int, default=120, help="procedural tiles each")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2, help="training steps per model timing")
    parser.add_argument("--presets", default="small,default", help="comma-separated presets")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    if args.quick:
        args.per_terrain, args.steps, args.presets = 4, 1, "small"
        args.repeats = args.repeats or 1
    repeats = args.repeats or 3
    presets = args.presets.split(",")
    started = start("data loading vs model consumption, tiles per second", args.threads)
    with tempfile.TemporaryDirectory(prefix="terraplug-bench-") as scratch:
        folder = tiles_folder(args.data, args.per_terrain, Path(scratch))
        dataset = TileDataset.from_folder(folder, SCALE)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
        batches = [batch for _, batch in zip(range(args.steps), loader, strict=False)]
        variants = {"geotiff": read_rate(folder), "loader": loader_rate(dataset, args.batch_size)}
        variants.update(
            {preset: model_rate(preset, batches, torch.device(args.device)) for preset in presets}
        )
        times = interleave(variants, repeats)
    hr = dataset[0]["hr"].shape[-1]
    print(
        f"# {len(dataset)} tiles of {hr} x {hr} HR (scale {SCALE}), batch {args.batch_size}, "
        f"{args.steps} training steps per model timing, {repeats} interleaved repeats"
    )
    for name, seconds in times.items():
        rates = [1 / s for s in seconds]
        print(f"#   {name:<8} {spread(rates, ' tiles/s', digits=1)}")
    for preset in presets:
        loader_vs_model = paired(times[preset], times["loader"])
        share = 1 / (1 + statistics.median(loader_vs_model))
        print(f"# {preset}: loading is {100 * share:.2f} % of an epoch (loader then model)")
        ratio_line(f"loader_vs_{preset}_model", loader_vs_model, "> 1", min(loader_vs_model) > 1)
        ratio_line(
            f"geotiff_vs_{preset}_model", paired(times[preset], times["geotiff"]), "none", None
        )
    finish(started)


if __name__ == "__main__":
    main()
