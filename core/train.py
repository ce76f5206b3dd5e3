"""The training loop: Accelerate underneath, plugin hooks at every decision point.

One optimizer step, as data flows through it::

    batch_plan (hook) -> micro-batches -> route_batch (hook) -> training_forward (hook)
      -> [B, C] losses x loss_weights (hook) -> backward (hook)
      -> transform_gradients (hook) -> clip -> optimizer.step

The trainer cuts each epoch's plan into per-process shares itself (process ``r`` of ``n``
gets batches ``r, r+n, ...``), so a plan that is a pure function of (seed, epoch) gives
every process its own tiles with no repeats, and no sampler needs ``set_epoch``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from core.config import Config, dump_config
from core.context import RunContext, StepInfo
from core.errors import UsageError
from core.metrics import count_loss_spikes
from core.plugins import PluginManager
from core.tasks import get_task

CHECKPOINT = "checkpoint.pt"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the trainer saved a checkpoint before raising this."""


def launched_without_gpus() -> bool:
    """Several processes (``accelerate launch --multi_gpu``, ``torchrun``) but no GPU: use
    the CPU with gloo, rather than each process training alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def default_plan(indices: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """A shuffle seeded by (seed, epoch), cut into batches (the last may be short)."""
    order = np.random.default_rng([seed, epoch]).permutation(indices)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def plan_statistics(
    plan: Sequence[np.ndarray], terrains: np.ndarray, active: np.ndarray, names: Sequence[str]
) -> dict:
    """Terrain counts of the batches run and how many lacked one of the epoch's terrains."""
    counts = np.zeros(len(names), dtype=np.int64)
    missing = 0
    for batch in plan:
        present = np.bincount(terrains[batch], minlength=len(names))
        counts += present
        missing += int(np.any(present[active] == 0))
    return {
        "terrain_counts": {names[i]: int(n) for i, n in enumerate(counts) if n},
        "batches_missing_a_terrain": missing,
        "active_terrains": [names[i] for i in active],
    }


def lr_at(config: Config, progress: float, step: int) -> float:
    """Learning rate at ``progress`` in [0, 1] through the run (linear warm-up, then cosine)."""
    optim = config.optim
    warmup = min(1.0, (step + 1) / optim.warmup_steps) if optim.warmup_steps else 1.0
    if optim.schedule == "constant":
        return optim.lr * warmup
    floor = 0.01 * optim.lr
    return warmup * (floor + (optim.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


def json_safe(value: Any) -> Any:
    """NaN and inf become null, so metrics.jsonl is strict JSON for any reader."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite, in one fused pass per device and
    dtype: GradScaler's own check, which multiplies by 1 (values stay bit-identical) and
    costs a fraction of an ``isfinite().all()`` per tensor."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    flags = []
    for (device, _), group in groups.items():
        found = torch.zeros(1, device=device)
        one = torch.ones(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, one)
        flags.append(found)
    return not flags or not bool(torch.cat(flags).any())


def frozen_parameter_names(model: nn.Module) -> set[str]:
    """Every name of a frozen parameter, tied ones (one tensor, two names) included."""
    named = model.named_parameters(remove_duplicate=False)
    return {name for name, p in named if not p.requires_grad}


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without frozen parameters: they are rebuilt from the config (a frozen
    300 M-parameter TerraMind would otherwise be rewritten every epoch)."""
    frozen = frozen_parameter_names(model)
    return {key: value for key, value in model.state_dict().items() if key not in frozen}


def load_trained_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    absent = set(missing) - frozen_parameter_names(model)
    if absent or unexpected:
        raise UsageError(
            "checkpoint does not match the model built from its config: "
            f"missing {sorted(absent)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )


class Trainer:
    """Runs one configured training job in ``run_dir``."""

    def __init__(self, config: Config, plugins: PluginManager, *, resume: bool = False) -> None:
        self.config = config
        self.resume = resume
        cpu = config.train.cpu or launched_without_gpus()
        state = PartialState(cpu=cpu)  # processes agree on the run folder before logging starts
        run_dir = self.run_dir = self.resolve_run_dir(state)
        self.accelerator = Accelerator(
            mixed_precision=config.train.mixed_precision,
            cpu=cpu,
            log_with="tensorboard" if config.train.tensorboard else None,
            project_dir=str(run_dir),
        )
        task = get_task(config.run.task)
        self.ctx = RunContext(
            config=config,
            accelerator=self.accelerator,
            task=task,
            plugins=plugins,
            run_dir=run_dir,
            total_epochs=config.run.epochs,
            terrains=task.terrains,
        )
        self.rows: list[dict[str, Any]] = []
        self.step_losses: list[float] = []
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.stop_signal: int | None = None
        self.partial: dict[int, tuple[torch.Tensor, list[float]]] = {}

    # --- set-up ------------------------------------------------------------------------

    def resolve_run_dir(self, state: PartialState) -> Path:
        """``run.out``, or a timestamped folder chosen by the main process and shared.

        A folder that already holds a run is refused unless resuming: nothing is overwritten.
        """
        if self.config.run.out:
            run_dir = Path(self.config.run.out)
        else:
            choice = [f"runs/{self.config.run.task}-{time.strftime('%Y%m%d-%H%M%S')}"]
            run_dir = Path(broadcast_object_list(choice)[0])
        if not self.resume and (run_dir / "metrics.jsonl").exists():
            raise UsageError(
                f"run folder {run_dir} already holds a run; continue it with --resume "
                f"{run_dir} or choose another --out"
            )
        if state.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
        self.config.run.out = str(run_dir)
        return run_dir

    def setup(self) -> int:
        """Build data, model and optimizer; returns the epoch to start from."""
        config, ctx, accelerator = self.config, self.ctx, self.accelerator
        set_seed(config.run.seed)
        train, val = ctx.task.build_datasets(config, ctx)
        ctx.train_dataset, self.val_dataset = train, val
        model = ctx.task.build_model(config)
        model = ctx.plugins.chain("configure_model", model, "model", ctx=ctx)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise UsageError(f"task {config.run.task}: the model has no trainable parameters")
        optimizer = torch.optim.AdamW(
            trainable, lr=config.optim.lr, weight_decay=config.optim.weight_decay
        )
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        ctx.model = self.model
        self.base_weights = torch.tensor(
            [getattr(config.loss, c, 1.0) for c in ctx.task.components],
            device=accelerator.device,
        )
        start_epoch = 1
        if self.resume:
            start_epoch = self.load_checkpoint()
        elif accelerator.is_main_process:
            dump_config(config, self.run_dir / "config.toml")
        ctx.epoch = start_epoch
        if config.train.tensorboard:
            accelerator.init_trackers("tensorboard")
        ctx.plugins.call("setup", ctx=ctx)
        self.report_setup(train, val)
        return start_epoch

    def report_setup(self, train: Any, val: Any) -> None:
        if not self.accelerator.is_main_process:
            return
        n_params = sum(p.numel() for p in self.model.parameters())
        n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        terrains = self.ctx.terrains
        counts = np.bincount(train.terrains, minlength=len(terrains))
        names = ", ".join(p.name for p in self.ctx.plugins.active) or "none"
        print(
            f"terraplug: {self.ctx.task.name}, {n_params / 1e6:.2f} M parameters "
            f"({n_trainable / 1e6:.3f} M trainable), "
            f"{len(train)} training / {len(val)} validation tiles "
            f"({', '.join(f'{t} {n}' for t, n in zip(terrains, counts, strict=True) if n)}), "
            f"plugins: {names}, {self.accelerator.num_processes} process(es) on "
            f"{self.accelerator.device}, run folder {self.run_dir}",
            flush=True,
        )

    # --- the loop ----------------------------------------------------------------------

    def fit(self) -> list[dict[str, Any]]:
        """Train to ``run.epochs``; SIGINT/SIGTERM save a checkpoint and raise Interrupted."""
        start_epoch = self.setup()
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self.request_stop)
        try:
            for epoch in range(start_epoch, self.config.run.epochs + 1):
                self.ctx.epoch = epoch
                row = self.run_epoch(epoch)
                self.end_epoch(epoch, row)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.finish()
        return self.rows

    def epoch_plan(self, epoch: int) -> tuple[list[np.ndarray], dict]:
        """Every process's batches for ``epoch`` and their statistics (identical everywhere)."""
        ctx, config = self.ctx, self.config
        dataset = ctx.train_dataset
        indices = np.arange(len(dataset), dtype=np.int64)
        indices = np.asarray(
            ctx.plugins.chain("epoch_indices", indices, "indices", epoch=epoch, ctx=ctx),
            dtype=np.int64,
        )
        if len(indices) == 0:
            raise RuntimeError(f"epoch {epoch}: the epoch_indices hooks left no training tiles")
        plan = ctx.plugins.exclusive(
            "batch_plan", dataset=dataset, indices=indices, epoch=epoch, ctx=ctx
        )
        if plan is None:
            plan = default_plan(indices, config.data.batch_size, config.run.seed, epoch)
        plan = [np.asarray(batch, dtype=np.int64) for batch in plan if len(batch)]
        world = ctx.world_size
        per_step = world * config.optim.accumulation_steps
        if config.train.max_steps_per_epoch:
            plan = plan[: config.train.max_steps_per_epoch * per_step]
        plan = plan[: len(plan) // world * world]  # every process runs the same number of batches
        if not plan:
            raise RuntimeError(
                f"epoch {epoch}: fewer batches than processes ({world}); lower data.batch_size"
            )
        active = np.unique(dataset.terrains[indices])
        return plan, plan_statistics(plan, dataset.terrains, active, ctx.terrains)

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        ctx, config, accelerator = self.ctx, self.config, self.accelerator
        started = time.perf_counter()
        ctx.plugins.call("on_epoch_start", epoch=epoch, ctx=ctx)
        plan, stats = self.epoch_plan(epoch)
        local = plan[accelerator.process_index :: ctx.world_size]
        steps = list(chunks(local, config.optim.accumulation_steps))
        sums, epoch_losses = self.partial.pop(epoch, (None, []))
        if sums is None:
            sums = torch.zeros(2 + len(ctx.task.components), dtype=torch.float64)
        done = len(epoch_losses)  # steps completed before an interruption, replayed from here
        loader = DataLoader(
            ctx.train_dataset,
            batch_sampler=[batch.tolist() for step in steps[done:] for batch in step],
            num_workers=config.data.num_workers,
            pin_memory=accelerator.device.type == "cuda",
        )
        batches = iter(loader)
        self.model.train()
        bar = tqdm(
            total=len(steps),
            initial=done,
            desc=f"epoch {epoch}/{config.run.epochs}",
            disable=not self.show_progress(),
            leave=False,
        )
        for step_index in range(done, len(steps)):
            micro = [to_device(next(batches), accelerator.device) for _ in steps[step_index]]
            progress = (epoch - 1 + step_index / len(steps)) / config.run.epochs
            skipped_before = self.nonfinite_total
            step_sums = self.optimizer_step(micro, progress)
            if self.nonfinite_total == skipped_before:  # a skipped step stays out of the means
                sums += step_sums
            loss = float(step_sums[0] / max(step_sums[1], 1))
            epoch_losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update()
            if self.stop_signal is not None:
                bar.close()
                self.partial[epoch] = (sums, epoch_losses)
                self.save_checkpoint(epoch - 1)
                raise Interrupted(signal.Signals(self.stop_signal).name)
        bar.close()
        sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
        count = max(float(sums[1]), 1.0)
        row: dict[str, Any] = {"epoch": epoch, "train_loss": float(sums[0]) / count}
        for i, component in enumerate(ctx.task.components):
            row[f"train_loss_{component}"] = float(sums[2 + i]) / count
        row.update(self.validate())
        row.update(stats)
        row.update(
            lr=self.optimizer.param_groups[0]["lr"],
            steps=len(steps),
            loss_spikes=count_loss_spikes(self.step_losses + epoch_losses)
            - count_loss_spikes(self.step_losses),
            nonfinite_steps=self.nonfinite_total,
            seconds=round(time.perf_counter() - started, 3),
        )
        self.step_losses.extend(epoch_losses)
        row.update(ctx.pop_logged())
        for name, extra in ctx.plugins.call("validation_metrics", model=self.model, ctx=ctx):
            clash = set(extra or {}) & set(row)
            if clash:
                raise RuntimeError(f"plugin {name!r} returned metric keys that exist: {clash}")
            row.update(extra or {})
        return row

    def optimizer_step(self, micro: list[dict[str, Any]], progress: float) -> torch.Tensor:
        """One optimizer step over ``micro``; returns local [loss sum, samples, component sums]."""
        ctx, accelerator, model = self.ctx, self.accelerator, self.model
        counts = torch.zeros(len(ctx.terrains), device=accelerator.device)
        for batch in micro:
            counts += torch.bincount(batch["terrain"], minlength=len(ctx.terrains)).float()
        counts = accelerator.reduce(counts, "sum") if ctx.world_size > 1 else counts
        sums = torch.zeros(2 + len(ctx.task.components), dtype=torch.float64)
        for index, batch in enumerate(micro):
            ctx.step = StepInfo(counts, index, len(micro), progress)
            last = index == len(micro) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                ctx.plugins.call("route_batch", model=model, batch=batch, ctx=ctx)
                losses = ctx.plugins.exclusive(
                    "training_forward", model=model, batch=batch, ctx=ctx
                )
                if losses is None:
                    losses = ctx.task.forward_losses(model, batch)
                losses = losses.float()
                weights = self.base_weights.expand_as(losses).clone()
                weights = ctx.plugins.chain(
                    "loss_weights", weights, "weights", batch=batch, ctx=ctx
                )
                per_sample = (weights * losses).sum(1)
                if not ctx.plugins.exclusive(
                    "backward", per_sample_loss=per_sample, batch=batch, ctx=ctx
                ):
                    ctx.backward(per_sample.sum() * ctx.world_size / ctx.step.num_samples)
            detached = per_sample.detach()
            sums += torch.cat(
                [detached.sum().reshape(1), detached.new_full((1,), len(detached)),
                 losses.detach().sum(0)]
            ).double().cpu()  # fmt: skip
        ctx.plugins.call("transform_gradients", model=model, ctx=ctx)
        # fp16's GradScaler handles overflowing gradients itself: it skips the step and
        # lowers its scale, which it can only do if its step and update run
        if self.gradients_finite(sums, check_gradients=accelerator.scaler is None):
            if self.config.optim.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), self.config.optim.grad_clip)
            lr = lr_at(self.config, progress, ctx.global_step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            if not self.optimizer.step_was_skipped:
                ctx.global_step += 1
        self.optimizer.zero_grad(set_to_none=True)
        return sums

    def gradients_finite(self, sums: torch.Tensor, check_gradients: bool = True) -> bool:
        """Skip and count a step whose loss or gradient is not finite; stop after too many.

        Gradients are synchronised by now, so every process reaches the same verdict. The
        optimizer's list of parameters is walked rather than ``model.parameters()``, whose
        recursion through the modules costs more than the check itself. Without
        ``check_gradients`` (a GradScaler checks them) only the loss is checked.
        """
        ok = bool(torch.isfinite(sums[0]))
        if ok and check_gradients:
            params = (p for group in self.optimizer.param_groups for p in group["params"])
            ok = all_finite([p.grad for p in params if p.grad is not None])
        if ok:
            self.nonfinite_in_a_row = 0
            return True
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        limit = self.config.train.max_nonfinite_steps
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteLossError(
                f"{limit} optimizer steps in a row had a non-finite loss or gradient "
                f"(epoch {self.ctx.epoch}); lower optim.lr, enable optim.grad_clip, or check "
                "the data for NaN/inf values"
            )
        return False

    def validate(self) -> dict[str, Any]:
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        val = self.val_dataset
        rank, world = self.accelerator.process_index, self.ctx.world_size
        share = list(range(rank, len(val), world))
        loader = DataLoader(
            val,
            batch_sampler=list(chunks(share, self.config.data.batch_size)),
            num_workers=self.config.data.num_workers,
        )
        batches = (to_device(batch, self.accelerator.device) for batch in loader)
        metrics = self.ctx.task.validate(model, batches, self.ctx)
        model.train()
        return metrics

    # --- epoch end, checkpoints --------------------------------------------------------

    def end_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        """Checkpoint (it carries the rows), then the metrics line, plots, loggers, hooks.

        In this order a kill at any moment leaves a run that resumes: ``metrics.jsonl``
        never gets ahead of the checkpoint, and resuming rewrites it from the checkpoint.
        """
        ctx, accelerator = self.ctx, self.accelerator
        row = json_safe(row)
        self.rows.append(row)
        every = self.config.train.checkpoint_every
        if epoch % every == 0 or epoch == self.config.run.epochs:
            self.save_checkpoint(epoch)
        if accelerator.is_main_process:
            with open(self.run_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(row) + "\n")
            self.print_epoch(row)
            every = self.config.train.plot_every
            if epoch == self.config.run.epochs or (every and epoch % every == 0):
                ctx.task.write_plots(
                    self.run_dir, self.rows, accelerator.unwrap_model(self.model), ctx
                )
        if self.config.train.tensorboard:
            scalars = {k: v for k, v in row.items() if isinstance(v, int | float)}
            accelerator.log(scalars, step=epoch)
        ctx.plugins.call("on_epoch_end", epoch=epoch, metrics=row, ctx=ctx)

    def print_epoch(self, row: dict[str, Any]) -> None:
        print(
            f"epoch {row['epoch']}/{self.config.run.epochs}: {self.ctx.task.epoch_summary(row)} "
            f"spikes {row['loss_spikes']} {row['seconds']:.1f} s",
            flush=True,
        )

    def save_checkpoint(self, completed_epoch: int) -> None:
        """The last checkpoint, written atomically by the main process.

        ``self.partial`` carries the loss sums of an epoch interrupted by a signal, so a
        resumed run skips the finished steps and ends with the same metrics.
        """
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        state = {
            "epoch": completed_epoch,
            **self.ctx.task.checkpoint_meta(),
            "partial": self.partial,
            "global_step": self.ctx.global_step,
            "model": trained_state(self.accelerator.unwrap_model(self.model)),
            "optimizer": self.optimizer.state_dict(),
            "rows": self.rows,
            "step_losses": self.step_losses,
            "nonfinite_total": self.nonfinite_total,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
            },
        }
        atomic_write_bytes(self.run_dir / CHECKPOINT, lambda tmp: torch.save(state, tmp))
        self.ctx.task.export_model(self.run_dir, self.accelerator.unwrap_model(self.model))

    def load_checkpoint(self) -> int:
        """Restore everything :meth:`save_checkpoint` wrote; returns the epoch to run next."""
        state = torch.load(self.run_dir / CHECKPOINT, map_location="cpu", weights_only=False)
        load_trained_state(self.accelerator.unwrap_model(self.model), state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.partial = state["partial"]
        self.rows = state["rows"]
        self.step_losses = state["step_losses"]
        self.nonfinite_total = state["nonfinite_total"]
        self.ctx.global_step = state["global_step"]
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.accelerator.is_main_process:
            with open(self.run_dir / "metrics.jsonl", "w") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in self.rows)
        return state["epoch"] + 1

    # --- signals, progress, end ----------------------------------------------------------

    def request_stop(self, signum: int, _frame: Any) -> None:
        """Signal handler: finish the current step, then checkpoint and stop."""
        self.stop_signal = signum

    def show_progress(self) -> bool:
        mode = self.config.train.progress
        if not self.accelerator.is_main_process or mode == "never":
            return False
        return mode == "always" or sys.stderr.isatty()

    def finish(self) -> None:
        if self.config.train.tensorboard:
            self.accelerator.end_training()
        if not self.accelerator.is_main_process:
            return
        summary = {
            "epochs": len(self.rows),
            "final": self.rows[-1] if self.rows else None,
            "loss_spikes_total": sum(row["loss_spikes"] for row in self.rows),
            "nonfinite_steps": self.nonfinite_total,
            "skipped_tiles": [
                {"path": path, "reason": reason}
                for path, reason in getattr(self.ctx.task, "skipped", [])
            ],
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
