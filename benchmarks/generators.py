"""The five TerraMind generator plugins: step time against ``teacher_forcing``, and memory.

Each plugin trains its own TerraMind tiny (random weights, LoRA r=8) through the trainer's
optimizer step on the same two 64 x 64 tiles of the embedded default. Steps of all five are
interleaved and repeated, and each step time is reported as a ratio to ``teacher_forcing``
measured in the same repeat (the cheapest differentiable path: one forward, one backward).
Memory is the peak of tensors allocated during one step above what was live before it
(the PyTorch profiler's allocation log, see ``benchlib.peak_tensor_bytes``)::

    python benchmarks/generators.py [--repeats 5] [--batch-size 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from benchlib import (
    add_common_arguments,
    finish,
    interleave,
    paired,
    peak_tensor_bytes,
    ratio_line,
    spread,
    start,
)
from torch.utils.data import default_collate

from core.config import load_config
from core.plugins import PluginManager
from core.train import Trainer

PLUGINS = ("teacher_forcing", "straight_through", "reinforce", "refiner", "encoder_only")


def trainer_for(plugin: str, run_dir: Path, batch_size: int, quick: bool) -> tuple[Trainer, dict]:
    overrides = [
        "run.task='sar2opt'",
        *(["data.val_fraction=0.9"] if quick else []),  # fewer tiles to generate at set-up
        f"run.out='{run_dir / plugin}'",
        "train.progress='never'",
        "model.diffusion_steps=1",
        *(["model.lora_rank=0"] if plugin == "refiner" else []),
    ]
    config = load_config(None, overrides)
    trainer = Trainer(config, PluginManager.from_names([plugin]))
    trainer.setup()
    dataset = trainer.ctx.train_dataset
    return trainer, default_collate([dataset[i] for i in range(batch_size)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    started = start("TerraMind generator plugins: step time and memory", args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="bench-generators-"))
    trainers = {name: trainer_for(name, scratch, args.batch_size, args.quick) for name in PLUGINS}

    def step(name: str) -> float:
        trainer, batch = trainers[name]
        begin = time.perf_counter()
        trainer.optimizer_step([batch], progress=0.5)
        return time.perf_counter() - begin

    times = interleave({name: (lambda n=name: step(n)) for name in PLUGINS}, repeats)
    print(f"batch {args.batch_size} x 64 x 64, TerraMind tiny, {repeats} repeats")
    for name in PLUGINS:
        trainer, batch = trainers[name]
        memory = peak_tensor_bytes(
            lambda t=trainer, b=batch: t.optimizer_step([b], progress=0.5), torch.device("cpu")
        )
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        print(
            f"{name}: step {spread(times[name], ' s')}, peak step tensors "
            f"{memory / 2**20:.0f} MiB, {trainable / 1e6:.3f} M trainable parameters"
        )
    for name in PLUGINS[1:]:
        ratio_line(
            f"{name}_step_vs_teacher_forcing",
            paired(times[name], times["teacher_forcing"]),
            "none (a comparison)",
            None,
        )
    print(f"median teacher_forcing step: {statistics.median(times['teacher_forcing']):.3f} s")
    finish(started)


if __name__ == "__main__":
    main()
