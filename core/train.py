"""The training loop: Accelerate underneath, plugin hooks at every decision point.

One optimizer step, as data flows through it::

    batch_plan (hook) -> micro-batches -> route_batch (hook) -> training_forward (hook)
      -> [B, C] losses x loss_weights (hook) + auxiliary_loss (hook)
      -> x per_sample_losses (hook) -> backward (hook)
      -> transform_gradients (hook) -> clip -> optimizer.step -> after_optimizer_step (hook)
      -> every train.probe_every steps: the probe set's loss (core.spikes, model spikes)
      -> every train.validate_every_steps steps: a point of the validation curve

Validation, the plots and the task's export run on the plugins' ``evaluation_weights``
(hook), and ``on_run_end`` (hook) hears how the run ended, whichever way.

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
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from torch import nn
from torch.utils.data import DataLoader, default_collate
from tqdm.auto import tqdm

from core.config import Config, absolute_data, dump_config, unstructure
from core.context import RunContext, StepInfo
from core.errors import UsageError
from core.plots import plot_loss_curves
from core.plugins import PluginManager
from core.resume import data_identity
from core.run_folder import (
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    CONFIG,
    INTERRUPTED,
    LOSS_CURVES,
    METRICS,
    SUMMARY,
)
from core.runlock import RunLock, claim_run_dir
from core.safe_io import nonfinite_tensors, save_tensors
from core.spikes import batch_loss_outliers, probe_indices, probe_jumps, probe_loss
from core.tasks import VAL_TILES, Batch, get_task
from core.val_tiles import write_val_tiles


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


class NonFiniteWeightsError(NonFiniteLossError):
    """The weights became NaN or inf; they are never checkpointed."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; every process saved its state before raising this."""


RUN_COMPLETED, RUN_INTERRUPTED, RUN_FAILED = "completed", "interrupted", "failed"
"""The ``status`` values of the ``on_run_end`` hook."""


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
    """Learning rate at ``progress`` in [0, 1] through the run (linear warm-up, then cosine)
    for the optimizer step after ``step`` steps, times ``optim.lr_spike_factor`` at the steps
    ``optim.lr_spike_steps`` lists (counted from 1)."""
    optim = config.optim
    warmup = min(1.0, (step + 1) / optim.warmup_steps) if optim.warmup_steps else 1.0
    injected = optim.lr_spike_factor if step + 1 in optim.lr_spike_steps else 1.0
    if optim.schedule == "constant":
        return optim.lr * warmup * injected
    floor = 0.01 * optim.lr
    cosine = floor + (optim.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return warmup * cosine * injected


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


def route_batches(batches: Iterable[Batch], model: nn.Module, ctx: RunContext) -> Iterator[Batch]:
    """Each batch after the plugins' ``route_batch`` (domain-specific layers learn which
    domain each sample has), just before the caller runs ``model`` on it."""
    for batch in batches:
        ctx.plugins.call("route_batch", model=model, batch=batch, ctx=ctx)
        yield batch


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


def numpy_rng_state() -> dict[str, Any]:
    """numpy's global RNG state in plain types (its key array as a list), which a
    weights-only checkpoint load accepts; ``np.random.set_state`` takes it back as is."""
    state = np.random.get_state(legacy=False)
    return {**state, "state": {**state["state"], "key": state["state"]["key"].tolist()}}


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


def load_trained_state(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load a checkpoint's trained weights; one that does not fit (config.toml's [model] or
    data.scale edited after training) is a UsageError naming ``source``."""
    edited = f"was {CONFIG}'s [model] or data.scale edited after training?"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # torch lists every tensor of another shape
        lines = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        raise UsageError(
            f"{source} does not match the model its {CONFIG} describes ({lines[:1]}); {edited}"
        ) from None
    absent = set(missing) - frozen_parameter_names(model)
    if absent or unexpected:
        raise UsageError(
            f"{source} does not match the model its {CONFIG} describes: "
            f"missing {sorted(absent)[:5]}, unexpected {sorted(unexpected)[:5]}; {edited}"
        )


def evaluation_weights(state: dict[str, torch.Tensor], ctx: RunContext) -> dict[str, torch.Tensor]:
    """The tensors the plugins' ``evaluation_weights`` chain puts in place of those of
    ``state`` (a :func:`trained_state`): only the replaced ones, none without such a plugin.
    A key the model does not have, or a tensor of another shape, is an error naming it."""
    chosen = ctx.plugins.chain("evaluation_weights", dict(state), "weights", ctx=ctx)
    replaced = {name: tensor for name, tensor in chosen.items() if tensor is not state.get(name)}
    for name, tensor in replaced.items():
        if name not in state or tensor.shape != state[name].shape:
            found = f"shape {tuple(state[name].shape)}" if name in state else "no such weight"
            raise RuntimeError(
                f"evaluation_weights returned {name!r} of shape {tuple(tensor.shape)}; the "
                f"model has {found}"
            )
    return replaced


@torch.no_grad()
def copy_weights(state: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` into the tensors of ``state``, which share the model's storage."""
    for name, tensor in weights.items():
        state[name].copy_(tensor)


@contextlib.contextmanager
def evaluated(model: nn.Module, ctx: RunContext) -> Iterator[None]:
    """``model`` (unwrapped) holds the plugins' ``evaluation_weights`` for the block and its
    trained weights again after it, however the block ends."""
    state = trained_state(model)
    chosen = evaluation_weights(state, ctx)
    trained = {name: state[name].clone() for name in chosen}
    copy_weights(state, chosen)
    try:
        yield
    finally:
        copy_weights(state, trained)


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch generator states, and CUDA's (one ByteTensor
    per device) where CUDA is available: dropout and sampling on a GPU draw from those."""
    state = {
        "python": random.getstate(),
        "numpy": numpy_rng_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def loader_generator(seed: int, epoch: int) -> torch.Generator:
    """A data loader's own generator, seeded from (seed, epoch): each loader draws its
    workers' base seed from it instead of torch's global generator, which a resumed epoch
    would otherwise advance once more than the uninterrupted run did (it builds one loader
    more), so the model's own draws after a resume (dropout, sampling) would differ."""
    generator = torch.Generator()
    generator.manual_seed(seed * 1_000_003 + epoch)
    return generator


def restore_rng(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`; CUDA's states go to the devices there are (a resume on the
    CPU, or on fewer GPUs, cannot repeat the others' draws)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


@contextlib.contextmanager
def aside(model: nn.Module, ctx: RunContext, seed: int) -> Iterator[None]:
    """A measurement that leaves the run as it found it: ``model`` in eval mode and the
    random generators seeded with ``seed`` for the block (a forward that samples gives the
    same draws every time), then the generators, ``ctx.log`` values and train mode as they
    were, so a run trains the same with or without the measurement."""
    saved, logged = rng_state(), ctx.logged_values()
    model.eval()
    set_seed(seed)
    try:
        yield
    finally:
        model.train()
        restore_rng(saved)
        ctx.restore_logged(logged)


class Trainer:
    """Runs one configured training job in ``run_dir``."""

    def __init__(
        self, config: Config, plugins: PluginManager, *, resume: dict[str, Any] | None = None
    ) -> None:
        """``resume``: the checkpoint the run continues from (``core.run`` read and checked
        it); None starts a new run."""
        self.config = config
        self.resumed = resume
        self.resume = resume is not None
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
        )
        self.rows: list[dict[str, Any]] = []
        self.step_losses: list[float] = []
        self.probe_batches: list[Batch] = []
        """The probe set (``train.probe_tiles`` training windows) in batches of at most
        ``data.batch_size``, so that scoring it needs no more memory than a training step;
        empty without probes."""
        self.probe_last: float | None = None
        """The probe set's last loss, which the next one is compared with."""
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.stop_signal: int | None = None
        self.partial: dict[int, dict[str, Any]] = {}
        """An interrupted epoch's progress on this process: {epoch: {"sums", "losses",
        "logged", "probes", "curve"}}, the state :meth:`run_epoch` accumulates over the
        epoch's steps."""
        self.lock = self.claim_run_dir(state)  # last: a failure above leaves nothing locked

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
        self.config.run.out = str(run_dir)
        return run_dir

    def claim_run_dir(self, state: PartialState) -> RunLock | None:
        """The main process creates and locks the run folder (``core.runlock``): one that
        another live run holds is refused, and one that holds a run unless resuming. Every
        process learns the verdict before any of them writes, so all stop together."""
        lock, problem = None, None
        if state.is_main_process:
            try:
                lock = claim_run_dir(self.run_dir, resume=self.resume)
            except UsageError as error:
                problem = str(error)
        if state.num_processes > 1:
            problem = broadcast_object_list([problem])[0]
        if problem is not None:
            raise UsageError(problem)
        return lock

    def release_run_dir(self) -> None:
        """Let another run use the folder; the process's end (or the lock's garbage
        collection) does this too."""
        if self.lock is not None:
            self.lock.release()

    def setup(self) -> int:
        """Build data, model and optimizer; returns the epoch to start from."""
        config, ctx, accelerator = self.config, self.ctx, self.accelerator
        set_seed(config.run.seed)
        absolute_data(config)  # for runs not started by core.run too (terraplug.testing)
        self.data_identity = data_identity(config.data.dir)  # before reading: what it reads
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
        if config.train.probe_every:
            chosen = probe_indices(train.terrains, config.train.probe_tiles, config.data.split_seed)
            self.probe_batches = [
                to_device(default_collate([train[int(i)] for i in part]), accelerator.device)
                for part in chunks(chosen.tolist(), config.data.batch_size)
            ]
        start_epoch = 1
        plugin_states: dict[str, dict[str, Any]] = {}
        if self.resume:
            start_epoch, plugin_states = self.restore_checkpoint()
        else:
            config.plugins = ctx.plugins.resolved_sections(config.plugins)
        if accelerator.is_main_process:  # the settings in force, and a resume's history
            dump_config(config, self.run_dir / CONFIG)
        ctx.epoch = start_epoch
        if config.train.tensorboard:
            accelerator.init_trackers("tensorboard")
        ctx.plugins.call("setup", ctx=ctx)
        ctx.plugins.load_state_dict(plugin_states)
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
        """Train to ``run.epochs``; SIGINT/SIGTERM save a checkpoint and raise Interrupted.
        The plugins' ``on_run_end`` hears how the run ended, whichever way it did."""
        try:
            self.train_epochs()
        except BaseException as error:
            stopped = isinstance(error, Interrupted | KeyboardInterrupt)
            self.end_run(RUN_INTERRUPTED if stopped else RUN_FAILED, error)
            raise
        self.end_run(RUN_COMPLETED, None)
        return self.rows

    def end_run(self, status: str, error: BaseException | None) -> None:
        """Call ``on_run_end``. After a failure or an interruption, the hook's own exception
        joins ``error`` as a note instead of hiding it (and the exit status it gives)."""
        try:
            self.ctx.plugins.call("on_run_end", status=status, error=error, ctx=self.ctx)
        except Exception as failure:
            if error is None:
                raise
            notes = "".join(f"; {note}" for note in getattr(failure, "__notes__", []))
            error.add_note(f"on_run_end then failed: {failure!r}{notes}")

    def train_epochs(self) -> None:
        """Set up, then run the epochs from the first (or the resumed) one to the last."""
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
        partial = self.partial.pop(epoch, None)
        if partial is None:
            sums = torch.zeros(self.sums_size(), dtype=torch.float64)
            epoch_losses: list[float] = []
            probes: list[list[Any]] = []  # [step, probe loss, a model spike?]
            curve: list[dict[str, Any]] = []  # the validation points within the epoch
            if self.probe_batches and self.probe_last is None:  # before step 1
                self.record_probe(probes)
        else:  # the steps an interruption finished count as if never interrupted
            sums, epoch_losses = partial["sums"], partial["losses"]
            probes, curve = partial["probes"], partial["curve"]
            ctx.restore_logged(partial["logged"])  # replaces what the replayed hooks logged
        done = len(epoch_losses)  # steps completed before an interruption, replayed from here
        loader = DataLoader(
            ctx.train_dataset,
            batch_sampler=[batch.tolist() for step in steps[done:] for batch in step],
            num_workers=config.data.num_workers,
            pin_memory=accelerator.device.type == "cuda",
            generator=loader_generator(config.run.seed, ctx.epoch),
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
                self.measure_after_step(probes, curve, last=step_index == len(steps) - 1)
            loss = float(step_sums[0] / max(step_sums[1], 1))
            epoch_losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update()
            stop = self.agreed_stop()
            if stop is not None:
                bar.close()
                self.partial[epoch] = {
                    "sums": sums,
                    "losses": epoch_losses,
                    "logged": ctx.logged_values(),
                    "probes": probes,
                    "curve": curve,
                }
                self.save_checkpoint(epoch - 1)
                self.write_interrupted(stop, epoch, step_index + 1, len(steps))
                raise Interrupted(signal.Signals(stop).name)
        bar.close()
        sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
        count = max(float(sums[1]), 1.0)
        row: dict[str, Any] = {"epoch": epoch, "train_loss": float(sums[0]) / count}
        components = len(ctx.task.components)
        for i, component in enumerate(ctx.task.components):
            row[f"train_loss_{component}"] = float(sums[2 + i]) / count
        by_domain = sums[2 + components :].reshape(2, len(ctx.terrains)).tolist()
        row["train_loss_by_terrain"] = {
            name: total / samples
            for name, total, samples in zip(ctx.terrains, *by_domain, strict=True)
            if samples
        }
        with evaluated(accelerator.unwrap_model(self.model), ctx):
            row.update(self.validate())
            extras = ctx.plugins.call("validation_metrics", model=self.model, ctx=ctx)
        curve.append(self.curve_point(row))
        row.update(stats)
        row.update(
            lr=self.optimizer.param_groups[0]["lr"],
            steps=len(steps),
            batch_loss_outliers=len(batch_loss_outliers(self.step_losses + epoch_losses))
            - len(batch_loss_outliers(self.step_losses)),
            model_spikes=sum(spike for _, _, spike in probes),
            model_spike_steps=[step for step, _, spike in probes if spike],
            nonfinite_steps=self.nonfinite_total,
            seconds=round(time.perf_counter() - started, 3),
            step_losses=list(epoch_losses),  # per optimizer step: the outliers, visible
            probe_steps=[step for step, _, _ in probes],
            probe_loss=[loss for _, loss, _ in probes],
            val_curve=curve,
        )
        self.step_losses.extend(epoch_losses)
        for name, extra in extras:
            clash = set(extra or {}) & set(row)
            if clash:
                raise RuntimeError(f"plugin {name!r} returned metric keys that exist: {clash}")
            row.update(extra or {})
        logged = ctx.pop_logged()
        clash = set(logged) & set(row)
        if clash:
            raise RuntimeError(f"ctx.log keys {sorted(clash)} clash with metrics of the epoch row")
        row.update(logged)
        return row

    def sums_size(self) -> int:
        """[loss sum, samples, per-component sums, per-domain base-weighted loss sums,
        per-domain samples]: what :meth:`optimizer_step` returns and an epoch adds up."""
        return 2 + len(self.ctx.task.components) + 2 * len(self.ctx.terrains)

    def optimizer_step(self, micro: list[dict[str, Any]], progress: float) -> torch.Tensor:
        """One optimizer step over ``micro``; returns this process's sums (:meth:`sums_size`)."""
        ctx, accelerator, model = self.ctx, self.accelerator, self.model
        counts = torch.zeros(len(ctx.terrains), device=accelerator.device)
        for batch in micro:
            counts += torch.bincount(batch["terrain"], minlength=len(ctx.terrains)).float()
        counts = accelerator.reduce(counts, "sum") if ctx.world_size > 1 else counts
        sums = torch.zeros(self.sums_size(), dtype=torch.float64)
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
                for name, term in ctx.plugins.call(
                    "auxiliary_loss", model=model, batch=batch, ctx=ctx
                ):
                    if term is not None:
                        if term.shape != per_sample.shape:
                            raise RuntimeError(
                                f"plugin {name!r}: auxiliary_loss returned shape "
                                f"{tuple(term.shape)}; expected {tuple(per_sample.shape)}"
                            )
                        per_sample = per_sample + term.float()
                per_sample = self.sample_weighted(per_sample, batch)
                if not ctx.plugins.exclusive(
                    "backward", per_sample_loss=per_sample, batch=batch, ctx=ctx
                ):
                    ctx.backward(per_sample.sum() * ctx.world_size / ctx.step.num_samples)
            detached = per_sample.detach()
            base = losses.detach() @ self.base_weights  # before any plugin reweights it
            by_domain = base.new_zeros(2, len(ctx.terrains)).index_add_(
                1, batch["terrain"], torch.stack([base, torch.ones_like(base)])
            )
            sums += torch.cat(
                [detached.sum().reshape(1), detached.new_full((1,), len(detached)),
                 losses.detach().sum(0), by_domain.flatten()]
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
                ctx.plugins.call("after_optimizer_step", model=model, ctx=ctx)
        self.optimizer.zero_grad(set_to_none=True)
        return sums

    def sample_weighted(self, per_sample: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``per_sample`` times the weights the ``per_sample_losses`` plugins return, each
        shown the same detached losses."""
        losses = per_sample.detach()
        for name, weights in self.ctx.plugins.call(
            "per_sample_losses", losses=losses, batch=batch, ctx=self.ctx
        ):
            if weights is not None:
                if weights.shape != per_sample.shape:
                    raise RuntimeError(
                        f"plugin {name!r}: per_sample_losses returned shape "
                        f"{tuple(weights.shape)}; expected {tuple(per_sample.shape)}"
                    )
                per_sample = per_sample * weights.float()
        return per_sample

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

    def measure_after_step(
        self, probes: list[list[Any]], curve: list[dict[str, Any]], last: bool
    ) -> None:
        """The probe set's loss every ``train.probe_every`` optimizer steps, and a validation
        point every ``train.validate_every_steps`` (but the epoch's ``last`` step: the epoch's
        own validation is that point). Neither changes the run (:func:`aside`)."""
        step, train = self.ctx.global_step, self.config.train
        if self.probe_batches and step % train.probe_every == 0:
            self.record_probe(probes)
        if train.validate_every_steps and step % train.validate_every_steps == 0 and not last:
            model = self.accelerator.unwrap_model(self.model)
            with evaluated(model, self.ctx), aside(model, self.ctx, self.config.run.seed):
                metrics = self.validate()
            curve.append(self.curve_point(metrics))

    def curve_point(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """A point of ``val_curve``: the optimizer step, ``val_loss`` and the task's report
        metrics (their overall values)."""
        keys = ("val_loss", *(metric.key for metric in self.ctx.task.report_metrics))
        return {"step": self.ctx.global_step, **{key: metrics.get(key) for key in keys}}

    @torch.no_grad()
    def record_probe(self, probes: list[list[Any]]) -> None:
        """Append ``[step, probe loss, a model spike?]``: the probe set's loss
        (:meth:`probe_window_losses`), before any plugin reweights it."""
        ctx, model = self.ctx, self.accelerator.unwrap_model(self.model)
        window_losses: list[float] = []
        with aside(model, ctx, self.config.data.split_seed):
            for probe_batch in self.probe_batches:
                batch = dict(probe_batch)
                ctx.plugins.call("route_batch", model=model, batch=batch, ctx=ctx)
                with self.accelerator.autocast():
                    window_losses += self.probe_window_losses(model, batch).float().tolist()
        value = probe_loss(window_losses)
        jump = probe_jumps([self.probe_last, value])[1]
        spike = jump is not None and jump > self.config.train.model_spike_jump
        probes.append([ctx.global_step, value, spike])
        self.probe_last = value

    def probe_window_losses(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """``[B]``: a plugin's ``probe_losses``, else the training forward's losses (a
        plugin's ``training_forward`` or the task's) at the ``[loss]`` base weights."""
        ctx = self.ctx
        losses = ctx.plugins.exclusive("probe_losses", model=model, batch=batch, ctx=ctx)
        if losses is not None:
            count = len(batch["idx"])
            if losses.shape != (count,) or not bool((losses > 0).all()):
                raise RuntimeError(
                    f"plugin {ctx.plugins.provider('probe_losses')!r}: probe_losses returned "
                    f"shape {tuple(losses.shape)} with minimum {losses.min().item():.3g}; "
                    f"expected ({count},) positive losses"
                )
            return losses
        losses = ctx.plugins.exclusive("training_forward", model=model, batch=batch, ctx=ctx)
        if losses is None:
            losses = ctx.task.forward_losses(model, batch)
        return losses.float() @ self.base_weights

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
            generator=loader_generator(self.config.run.seed, self.ctx.epoch),
        )
        batches = (to_device(batch, self.accelerator.device) for batch in loader)
        metrics = self.ctx.task.validate(model, route_batches(batches, model, self.ctx), self.ctx)
        model.train()
        return metrics

    # --- epoch end, checkpoints --------------------------------------------------------

    def end_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        """The validation's per-tile errors, the checkpoint (it carries the rows), then the
        metrics line, plots, loggers, hooks.

        In this order a kill at any moment leaves a run that resumes: ``metrics.jsonl``
        never gets ahead of the checkpoint, and resuming rewrites it from the checkpoint;
        the per-tile file is never behind it (a resumed epoch writes it again).
        """
        ctx, accelerator = self.ctx, self.accelerator
        tiles = row.pop(VAL_TILES, None)
        if tiles is not None and accelerator.is_main_process:  # never behind the checkpoint
            write_val_tiles(self.run_dir, epoch, tiles)
        row = json_safe(row)
        self.rows.append(row)
        every = self.config.train.checkpoint_every
        if epoch % every == 0 or epoch == self.config.run.epochs:
            self.save_checkpoint(epoch)
        if accelerator.is_main_process:
            with open(self.run_dir / METRICS, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            self.print_epoch(row)
            every = self.config.train.plot_every
            if epoch == self.config.run.epochs or (every and epoch % every == 0):
                self.write_plots()
        if self.config.train.tensorboard:
            scalars = {k: v for k, v in row.items() if isinstance(v, int | float)}
            accelerator.log(scalars, step=epoch)
        ctx.plugins.call("on_epoch_end", epoch=epoch, metrics=row, ctx=ctx)

    @torch.no_grad()
    def write_plots(self) -> None:
        """``loss_curves.png``, then the task's own plots of its example samples."""
        plot_loss_curves(self.rows, self.run_dir / LOSS_CURVES, self.ctx.task.components)
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        samples = (self.val_dataset[i] for i in self.ctx.task.plot_examples(self.val_dataset))
        examples = (to_device(default_collate([s]), self.accelerator.device) for s in samples)
        with evaluated(model, self.ctx):
            self.ctx.task.write_plots(
                self.run_dir, self.rows, model, route_batches(examples, model, self.ctx), self.ctx
            )
        model.train(was_training)

    def print_epoch(self, row: dict[str, Any]) -> None:
        print(
            f"epoch {row['epoch']}/{self.config.run.epochs}: {self.ctx.task.epoch_summary(row)} "
            f"batch-loss outliers {row['batch_loss_outliers']} model spikes "
            f"{row['model_spikes']} {row['seconds']:.1f} s",
            flush=True,
        )

    def process_state(self) -> dict[str, Any]:
        """What differs between processes: an interrupted epoch's progress (``partial``),
        the step losses behind the batch-loss outlier counts, the last probe loss and the
        random generators."""
        return {
            "partial": self.partial,
            "step_losses": self.step_losses,
            "probe_last": self.probe_last,
            "rng": rng_state(),
        }

    def save_checkpoint(self, completed_epoch: int) -> None:
        """The last checkpoint, with every process's own state, written atomically by the
        main process.

        ``partial`` in each process's state carries the loss sums and ``ctx.log`` values of an
        epoch interrupted by a signal, so a resumed run skips the finished steps and ends with
        the same metrics. Every process returns only once the file is written: a launcher
        stops the others as soon as one exits.
        """
        weights = trained_state(self.accelerator.unwrap_model(self.model))
        self.refuse_nonfinite(weights)  # on every process: they all hold the same weights
        processes = gather_object([self.process_state()])
        if self.accelerator.is_main_process:
            state = {
                "format": CHECKPOINT_FORMAT,
                "epoch": completed_epoch,
                "task": self.ctx.task.checkpoint_meta(self.ctx.train_dataset, self.val_dataset),
                "config": unstructure(self.config),  # what a resume holds config.toml to
                "data": self.data_identity,
                "processes": processes,
                "global_step": self.ctx.global_step,
                "model": weights,
                "optimizer": self.optimizer.state_dict(),
                "rows": self.rows,
                "nonfinite_total": self.nonfinite_total,
                "plugins": self.ctx.plugins.state_dict(),
            }
            save_tensors(self.run_dir / CHECKPOINT, state)
            model = self.accelerator.unwrap_model(self.model)
            with evaluated(model, self.ctx):
                self.ctx.task.export_model(model, self.ctx)
        self.accelerator.wait_for_everyone()

    def refuse_nonfinite(self, weights: dict[str, torch.Tensor]) -> None:
        """Stop before NaN or inf weights overwrite the last good checkpoint."""
        bad = nonfinite_tensors(weights)
        if bad:
            raise NonFiniteWeightsError(
                f"epoch {self.ctx.epoch}: {len(bad)} of {len(weights)} weight tensors hold NaN "
                f"or inf ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); they are "
                f"not saved, {self.run_dir / CHECKPOINT} keeps the last finite weights (if "
                "any). Lower optim.lr or enable optim.grad_clip"
            )

    def restore_checkpoint(self) -> tuple[int, dict[str, dict[str, Any]]]:
        """Restore everything :meth:`save_checkpoint` wrote (the checkpoint ``resume`` gave);
        returns the epoch to run next and the plugins' saved states (handed back after their
        ``setup``)."""
        path, state = self.run_dir / CHECKPOINT, self.resumed
        load_trained_state(self.accelerator.unwrap_model(self.model), state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.restore_process_state(path, state["processes"])
        self.rows = state["rows"]
        self.nonfinite_total = state["nonfinite_total"]
        self.ctx.global_step = state["global_step"]
        if self.accelerator.is_main_process:
            with open(self.run_dir / METRICS, "w") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in self.rows)
            (self.run_dir / INTERRUPTED).unlink(missing_ok=True)
        return state["epoch"] + 1, state["plugins"]

    def restore_process_state(self, path: Path, processes: list[dict[str, Any]]) -> None:
        """This process's own state; between epochs a run may resume with another number
        of processes (the extra ones start from the main process's state), within an
        interrupted epoch it may not, since each process's share of the epoch is fixed."""
        rank, world = self.accelerator.process_index, self.ctx.world_size
        if len(processes) != world and any(saved["partial"] for saved in processes):
            raise UsageError(
                f"{path} stopped within an epoch with {len(processes)} process(es); resume "
                f"it with {len(processes)} (accelerate launch --num_processes "
                f"{len(processes)}), not {world}"
            )
        own = processes[rank] if rank < len(processes) else processes[0]
        self.partial = own["partial"]
        self.step_losses = own["step_losses"]
        self.probe_last = own["probe_last"]
        restore_rng(own["rng"])

    def write_interrupted(self, signum: int, epoch: int, steps_done: int, steps: int) -> None:
        """Say in the run folder that the run stopped on a signal and how to continue: with
        several processes a launcher reports only a failure (torchrun exits 1)."""
        if not self.accelerator.is_main_process:
            return
        record = {
            "signal": signal.Signals(signum).name,
            "epoch": epoch,
            "steps_done": steps_done,
            "steps": steps,
            "resume": self.resume_command(),
        }
        (self.run_dir / INTERRUPTED).write_text(json.dumps(record, indent=2) + "\n")

    def resume_command(self) -> str:
        """The command that continues this run, with as many processes as it has."""
        world = self.ctx.world_size
        launch = (
            f"accelerate launch --multi_gpu --num_processes {world} -m"
            if world > 1
            else "python -m"
        )
        return f"{launch} core.run --resume {self.run_dir}"

    # --- signals, progress, end ----------------------------------------------------------

    def request_stop(self, signum: int, _frame: Any) -> None:
        """Signal handler: finish the current step, then checkpoint and stop."""
        self.stop_signal = signum

    def agreed_stop(self) -> int | None:
        """The signal every process stops on after this step: the highest any received.

        A signal may reach one process only, or each at its own moment (a launcher passing
        one on), so with several processes one MAX all-reduce of a single integer per step
        makes them all stop after the same step and save together. One process pays nothing.
        """
        if self.ctx.world_size == 1:
            return self.stop_signal
        flag = torch.tensor([self.stop_signal or 0], device=self.accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

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
            "batch_loss_outliers_total": sum(row["batch_loss_outliers"] for row in self.rows),
            "model_spikes_total": sum(row["model_spikes"] for row in self.rows),
            "nonfinite_steps": self.nonfinite_total,
            "skipped_tiles": [
                {"path": path, "reason": reason} for path, reason in self.ctx.task.skipped
            ],
        }
        (self.run_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
