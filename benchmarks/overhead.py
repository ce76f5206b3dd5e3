"""Framework overhead: ``core.run`` with no plugins against a hand-written Accelerate loop.

Both sides train the same RCAN from the same initial weights on the same tiles, in the same
batches (the trainer's default plan is a permutation seeded by (seed, epoch) and the hand
loop draws the same one), with the same loss, AdamW and cosine schedule, for the same
epochs, so their training losses must agree; the script stops if they do not. The trainer
side is built as ``python -m core.run`` builds it (its argument parser and config
resolution, no plugins), with a subclass that only times its phases.

The hand loop does what a plain loop has to: train, then a validation loss per epoch. The
trainer also writes metrics.jsonl and a checkpoint every epoch, computes richer validation
metrics (RMSE in metres per terrain, slope, the bicubic baseline) and draws three plots
after the last epoch; the phase table says what each costs.

Each phase is timed in wall-clock seconds and in CPU seconds of this process. With one
torch thread and ``num_workers=0`` the work is single-threaded, so CPU time is the wall
time the run would take on an idle machine, without the waits for other users' processes
that make wall time on a shared box swing by tens of percent between repeats::

    python benchmarks/overhead.py [--epochs 3] [--repeats 4] [--per-terrain 120]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
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
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import set_seed
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
from torch import nn
from torch.utils.data import DataLoader

from core.config import Config
from core.data.dataset import TileDataset, train_val_split
from core.losses import dem_loss_components
from core.models.rcan import build_rcan
from core.plugins import PluginManager
from core.run import build_parser, resolve_config
from core.train import Trainer, to_device

TARGET = 1.03
"""The trainer may be at most 3 % slower per epoch than the hand loop."""
PHASES = ("train", "validate", "checkpoint", "bookkeeping")
CLOCKS = ("cpu", "wall")


class Phases:
    """Wall and CPU seconds of named phases, per epoch, plus set-up and the whole run."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, np.ndarray]] = []
        self.once: dict[str, np.ndarray] = {}
        self.train_loss = math.nan

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

    def per_epoch(self, phase: str, clock: str, epochs: slice) -> float:
        index = CLOCKS.index(clock)
        return statistics.fmean(
            float(e.get(phase, np.zeros(2))[index]) for e in self.epochs[epochs]
        )


class TimedTrainer(Trainer):
    """The trainer unchanged, with the time of each phase recorded per epoch."""

    def __init__(self, config: Config, plugins: PluginManager) -> None:
        super().__init__(config, plugins)
        self.phases = Phases()

    def setup(self) -> int:
        with self.phases.timing("setup", once=True):
            return super().setup()

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        self.phases.epochs.append({})
        started = Phases.now()
        row = super().run_epoch(epoch)
        record = self.phases.epochs[-1]
        record["train"] = Phases.now() - started - record["validate"]
        self.phases.train_loss = row["train_loss"]
        return row

    def validate(self) -> dict[str, Any]:
        with self.phases.timing("validate"):
            return super().validate()

    def save_checkpoint(self, completed_epoch: int) -> None:
        with self.phases.timing("checkpoint"):
            super().save_checkpoint(completed_epoch)

    def end_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        """Metrics line, plots, tensorboard, hooks: everything but the checkpoint."""
        started = Phases.now()
        before = self.phases.epochs[-1].get("checkpoint", np.zeros(2))
        super().end_epoch(epoch, row)
        checkpoint = self.phases.epochs[-1].get("checkpoint", np.zeros(2)) - before
        self.phases.epochs[-1]["bookkeeping"] = Phases.now() - started - checkpoint


def loss_weights(config: Config, device: torch.device) -> torch.Tensor:
    """The ``[loss]`` weights as a tensor, in the task's component order."""
    loss = config.loss
    components = [loss.elevation, loss.gradient, loss.curvature, loss.edge, loss.spectral]
    return torch.tensor(components, device=device)


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; each run in this process starts clean."""
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    gc.collect()


def cli_arguments(args: argparse.Namespace, folder: Path, out: Path) -> list[str]:
    """The ``python -m core.run`` arguments of the measured run."""
    sets = [
        f"model.preset='{args.preset}'",
        f"data.batch_size={args.batch_size}",
        "train.progress='never'",
        f"train.cpu={str(args.device == 'cpu').lower()}",
        *args.model,
    ]
    return [
        *("--data", str(folder), "--out", str(out), "--epochs", str(args.epochs), "--seed", "0"),
        *(item for assignment in sets for item in ("--set", assignment)),
    ]


def run_trainer(argv: list[str]) -> Phases:
    """What ``core.run.main`` does with ``argv`` (less its error handling), timed."""
    config = resolve_config(build_parser().parse_args(argv))
    trainer = TimedTrainer(config, PluginManager.from_names(config.run.plugins, config.plugins))
    with trainer.phases.timing("run", once=True), contextlib.redirect_stdout(io.StringIO()):
        trainer.fit()
    reset_accelerate()
    return trainer.phases


def run_hand_loop(config: Config) -> Phases:
    """The plain Accelerate loop a user would write for the same run, timed."""
    phases = Phases()
    with phases.timing("run", once=True):
        with phases.timing("setup", once=True):
            accelerator = Accelerator(cpu=config.train.cpu)
            device = accelerator.device
            seed, epochs, batch_size = config.run.seed, config.run.epochs, config.data.batch_size
            set_seed(seed)
            dataset = TileDataset.from_folder(Path(config.data.dir), config.data.scale)
            train, val = train_val_split(dataset, config.data.val_fraction, seed)
            sizes = ("n_resgroups", "n_resblocks", "n_feats")
            overrides = {key: value for key in sizes if (value := getattr(config.model, key))}
            model = build_rcan(config.model.preset, config.data.scale, **overrides)
            optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=0)
            model, optimizer = accelerator.prepare(model, optimizer)
            weights = loss_weights(config, device)
            base_lr, floor = config.optim.lr, 0.01 * config.optim.lr
        for epoch in range(1, epochs + 1):
            phases.epochs.append({})
            with phases.timing("train"):
                order = np.random.default_rng([seed, epoch]).permutation(len(train))
                batches = [
                    order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)
                ]
                model.train()
                loss_sum = torch.zeros((), device=device)
                for step, batch in enumerate(DataLoader(train, batch_sampler=batches)):
                    progress = (epoch - 1 + step / len(batches)) / epochs
                    cosine = 0.5 * (1 + math.cos(math.pi * progress))
                    for group in optimizer.param_groups:
                        group["lr"] = floor + (base_lr - floor) * cosine
                    loss_sum += hand_step(model, optimizer, accelerator, batch, weights)
                phases.train_loss = float(loss_sum) / len(train)
            with phases.timing("validate"):
                hand_validate(model, val, batch_size, weights)
    reset_accelerate()
    return phases


def hand_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    batch: dict[str, Any],
    weights: torch.Tensor,
) -> torch.Tensor:
    """One plain training step; returns the batch's loss sum (on the device, no sync)."""
    lr, hr, mask = (batch[key].to(accelerator.device) for key in ("lr", "hr", "mask"))
    per_sample = dem_loss_components(model(lr), hr, mask) @ weights
    accelerator.backward(per_sample.mean())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return per_sample.detach().sum()


@torch.no_grad()
def hand_validate(
    model: nn.Module, val: TileDataset, batch_size: int, weights: torch.Tensor
) -> float:
    """The validation a plain loop does: the mean weighted loss over the validation tiles."""
    model.eval()
    total = torch.zeros((), device=weights.device)
    for batch in DataLoader(val, batch_size=batch_size):
        lr, hr, mask = (batch[key].to(weights.device) for key in ("lr", "hr", "mask"))
        total += (dem_loss_components(model(lr), hr, mask) @ weights).sum()
    model.train()
    return float(total) / len(val)


def cpu_seconds(fn: Callable[[], object], repeats: int = 1) -> float:
    """Median CPU seconds of ``fn`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return statistics.median(times)


@attrs.define
class Sides:
    """A set-up trainer and a hand-loop copy of its model, optimizer and loss weights."""

    trainer: Trainer
    model: nn.Module
    optimizer: torch.optim.Optimizer
    weights: torch.Tensor
    batches: list[dict[str, Any]]

    @classmethod
    def build(cls, args: argparse.Namespace, folder: Path, out: Path, steps: int) -> Sides:
        config = resolve_config(build_parser().parse_args(cli_arguments(args, folder, out)))
        trainer = Trainer(config, PluginManager.from_names([]))
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.setup()
        accelerator, device = trainer.accelerator, trainer.accelerator.device
        model = copy.deepcopy(accelerator.unwrap_model(trainer.model))
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=0)
        model, optimizer = accelerator.prepare(model, optimizer)
        loader = DataLoader(trainer.ctx.train_dataset, batch_size=config.data.batch_size)
        batches = [to_device(batch, device) for _, batch in zip(range(steps), loader, strict=False)]
        return cls(trainer, model, optimizer, loss_weights(config, device), batches)

    def step_pairs(self, pairs: int) -> tuple[list[float], list[float]]:
        """CPU seconds of ``Trainer.optimizer_step`` and of the hand step, alternated batch
        by batch, which pairs them far more tightly than whole runs on a loaded machine."""
        turn = {"trainer": 0, "hand": 0}
        accelerator = self.trainer.accelerator

        def step(side: str) -> Callable[[], float]:
            def run() -> float:
                batch = self.batches[turn[side] % len(self.batches)]
                turn[side] += 1
                started = time.process_time()
                if side == "trainer":
                    self.trainer.optimizer_step([batch], 0.5)
                else:
                    hand_step(self.model, self.optimizer, accelerator, batch, self.weights)
                synchronize(accelerator.device)
                return time.process_time() - started

            return run

        times = interleave({side: step(side) for side in turn}, pairs)
        return times["trainer"], times["hand"]

    def finite_check(self, repeats: int) -> tuple[float, int]:
        """CPU seconds of the trainer's finite check over fresh gradients, and how many
        gradients there are."""
        trainer = self.trainer
        losses = trainer.ctx.task.forward_losses(trainer.model, self.batches[0])
        trainer.accelerator.backward(losses.sum())
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        sums = torch.zeros(2 + len(trainer.ctx.task.components), dtype=torch.float64)
        finite = cpu_seconds(lambda: trainer.gradients_finite(sums), repeats)
        trainer.optimizer.zero_grad(set_to_none=True)
        return finite, len(grads)


def breakdown(args: argparse.Namespace, folder: Path, scratch: Path) -> dict:
    """Where the trainer's extra time goes: each suspect timed on its own, in CPU seconds.

    The trainer's cost per step (hooks, bookkeeping, the finite check) hardly depends on
    the model's width, but at full width it drowns in the noise of 100 ms steps; so it is
    measured on the same architecture 4 channels wide, over many pairs, and the finite
    check (whose cost does grow with the gradients' size) is timed at both widths.
    """
    rounds, pairs = (1, 10) if args.quick else (3, 400)
    repeats = 20 if args.quick else 200
    sides = Sides.build(args, folder, scratch / "breakdown", 4 if args.quick else 24)
    full = sides.step_pairs(rounds * len(sides.batches))
    narrow_args = argparse.Namespace(**{**vars(args), "model": [*args.model, "model.n_feats=4"]})
    narrow_sides = Sides.build(narrow_args, folder, scratch / "breakdown-narrow", 8)
    narrow = narrow_sides.step_pairs(pairs)
    narrow_finite = narrow_sides.finite_check(repeats)[0]
    finite, gradients = sides.finite_check(repeats)
    trainer = sides.trainer
    val, batch_size = trainer.val_dataset, trainer.config.data.batch_size
    validation = interleave(
        {
            "trainer": lambda: cpu_seconds(trainer.validate),
            "hand": lambda: cpu_seconds(
                lambda: hand_validate(sides.model, val, batch_size, sides.weights)
            ),
        },
        rounds,
    )
    result = {
        "steps_per_epoch": math.ceil(len(trainer.ctx.train_dataset) / batch_size),
        "val_tiles": len(val),
        "gradients": gradients,
        "step_trainer": full[0],
        "step_hand": full[1],
        "narrow_trainer": narrow[0],
        "narrow_hand": narrow[1],
        "finite": finite,
        "narrow_finite": narrow_finite,
        "validate_difference": [a - b for a, b in zip(*validation.values(), strict=True)],
        "checkpoint": cpu_seconds(lambda: trainer.save_checkpoint(0), rounds),
        "plan": cpu_seconds(lambda: trainer.epoch_plan(1), rounds),
    }
    reset_accelerate()
    return result


def measure(args: argparse.Namespace, repeats: int) -> tuple[list[Phases], list[Phases], dict]:
    """Both sides on the same tiles, interleaved, then the breakdown of the difference."""
    results: dict[str, list[Phases]] = {"trainer": [], "hand": []}
    with tempfile.TemporaryDirectory(prefix="terraplug-bench-") as scratch:
        folder = tiles_folder(args.data, args.per_terrain, Path(scratch))
        runs = iter(range(1_000_000))

        def trainer_side() -> float:
            out = Path(scratch) / f"run{next(runs)}"
            results["trainer"].append(run_trainer(cli_arguments(args, folder, out)))
            return 0.0

        def hand_side() -> float:
            config = resolve_config(build_parser().parse_args(cli_arguments(args, folder, Path())))
            results["hand"].append(run_hand_loop(config))
            return 0.0

        warmup = 0 if args.quick else 1
        interleave({"trainer": trainer_side, "hand": hand_side}, repeats, warmup)
        pieces = breakdown(args, folder, Path(scratch))
    trainers, hands = results["trainer"][-repeats:], results["hand"][-repeats:]
    for trainer, hand in zip(trainers, hands, strict=True):
        if not math.isclose(trainer.train_loss, hand.train_loss, rel_tol=1e-4):
            raise SystemExit(
                f"the two sides did not train the same: train_loss {trainer.train_loss} "
                f"(trainer) vs {hand.train_loss} (hand loop)"
            )
    return trainers, hands, pieces


def report(
    trainers: list[Phases], hands: list[Phases], pieces: dict, args: argparse.Namespace
) -> None:
    """Phase table per clock, one-off costs, and the ratio lines."""
    steady = slice(0, max(args.epochs - 1, 1))  # the last epoch also draws the plots
    last = slice(-1, None)
    print(
        f"# batch {args.batch_size}, {args.epochs} epochs, {args.preset} preset "
        f"{' '.join(args.model)}, {len(trainers)} interleaved repeats; both sides reached "
        f"train_loss {trainers[-1].train_loss:.6f}"
    )
    epoch_totals: dict[str, tuple[list[float], list[float]]] = {}
    for clock in CLOCKS:
        print(f"# {clock} ms per epoch (epochs before the last): trainer | hand loop | difference")
        sides = []
        for phases in (trainers, hands):
            sides.append({p: [run.per_epoch(p, clock, steady) for run in phases] for p in PHASES})
        for phase in PHASES:
            ours, theirs = sides[0][phase], sides[1][phase]
            difference = [a - b for a, b in zip(ours, theirs, strict=True)]
            print(
                f"#   {phase:<12} {spread(ours, '', 1e3, 1)} | {spread(theirs, '', 1e3, 1)} | "
                f"{spread(difference, '', 1e3, 1)}"
            )
        epoch_totals[clock] = tuple(
            [sum(values) for values in zip(*side.values(), strict=True)] for side in sides
        )
        index = CLOCKS.index(clock)
        plots = [
            run.per_epoch("bookkeeping", clock, last) - run.per_epoch("bookkeeping", clock, steady)
            for run in trainers
        ]
        print(
            f"#   once per run: set-up {spread([r.once['setup'][index] for r in trainers], ' s')}"
            f" vs {spread([r.once['setup'][index] for r in hands], ' s')}; plots after the "
            f"last epoch {spread(plots, ' s')}; whole run "
            f"{spread([r.once['run'][index] for r in trainers], ' s')} vs "
            f"{spread([r.once['run'][index] for r in hands], ' s')}"
        )
    trainer_cpu, hand_cpu = epoch_totals["cpu"]
    plots = [
        run.per_epoch("bookkeeping", "cpu", last) - run.per_epoch("bookkeeping", "cpu", steady)
        for run in trainers
    ]
    measured = statistics.median(a - b for a, b in zip(trainer_cpu, hand_cpu, strict=True))
    attribute(pieces, statistics.median(hand_cpu), measured, statistics.median(plots))
    for clock in CLOCKS:
        ratios = paired(*epoch_totals[clock])
        met = statistics.median(ratios) <= TARGET
        ratio_line(f"overhead_per_epoch_{clock}", ratios, f"<= {TARGET}", met)
    index = CLOCKS.index("cpu")
    whole = paired([r.once["run"][index] for r in trainers], [r.once["run"][index] for r in hands])
    ratio_line("overhead_whole_run_cpu", whole, "none (set-up and plots included)", None)


def attribute(pieces: dict, hand_epoch: float, measured: float, plots: float) -> None:
    """Print each suspect's CPU cost per epoch as a share of the hand loop's epoch."""
    steps = pieces["steps_per_epoch"]

    def share(seconds: float) -> str:
        return f"{seconds * 1e3:+.1f} ms = {100 * seconds / hand_epoch:+.2f} %"

    def differences(side: str) -> list[float]:
        return [
            a - b for a, b in zip(pieces[f"{side}_trainer"], pieces[f"{side}_hand"], strict=True)
        ]

    def quartiles(values: list[float]) -> str:
        low, middle, high = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        return f"{middle * 1e3:+.2f} ms a step (quartiles {low * 1e3:+.2f} to {high * 1e3:+.2f})"

    finite = pieces["finite"]
    other = statistics.median(differences("narrow")) - pieces["narrow_finite"]
    rows = [
        (
            f"the finite check over {pieces['gradients']} gradients ({finite * 1e3:.2f} ms a step)",
            steps * finite,
        ),
        (
            f"the rest of the trainer's step (hooks, bookkeeping; model 4 channels wide, "
            f"{len(pieces['narrow_hand'])} alternated pairs, "
            f"{quartiles(differences('narrow'))} less its own finite check "
            f"{pieces['narrow_finite'] * 1e3:.2f} ms)",
            steps * other,
        ),
        (
            f"richer validation metrics over {pieces['val_tiles']} tiles",
            statistics.median(pieces["validate_difference"]),
        ),
        ("checkpoint (model and AdamW state, every epoch)", pieces["checkpoint"]),
        ("epoch plan and its terrain statistics", pieces["plan"]),
    ]
    print(f"# where the trainer's extra CPU time goes, per epoch (hand loop: {hand_epoch:.2f} s):")
    full = statistics.median(differences("step"))
    print(
        f"#   a full-width step, {len(pieces['step_hand'])} alternated pairs: trainer "
        f"{spread(pieces['step_trainer'], ' ms', 1e3, 1)}, hand "
        f"{spread(pieces['step_hand'], ' ms', 1e3, 1)}, difference "
        f"{quartiles(differences('step'))}: {share(steps * full)} (noisy)"
    )
    for label, seconds in rows:
        print(f"#   {label}: {share(seconds)}")
    total = sum(seconds for _, seconds in rows)
    print(f"#   sum of the above: {share(total)}")
    print(f"#   measured on whole runs (median paired difference): {share(measured)}")
    print(
        "#   terrain-count all-reduce: 0 (runs only with several processes); host syncs per "
        "step (StepInfo.num_samples .item(), the loss sums' .cpu(), the finite check's bool()): "
        "free on a CPU, see gpu_throughput.py"
    )
    print(f"#   once per run, plots after the last epoch: {share(plots)} of one epoch")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--data", type=Path, help="GeoTIFF folder (default: procedural tiles)")
    parser.add_argument("--per-terrain", type=int, default=120, help="procedural tiles each")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--preset", default="small", choices=("small", "default"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--model", action="append", default=[], metavar="KEY=VALUE", help="model.* override"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.per_terrain, args.epochs = 4, 2
        args.model = ["model.n_resgroups=1", "model.n_resblocks=1", "model.n_feats=8"]
        args.repeats = args.repeats or 1
    repeats = args.repeats or 4
    started = start(
        "framework overhead: core.run (no plugins) vs a hand-written loop", args.threads
    )
    trainers, hands, pieces = measure(args, repeats)
    report(trainers, hands, pieces, args)
    finish(started)


if __name__ == "__main__":
    main()
