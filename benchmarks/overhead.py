"""Framework overhead: ``core.run`` with no plugins against a hand-written Accelerate loop.

Both sides train the same RCAN from the same initial weights on the same tiles, in the same
batches (the trainer's default plan is a permutation seeded by (seed, epoch) and the hand
loop draws the same one), with the same loss, AdamW and cosine schedule, so after every
epoch their training losses must agree; the script stops if they do not. The trainer is
built as ``python -m core.run`` builds it (its argument parser and config resolution, no
plugins) and runs each epoch as its ``fit`` does, through a subclass that only times phases.

Both sides are set up once in one process, then run epochs in turns (the order flips every
pair), so the two epochs of a pair run seconds apart on the same model state and a slow
spell of a shared machine hits both. An epoch is everything a side does every epoch: the
hand loop trains and computes a validation loss; the trainer also computes richer
validation metrics (RMSE in metres per terrain, slope) and writes the metrics line and a
checkpoint. What happens once per run (set-up, the bicubic baseline, plots after the last
epoch) is reported apart, and each suspect of the difference is then timed on its own.

Each phase is timed in wall-clock seconds and in CPU seconds of this process. With one
torch thread and ``num_workers=0`` the work is single-threaded, so CPU time is the wall
time the run would take on an idle machine, without the waits for other users' processes::

    python benchmarks/overhead.py [--repeats 20] [--per-terrain 120] [--preset small]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from benchlib import (
    add_common_arguments,
    bootstrap_medians,
    finish,
    interleave,
    interval,
    paired,
    ratio_line,
    spread,
    start,
    synchronize,
    tiles_folder,
)
from torch.utils.data import DataLoader

from core.config import Config
from core.data.datasets import train_val_split
from core.plugins import PluginManager
from core.run import build_parser, resolve_config
from core.tasks.dem_sr.data.dataset import TileDataset
from core.tasks.dem_sr.losses import dem_loss_components
from core.tasks.dem_sr.rcan import build_rcan
from core.tasks.dem_sr.task import base_loss_weights
from core.train import Trainer, to_device
from terraplug.testing import reset_accelerate_state

TARGET = 1.03
"""The trainer may be at most 3 % slower per epoch than the hand loop."""
PHASES = ("steps", "loop", "validate", "checkpoint", "bookkeeping")
"""An epoch's phases; ``loop`` is training less its optimizer steps (plan, loader, logging)."""
CLOCKS = ("cpu", "wall")


class Phases:
    """Wall and CPU seconds of named phases, per epoch, and of one-off work."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, np.ndarray]] = []
        self.once: dict[str, np.ndarray] = {}
        self.train_losses: list[float] = []

    @staticmethod
    def now() -> np.ndarray:
        return np.array([time.process_time(), time.perf_counter()])

    @contextlib.contextmanager
    def timing(self, name: str, once: bool = False) -> Iterator[None]:
        """Add the time spent in the block to ``name`` of this epoch (or of the run)."""
        started = self.now()
        yield
        record = self.once if once else self.epochs[-1]
        record[name] = record.get(name, 0.0) + self.now() - started

    def epoch_totals(self, clock: str, epochs: slice) -> list[float]:
        index = CLOCKS.index(clock)
        return [float(sum(e.values())[index]) for e in self.epochs[epochs]]

    def phase(self, name: str, clock: str, epochs: slice) -> list[float]:
        index = CLOCKS.index(clock)
        return [float(e.get(name, np.zeros(2))[index]) for e in self.epochs[epochs]]


class TimedTrainer(Trainer):
    """The trainer unchanged, with the time of each phase recorded per epoch."""

    def __init__(self, config: Config, plugins: PluginManager) -> None:
        super().__init__(config, plugins)
        self.phases = Phases()

    def setup(self) -> int:
        with self.phases.timing("setup", once=True), contextlib.redirect_stdout(io.StringIO()):
            return super().setup()

    def epoch(self) -> float:
        """The next epoch, as ``fit`` runs it; returns its training loss."""
        epoch = self.ctx.epoch = len(self.phases.epochs) + 1
        self.phases.epochs.append({})
        started = Phases.now()
        row = self.run_epoch(epoch)
        record = self.phases.epochs[-1]
        record["loop"] = Phases.now() - started - record["validate"] - record["steps"]
        with contextlib.redirect_stdout(io.StringIO()):
            self.end_epoch(epoch, row)
        self.phases.train_losses.append(row["train_loss"])
        return row["train_loss"]

    def optimizer_step(self, micro: list[dict[str, Any]], progress: float) -> torch.Tensor:
        with self.phases.timing("steps"):
            return super().optimizer_step(micro, progress)

    def validate(self) -> dict[str, Any]:
        with self.phases.timing("validate"):
            return super().validate()

    def save_checkpoint(self, completed_epoch: int) -> None:
        with self.phases.timing("checkpoint"):
            super().save_checkpoint(completed_epoch)

    def end_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        """Metrics line, tensorboard, hooks: everything but the checkpoint."""
        started = Phases.now()
        before = self.phases.epochs[-1].get("checkpoint", np.zeros(2))
        super().end_epoch(epoch, row)
        checkpoint = self.phases.epochs[-1].get("checkpoint", np.zeros(2)) - before
        self.phases.epochs[-1]["bookkeeping"] = Phases.now() - started - checkpoint

    def plot(self) -> None:
        """The plots ``end_epoch`` draws after the last epoch."""
        self.write_plots()


class HandLoop:
    """The plain Accelerate loop a user would write for the same run."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.phases = Phases()
        with self.phases.timing("setup", once=True):
            self.accelerator = Accelerator(cpu=config.train.cpu)
            set_seed(config.run.seed)
            dataset = TileDataset.from_folder(Path(config.data.dir), config.data.scale)
            self.train, self.val = train_val_split(
                dataset, config.data.val_fraction, config.run.seed
            )
            sizes = ("n_resgroups", "n_resblocks", "n_feats")
            overrides = {key: value for key in sizes if (value := getattr(config.model, key))}
            model = build_rcan(config.model.preset, config.data.scale, **overrides)
            optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=0)
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
            self.weights = base_loss_weights(config).to(self.accelerator.device)

    def epoch(self) -> float:
        """Train one epoch in the seeded order, then the validation loss; returns the
        training loss."""
        config, phases = self.config, self.phases
        epoch, epochs = len(phases.epochs) + 1, config.run.epochs
        seed, batch_size = config.run.seed, config.data.batch_size
        base_lr, floor = config.optim.lr, 0.01 * config.optim.lr
        phases.epochs.append({})
        started = Phases.now()
        order = np.random.default_rng([seed, epoch]).permutation(len(self.train))
        batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
        self.model.train()
        loss_sum = torch.zeros((), device=self.accelerator.device)
        for step, batch in enumerate(DataLoader(self.train, batch_sampler=batches)):
            progress = (epoch - 1 + step / len(batches)) / epochs
            cosine = 0.5 * (1 + math.cos(math.pi * progress))
            for group in self.optimizer.param_groups:
                group["lr"] = floor + (base_lr - floor) * cosine
            with phases.timing("steps"):
                loss_sum += self.step(batch)
        phases.train_losses.append(float(loss_sum) / len(self.train))
        record = phases.epochs[-1]
        record["loop"] = Phases.now() - started - record["steps"]
        with phases.timing("validate"):
            self.validate()
        return phases.train_losses[-1]

    def step(self, batch: dict[str, Any]) -> torch.Tensor:
        """One plain training step; returns the batch's loss sum (on the device, no sync)."""
        lr, hr, mask = (batch[key].to(self.accelerator.device) for key in ("lr", "hr", "mask"))
        per_sample = dem_loss_components(self.model(lr), hr, mask) @ self.weights
        self.accelerator.backward(per_sample.mean())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return per_sample.detach().sum()

    @torch.no_grad()
    def validate(self) -> float:
        """The validation a plain loop does: the mean weighted loss over the validation tiles."""
        self.model.eval()
        total = torch.zeros((), device=self.weights.device)
        for batch in DataLoader(self.val, batch_size=self.config.data.batch_size):
            lr, hr, mask = (batch[key].to(self.weights.device) for key in ("lr", "hr", "mask"))
            total += (dem_loss_components(self.model(lr), hr, mask) @ self.weights).sum()
        self.model.train()
        return float(total) / len(self.val)


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; each pair of sides starts clean."""
    reset_accelerate_state()
    gc.collect()


def cli_arguments(args: argparse.Namespace, folder: Path, out: Path, epochs: int) -> list[str]:
    """The ``python -m core.run`` arguments of the measured run."""
    sets = [
        f"model.preset='{args.preset}'",
        f"data.batch_size={args.batch_size}",
        "train.progress='never'",
        f"train.cpu={str(args.device == 'cpu').lower()}",
        *args.model,
    ]
    return [
        *("--data", str(folder), "--out", str(out), "--epochs", str(epochs), "--seed", "0"),
        *(item for assignment in sets for item in ("--set", assignment)),
    ]


def build(
    args: argparse.Namespace, folder: Path, out: Path, epochs: int
) -> tuple[TimedTrainer, HandLoop]:
    """Both sides, set up for a run of ``epochs``, the trainer first (as ``core.run`` would)."""
    config, _ = resolve_config(
        build_parser().parse_args(cli_arguments(args, folder, out, epochs))
    )
    trainer = TimedTrainer(config, PluginManager.from_names(config.run.plugins, config.plugins))
    trainer.setup()
    return trainer, HandLoop(config)


def cpu_seconds(fn: Callable[[], object], repeats: int = 1) -> float:
    """Median CPU seconds of ``fn`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return statistics.median(times)


def step_pairs(trainer: Trainer, hand: HandLoop, pairs: int, batches: int) -> tuple[list, list]:
    """CPU seconds of ``Trainer.optimizer_step`` and of the hand step, alternated batch by
    batch over ``batches`` batches, which pairs them far more tightly than whole epochs."""
    device = trainer.accelerator.device
    loader = DataLoader(hand.train, batch_size=trainer.config.data.batch_size)
    ready = [to_device(batch, device) for _, batch in zip(range(batches), loader, strict=False)]
    turn = {"trainer": 0, "hand": 0}

    def step(side: str) -> Callable[[], float]:
        def run() -> float:
            batch = ready[turn[side] % len(ready)]
            turn[side] += 1
            started = time.process_time()
            if side == "trainer":
                Trainer.optimizer_step(trainer, [batch], 0.5)
            else:
                hand.step(batch)
            synchronize(device)
            return time.process_time() - started

        return run

    times = interleave({side: step(side) for side in turn}, pairs)
    return times["trainer"], times["hand"]


def finite_check(trainer: Trainer, batch: dict[str, Any], repeats: int) -> tuple[float, int]:
    """CPU seconds of the trainer's finite check over fresh gradients, and their number."""
    batch = to_device(batch, trainer.accelerator.device)
    losses = trainer.ctx.task.forward_losses(trainer.model, batch)
    trainer.accelerator.backward(losses.sum())
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    sums = torch.zeros(2 + len(trainer.ctx.task.components), dtype=torch.float64)
    seconds = cpu_seconds(lambda: trainer.gradients_finite(sums), repeats)
    trainer.optimizer.zero_grad(set_to_none=True)
    return seconds, len(grads)


def breakdown(
    args: argparse.Namespace, folder: Path, scratch: Path, trainer: TimedTrainer, hand: HandLoop
) -> dict:
    """Where the trainer's extra time goes: each suspect timed on its own, in CPU seconds.

    The trainer's cost per step (hooks, bookkeeping, the finite check) hardly depends on
    the model's width, but at full width it drowns in the noise of 100 ms steps; so it is
    also measured on the same architecture 4 channels wide, over many pairs, and the finite
    check (whose cost does grow with the gradients' size) is timed at both widths. The
    trainer's phases are called as ``Trainer`` defines them, past the subclass's timers.
    """
    rounds, pairs = (1, 10) if args.quick else (5, 400)
    repeats = 20 if args.quick else 200
    batches = 4 if args.quick else 24
    first = next(iter(DataLoader(hand.train, batch_size=args.batch_size)))
    full = step_pairs(trainer, hand, rounds * batches, batches)
    finite, gradients = finite_check(trainer, first, repeats)
    narrow_args = argparse.Namespace(**{**vars(args), "model": [*args.model, "model.n_feats=4"]})
    narrow_trainer, narrow_hand = build(narrow_args, folder, scratch / "narrow", 1)
    narrow = step_pairs(narrow_trainer, narrow_hand, pairs, 8)
    narrow_finite = finite_check(narrow_trainer, first, repeats)[0]
    validation = interleave(
        {
            "trainer": lambda: cpu_seconds(lambda: Trainer.validate(trainer)),
            "hand": lambda: cpu_seconds(hand.validate),
        },
        rounds,
    )
    return {
        "steps_per_epoch": math.ceil(len(hand.train) / args.batch_size),
        "val_tiles": len(hand.val),
        "gradients": gradients,
        "step_trainer": full[0],
        "step_hand": full[1],
        "narrow_trainer": narrow[0],
        "narrow_hand": narrow[1],
        "finite": finite,
        "narrow_finite": narrow_finite,
        "validate_difference": [a - b for a, b in zip(*validation.values(), strict=True)],
        "plan": cpu_seconds(lambda: trainer.epoch_plan(1), rounds),
        "plots": cpu_seconds(trainer.plot),
    }


def measure(
    args: argparse.Namespace, repeats: int, warmup: int
) -> tuple[TimedTrainer, HandLoop, dict]:
    """Both sides set up once, epochs in turns, then the breakdown of the difference."""
    with tempfile.TemporaryDirectory(prefix="terraplug-bench-") as scratch:
        folder = tiles_folder(args.data, args.per_terrain, Path(scratch))
        # One epoch more than are run: the trainer draws its plots after the last epoch of
        # its run, and they are timed on their own, once.
        trainer, hand = build(args, folder, Path(scratch) / "run", warmup + repeats + 1)
        losses = interleave({"trainer": trainer.epoch, "hand": hand.epoch}, repeats, warmup)
        for epoch, (ours, theirs) in enumerate(zip(*losses.values(), strict=True), warmup + 1):
            if not math.isclose(ours, theirs, rel_tol=1e-4):
                raise SystemExit(
                    f"the two sides did not train the same: epoch {epoch} train_loss {ours} "
                    f"(trainer) vs {theirs} (hand loop)"
                )
        pieces = breakdown(args, folder, Path(scratch), trainer, hand)
        reset_accelerate()
    return trainer, hand, pieces


@attrs.define
class Part:
    """One part of the trainer's extra time per epoch: paired differences in CPU seconds
    (trainer minus hand loop, or the trainer's own cost where the hand loop has none) and
    how many times an epoch incurs it."""

    label: str
    differences: list[float]
    per_epoch: int = 1

    def seconds(self) -> float:
        return self.per_epoch * statistics.median(self.differences)


def parts(trainer: TimedTrainer, hand: HandLoop, pieces: dict, timed: slice) -> list[Part]:
    """The per-epoch difference cut into parts that are each paired as tightly as possible:
    steps alternate batch by batch, validations call by call, the loop around the steps
    epoch by epoch; checkpoint and metrics line are the trainer's alone."""
    steps = pieces["steps_per_epoch"]
    full = [a - b for a, b in zip(pieces["step_trainer"], pieces["step_hand"], strict=True)]

    def phase_difference(phase: str) -> list[float]:
        ours = trainer.phases.phase(phase, "cpu", timed)
        theirs = hand.phases.phase(phase, "cpu", timed)
        return [a - b for a, b in zip(ours, theirs, strict=True)]

    return [
        Part(f"{steps} optimizer steps, {len(full)} alternated pairs", full, steps),
        Part(
            "the loop around them (plan, loader, losses), paired epochs", phase_difference("loop")
        ),
        Part(
            f"validation with richer metrics over {pieces['val_tiles']} tiles, paired calls",
            pieces["validate_difference"],
        ),
        Part("checkpoint (model and AdamW state)", phase_difference("checkpoint")),
        Part("metrics line and hooks", phase_difference("bookkeeping")),
    ]


def report(
    trainer: TimedTrainer, hand: HandLoop, pieces: dict, args: argparse.Namespace, timed: slice
) -> None:
    """Phase table per clock, one-off costs, the parts of the difference and the ratio lines."""
    losses = trainer.phases.train_losses
    print(
        f"# batch {args.batch_size}, {args.preset} preset {' '.join(args.model)}, "
        f"{len(hand.train)} training / {len(hand.val)} validation tiles; "
        f"{timed.stop - timed.start} pairs of epochs after {timed.start} warm-up pair(s); "
        f"train_loss {losses[0]:.6f} -> {losses[-1]:.6f}, the same on both sides every epoch"
    )
    for clock in CLOCKS:
        print(f"# {clock} ms per epoch: trainer | hand loop | difference (median, range)")
        for phase in PHASES:
            ours = trainer.phases.phase(phase, clock, timed)
            theirs = hand.phases.phase(phase, clock, timed)
            difference = [a - b for a, b in zip(ours, theirs, strict=True)]
            print(
                f"#   {phase:<12} {spread(ours, '', 1e3, 1)} | {spread(theirs, '', 1e3, 1)} | "
                f"{spread(difference, '', 1e3, 1)}"
            )
        index = CLOCKS.index(clock)
        print(
            f"#   once per run: set-up {trainer.phases.once['setup'][index]:.3f} s vs "
            f"{hand.phases.once['setup'][index]:.3f} s"
        )
    hand_epoch = statistics.median(hand.phases.epoch_totals("cpu", timed))
    explain(pieces, hand_epoch)
    summed = parts(trainer, hand, pieces, timed)
    print(f"# the trainer's extra CPU time per epoch, part by part (hand loop {hand_epoch:.2f} s):")
    for part in summed:
        print(f"#   {part.label}: {share(part.seconds(), hand_epoch)}")
    rng = np.random.default_rng(0)
    draws = sum(part.per_epoch * bootstrap_medians(part.differences, rng) for part in summed)
    # Each step pair's difference with the other parts at their medians: the spread of
    # single pairs; the interval resamples every part.
    rest = sum(part.seconds() for part in summed[1:])
    from_parts = [1 + (summed[0].per_epoch * d + rest) / hand_epoch for d in summed[0].differences]
    verdict("overhead_per_epoch_from_parts_cpu", from_parts, interval(1 + draws / hand_epoch))
    for clock in CLOCKS:
        ratios = paired(
            trainer.phases.epoch_totals(clock, timed), hand.phases.epoch_totals(clock, timed)
        )
        verdict(f"overhead_per_epoch_{clock}", ratios, interval(bootstrap_medians(ratios, rng)))


def verdict(name: str, ratios: list[float], bounds: tuple[float, float]) -> None:
    ratio_line(name, ratios, f"<= {TARGET}", statistics.median(ratios) <= TARGET, bounds)


def share(seconds: float, hand_epoch: float) -> str:
    return f"{seconds * 1e3:+.1f} ms = {100 * seconds / hand_epoch:+.2f} %"


def explain(pieces: dict, hand_epoch: float) -> None:
    """What the step's and the loop's differences are made of, timed on their own."""
    steps = pieces["steps_per_epoch"]

    def quartiles(side: str) -> str:
        values = [
            a - b for a, b in zip(pieces[f"{side}_trainer"], pieces[f"{side}_hand"], strict=True)
        ]
        low, middle, high = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        return f"{middle * 1e3:+.2f} ms a step (quartiles {low * 1e3:+.2f} to {high * 1e3:+.2f})"

    narrow = pieces["narrow_trainer"], pieces["narrow_hand"]
    rest = statistics.median(a - b for a, b in zip(*narrow, strict=True)) - pieces["narrow_finite"]
    print(f"# inside the difference, per epoch (hand loop {hand_epoch:.2f} s):")
    print(
        f"#   a full-width step: trainer {spread(pieces['step_trainer'], ' ms', 1e3, 1)}, hand "
        f"{spread(pieces['step_hand'], ' ms', 1e3, 1)}, difference {quartiles('step')}"
    )
    print(
        f"#   of which the finite check over {pieces['gradients']} gradients "
        f"({pieces['finite'] * 1e3:.2f} ms a step): {share(steps * pieces['finite'], hand_epoch)}"
    )
    print(
        f"#   of which hooks and bookkeeping (model 4 channels wide, {len(narrow[1])} alternated "
        f"pairs, {quartiles('narrow')} less its own finite check "
        f"{pieces['narrow_finite'] * 1e3:.2f} ms): {share(steps * rest, hand_epoch)}"
    )
    print(f"#   the epoch plan and its terrain statistics: {share(pieces['plan'], hand_epoch)}")
    print(
        "#   terrain-count all-reduce: 0 (runs only with several processes); host syncs per "
        "step (StepInfo.num_samples .item(), the loss sums' .cpu(), the finite check's bool()): "
        "free on a CPU, see gpu_throughput.py"
    )
    print(
        f"#   once per run, plots after the last epoch: {share(pieces['plots'], hand_epoch)} "
        "of one epoch"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--data", type=Path, help="GeoTIFF folder (default: procedural tiles)")
    parser.add_argument("--per-terrain", type=int, default=120, help="procedural tiles each")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--preset", default="small", choices=("small", "default"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--model", action="append", default=[], metavar="KEY=VALUE", help="model.* override"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.per_terrain = 4
        args.model = ["model.n_resgroups=1", "model.n_resblocks=1", "model.n_feats=8"]
    repeats = args.repeats or (1 if args.quick else 20)
    warmup = 0 if args.quick else 1
    started = start(
        "framework overhead: core.run (no plugins) vs a hand-written loop", args.threads
    )
    trainer, hand, pieces = measure(args, repeats, warmup)
    report(trainer, hand, pieces, args, slice(warmup, warmup + repeats))
    finish(started)


if __name__ == "__main__":
    main()
