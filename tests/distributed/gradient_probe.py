"""What the optimizer receives at every step, and the naive computations to check it against.

Imported by the gradient-plugin tests; run as a script (under ``accelerate launch``) it
trains in float64 with the named plugins plus :class:`GradientProbe` and saves each
process's records to ``OUT/probe_rank<r>.pt``::

    accelerate launch --multi_gpu --num_processes 2 tests/distributed/gradient_probe.py \\
        --plugins pcgrad --data DIR --out OUT --set optim.accumulation_steps=2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist
import two_processes
from torch import nn

from core.config import Config, load_config
from core.context import RunContext
from core.hookspecs import hookimpl
from core.plugins import ActivePlugin, PluginManager
from core.run import close_process_group, exit_process
from core.tasks import get_task
from core.train import Trainer

SMALL_MODEL = [
    "model.n_resgroups=1",
    "model.n_resblocks=1",
    "model.n_feats=8",
    "train.progress='never'",
]
"""The small RCAN-DEM the gradient tests train (a few thousand parameters)."""

RECORDED_KEYS = ("lr", "hr", "mask", "terrain", "idx")


@attrs.define
class StepRecord:
    """One optimizer step as one process saw it (tensors float64 on the CPU)."""

    global_step: int
    weights: list[torch.Tensor]
    """The parameters the step's gradient was computed at."""
    grads: list[torch.Tensor]
    """The gradients about to be clipped and applied (synchronised across processes)."""
    batches: list[dict[str, torch.Tensor]]
    """This process's micro-batches of the step, with the ``[B, C]`` loss ``weights`` used."""


class GradientProbe:
    """Records every optimizer step: its weights, micro-batches, loss weights and final
    gradients. List it last, so it sees the batches and loss weights the trainer uses."""

    name = "gradient_probe"

    def __init__(self) -> None:
        self.config: Config | None = None
        self.steps: list[StepRecord] = []
        self.pending: list[dict[str, torch.Tensor]] = []

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        self.config = ctx.config

    @hookimpl
    def route_batch(self, model: nn.Module, batch: dict[str, Any], ctx: RunContext) -> None:
        if model.training:
            self.pending.append({key: batch[key].detach().cpu() for key in RECORDED_KEYS})

    @hookimpl
    def loss_weights(
        self, weights: torch.Tensor, batch: dict[str, Any], ctx: RunContext
    ) -> torch.Tensor | None:
        self.pending[-1]["weights"] = weights.detach().cpu()
        return None

    @hookimpl
    def transform_gradients(self, model: nn.Module, ctx: RunContext) -> None:
        params = list(model.parameters())
        self.steps.append(
            StepRecord(
                global_step=ctx.global_step,
                weights=[copy64(p) for p in params],
                grads=[copy64(p.grad) for p in params],
                batches=self.pending,
            )
        )
        self.pending = []


class Float64Training:
    """Makes the real trainer compute in float64: the model once, each batch's inputs.

    The ``gradient`` loss component is ill-conditioned in float32 (square roots of
    near-zero Sobel magnitudes): on these tiles a float32 step's gradient differed from a
    float64 recomputation by up to 1.5e-4 of its largest element (from a float32 one by
    2e-6), more than the 1e-5 the gradient plugins are held to. List it before the probe.
    """

    name = "float64"

    @hookimpl
    def configure_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        return model.double()

    @hookimpl
    def route_batch(self, model: nn.Module, batch: dict[str, Any], ctx: RunContext) -> None:
        for key in ("lr", "hr") if model.training else ("lr",):
            batch[key] = batch[key].double()


class _CollectiveInBackward(torch.autograd.Function):
    """Identity whose backward runs a (no-op) all-reduce, as SyncBatchNorm's does."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(torch.zeros(1, device=grad.device))
        BackwardCollective.calls += 1
        return grad


class BackwardCollective:
    """Puts a collective into every backward pass through the model's output: processes
    that ran different numbers of backward passes would then fail or hang."""

    name = "backward_collective"
    calls = 0

    @hookimpl
    def configure_model(self, model: nn.Module, ctx: RunContext) -> None:
        model.register_forward_hook(
            lambda module, inputs, output: (
                _CollectiveInBackward.apply(output) if module.training else output
            )
        )


def copy64(tensor: torch.Tensor) -> torch.Tensor:
    """A float64 CPU copy that never aliases ``tensor`` (which the optimizer updates in place)."""
    return tensor.detach().to("cpu", torch.float64, copy=True)


def reference_model(config: Config, weights: list[torch.Tensor]) -> nn.Module:
    """A fresh float64 model of ``config``'s task at ``weights``."""
    model = get_task(config.run.task).build_model(config).double()
    with torch.no_grad():
        for param, value in zip(model.parameters(), weights, strict=True):
            param.copy_(value)
    return model


def per_sample_losses(model: nn.Module, batch: dict[str, torch.Tensor], config: Config) -> Any:
    """The trainer's per-sample loss with the loss weights it used, in float64."""
    double = {**batch, "lr": batch["lr"].double(), "hr": batch["hr"].double()}
    losses = get_task(config.run.task).forward_losses(model, double)
    return (losses * batch["weights"].double()).sum(1)


def flat_gradient(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def naive_terrain_gradients(
    config: Config, weights: list[torch.Tensor], batches: list[dict[str, torch.Tensor]]
) -> dict[int, torch.Tensor]:
    """Each terrain's mean-loss gradient over all ``batches``: one separate backward per
    terrain, in float64, by terrain index."""
    model = reference_model(config, weights)
    terrains = torch.cat([batch["terrain"] for batch in batches])
    gradients = {}
    for terrain in terrains.unique().tolist():
        model.zero_grad(set_to_none=True)
        total = sum(
            per_sample_losses(model, batch, config)[batch["terrain"] == terrain].sum()
            for batch in batches
        )
        (total / (terrains == terrain).sum()).backward()
        gradients[terrain] = flat_gradient(model)
    return gradients


def naive_mean_gradient(
    config: Config, weights: list[torch.Tensor], batches: list[dict[str, torch.Tensor]]
) -> torch.Tensor:
    """The plain sample-mean gradient over all ``batches``, in float64."""
    model = reference_model(config, weights)
    total = sum(per_sample_losses(model, batch, config).sum() for batch in batches)
    (total / sum(len(batch["terrain"]) for batch in batches)).backward()
    return flat_gradient(model)


def assert_same_gradient(actual: list[torch.Tensor], expected: torch.Tensor, rtol: float) -> None:
    """``actual`` matches ``expected`` to ``rtol`` relative, per element; elements far below
    the gradient's largest are judged against that one (summation order still differs)."""
    flat = torch.cat([g.reshape(-1) for g in actual])
    torch.testing.assert_close(flat, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def load_records(out: Path, world_size: int) -> tuple[Config, list[list[StepRecord]], list]:
    """The config, every process's step records and backward collective counts, as written
    by :func:`main`."""
    saved = [
        torch.load(out / f"probe_rank{rank}.pt", weights_only=False) for rank in range(world_size)
    ]
    assert all(entry["world_size"] == world_size for entry in saved)
    steps = [[StepRecord(**step) for step in entry["steps"]] for entry in saved]
    return saved[0]["config"], steps, [entry["backward_collectives"] for entry in saved]


def launch(
    plugins: str, data: Path, out: Path, *overrides: str, backward_collective: bool = False
) -> subprocess.CompletedProcess:
    """Run :func:`main` under two real processes (see ``two_processes.launch``)."""
    command = [*two_processes.launch(), __file__, "--plugins", plugins]
    command += ["--data", str(data), "--out", str(out)]
    for assignment in overrides:
        command += ["--set", assignment]
    if backward_collective:
        command.append("--backward-collective")
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugins", required=True)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--backward-collective", action="store_true")
    args = parser.parse_args(argv)
    config = load_config(
        None, [*SMALL_MODEL, *args.set, f"data.dir='{args.data}'", f"run.out='{args.out}'"]
    )
    plugins = PluginManager.from_names(args.plugins.split(","), config.plugins)
    probe = GradientProbe()
    probes = [Float64Training(), probe]
    if args.backward_collective:
        probes.insert(0, BackwardCollective())
    active = [*plugins.active, *(ActivePlugin(obj.name, "test", obj, None) for obj in probes)]
    trainer = Trainer(config, PluginManager(active))
    trainer.fit()
    rank = trainer.accelerator.process_index
    steps = [attrs.asdict(step, recurse=False) for step in probe.steps]  # no __main__ classes
    saved = {
        "config": config,
        "steps": steps,
        "world_size": trainer.ctx.world_size,
        "backward_collectives": BackwardCollective.calls,
    }
    torch.save(saved, args.out / f"probe_rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
    close_process_group()
    exit_process(0)  # as core.run leaves: gloo may abort the interpreter's finalization
