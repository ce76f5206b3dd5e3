"""On a GPU: the 6 GB recipe of docs/terramind.md, measured. Prints the markdown table for
its "A pretrained model on a small GPU" section.

Four measurements, each with the peak memory the caching allocator saw
(``torch.cuda.max_memory_allocated``; the CUDA context, about 0.5 GB, comes on top):

1. an optimizer step of the recipe: ``teacher_forcing`` on TerraMind ``base``, bf16,
   gradient checkpointing, batch 1 with 8 accumulation steps, through the trainer's own
   ``optimizer_step``;
2. validation with the recipe's last-epoch 50 diffusion steps, per tile;
3. scene predict (``SarToOpticalPredictor``, 50 steps, ``--batch-size`` default), windows
   per second on a scene made of the training pairs;
4. the same step with ``train.mixed_precision = "fp16"`` (the GradScaler), for cards
   without bf16: its time, memory, and the steps the scaler skipped.

The weights are random (``model.pretrained=false``): a GPU machine here reaches no network,
and time and memory do not depend on the values. The pairs are the procedural ones at the
tile size, used as a ``--data`` folder (split spatially), so nothing is downloaded::

    python benchmarks/gpu_terramind.py [--size base] [--tile 224]   # on a machine with CUDA
    python benchmarks/gpu_terramind.py --quick --device cpu           # exercise it without one
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from benchlib import add_common_arguments, finish, peak_rss_mib, ratio_line, start, synchronize
from torch.utils.data import default_collate

from core.config import load_config
from core.data.geotiff import open_geotiff
from core.plugins import PluginManager
from core.tasks.sar2opt.data import SAR_BANDS, SAR_DIR, ensure_default_pairs, write_bands
from core.tasks.sar2opt.predict import DEFAULT_BATCH_SIZE, SarToOpticalPredictor
from core.train import Trainer
from terraplug.testing import reset_accelerate_state

CARD = 6 * 2**30
"""The recipe's card: 6 GiB, of which the CUDA context takes about 0.5 GB."""
FITS = 0.85
"""The share of the card a measurement may take and still leave room for the context."""


def recipe(args: argparse.Namespace, precision: str, out: Path, pairs: Path) -> list[str]:
    """The recipe's ``--set`` overrides (docs/terramind.md), at this benchmark's scale."""
    return [
        "run.task='sar2opt'",
        f"run.out='{out}'",
        f"data.dir='{pairs}'",
        f"data.tile_size={args.tile}",
        f"model.terramind='{args.size}'",
        "model.gradient_checkpointing=true",
        f"train.mixed_precision='{precision}'",
        "data.batch_size=1",
        f"optim.accumulation_steps={args.accumulation}",
        "model.diffusion_steps=4",
        f"model.final_diffusion_steps={args.final_steps}",
        "train.progress='never'",
        *(["train.cpu=true"] if args.device == "cpu" else []),
    ]


class Peak:
    """Peak memory of a block: the allocator's on CUDA, the process's resident peak on the
    CPU (which never falls, so a CPU figure is an upper bound)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.bytes = device, 0

    def __enter__(self) -> Peak:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *_: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated()
        else:
            self.bytes = int(peak_rss_mib() * 2**20)


def timed(run: Callable[[], object], device: torch.device) -> tuple[float, int]:
    """Seconds and peak bytes of ``run()``."""
    with Peak(device) as peak:
        started = time.perf_counter()
        run()
        synchronize(device)
        seconds = time.perf_counter() - started
    return seconds, peak.bytes


def training(args: argparse.Namespace, precision: str, scratch: Path, pairs: Path) -> dict:
    """One warm-up and ``args.steps`` timed optimizer steps of the recipe, then (bf16 only)
    validation at the last epoch's steps and scene predict; seconds and peak bytes."""
    config = load_config(None, recipe(args, precision, scratch / precision, pairs))
    trainer = Trainer(config, PluginManager.from_names(["teacher_forcing"]))
    trainer.setup()
    ctx, device = trainer.ctx, trainer.accelerator.device
    dataset = ctx.train_dataset
    micro = [default_collate([dataset[i]]) for i in range(args.accumulation)]
    micro = [{key: value.to(device) for key, value in batch.items()} for batch in micro]
    trainer.optimizer_step(micro, progress=0.0)  # first-call allocations, kernel choice
    seconds, peak = timed(
        lambda: [trainer.optimizer_step(micro, progress=0.5) for _ in range(args.steps)], device
    )
    found = {"step": (seconds / args.steps, peak), "skipped": trainer.nonfinite_total}
    if precision == "bf16":
        ctx.epoch = config.run.epochs  # the last epoch: model.final_diffusion_steps
        tiles = len(trainer.val_dataset)
        seconds, peak = timed(trainer.validate, device)
        found["validation"] = (seconds / tiles, peak)
        found["predict"] = scene_predict(args, trainer, scratch, pairs)
    trainer.release_run_dir()
    reset_accelerate_state()  # the next precision builds its own accelerator
    return found


def scene_predict(
    args: argparse.Namespace, trainer: Trainer, scratch: Path, pairs: Path
) -> tuple[float, int]:
    """Seconds per window and peak bytes of predicting a scene of the pairs' SAR side by
    side (``args.scene`` pairs a side) at the last epoch's diffusion steps."""
    files = sorted((pairs / SAR_DIR).glob("*.tif"))[: args.scene**2]
    tiles = []
    for file in files:
        with open_geotiff(file) as src:
            tiles.append(src.read())
            transform, crs = src.transform, src.crs
    side = args.scene
    rows = [np.concatenate(tiles[i : i + side], axis=2) for i in range(0, len(tiles), side)]
    scene = scratch / "scene.tif"
    write_bands(scene, np.concatenate(rows, axis=1), transform, SAR_BANDS, {}, crs=crs)
    terramind = trainer.accelerator.unwrap_model(trainer.model).eval()
    steps = trainer.config.model.final_diffusion_steps
    predictor = SarToOpticalPredictor(
        terramind, steps, 0, args.tile, args.tile // 4, DEFAULT_BATCH_SIZE
    )
    seconds, peak = timed(lambda: predictor.run(scene, scratch / "out.tif", progress=False),
                          trainer.accelerator.device)  # fmt: skip
    return seconds / (predictor.windows - predictor.skipped), peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if present")
    parser.add_argument("--size", default="base", help="model.terramind")
    parser.add_argument("--tile", type=int, default=224, help="data.tile_size and the window")
    parser.add_argument("--accumulation", type=int, default=8, help="optim.accumulation_steps")
    parser.add_argument("--final-steps", type=int, default=50, help="diffusion steps")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    parser.add_argument("--scene", type=int, default=4, help="pairs a side of the scene")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if args.device is None:
        print("no CUDA device here: nothing measured (--device cpu runs it on the CPU)")
        return
    if args.quick:
        args.size, args.tile, args.accumulation, args.final_steps = "tiny", 64, 2, 2
        args.steps, args.scene = 1, 2
    device = torch.device(args.device)
    started = start(f"TerraMind's 6 GB recipe on {device}", args.threads)
    pairs = ensure_default_pairs(args.tile, quiet=True)
    found = {}
    with tempfile.TemporaryDirectory(prefix="terraplug-bench-") as scratch:
        for precision in ("bf16", "fp16"):
            if precision == "fp16" and device.type != "cuda":
                print("# fp16: needs CUDA (accelerate refuses it on the CPU); not measured")
                continue
            found[precision] = training(args, precision, Path(scratch), pairs)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (resident peak)"
    shape = f"batch 1 x {args.accumulation} accumulation, {args.tile} px"
    rows = [
        ("training step, bf16, gradient checkpointing", shape, "s per optimizer step",
         found["bf16"]["step"]),
        (f"validation, {args.final_steps} diffusion steps", f"{args.tile} px tiles",
         "s per tile", found["bf16"]["validation"]),
        (f"scene predict, {args.final_steps} diffusion steps",
         f"windows of {args.tile} px, batch {DEFAULT_BATCH_SIZE}", "s per window",
         found["bf16"]["predict"]),
    ]  # fmt: skip
    if "fp16" in found:
        skipped = found["fp16"]["skipped"]
        rows.append(("training step, fp16 (GradScaler)", f"{shape}, {skipped} skipped",
                     "s per optimizer step", found["fp16"]["step"]))  # fmt: skip
    print(f"\n{name}, TerraMind {args.size}, random weights:\n")
    print("| measurement | setting | time | peak memory |")
    print("| --- | --- | --- | --- |")
    for what, setting, unit, (seconds, peak) in rows:
        print(f"| {what} | {setting} | {seconds:.3f} {unit} | {peak / 2**30:.2f} GiB |")
    print()
    for key, (_, _, _, (_, peak)) in zip(("step", "validation", "predict"), rows, strict=False):
        fits = peak / CARD
        met = fits <= FITS if device.type == "cuda" else None
        target = f"<= {FITS} (fits a 6 GB card beside the CUDA context)"
        ratio_line(f"{key}_peak_vs_6gb", [fits], target if met is not None else "none (CPU)", met)
    finish(started)


if __name__ == "__main__":
    main()
