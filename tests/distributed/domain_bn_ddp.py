"""domain_bn under two real processes, where one process's batches lack terrains.

Run under ``accelerate launch --multi_gpu --num_processes 2`` (``--cpu`` starts a single
process unless MPI is set up; ``Accelerator(cpu=True)`` and ``train.cpu`` keep both on gloo)
it writes ``OUT/rank<r>.json``:

1. for each ``sync`` mode, a small conv-BN-conv model, swapped by ``domain_bn`` and wrapped
   in DDP by Accelerate, runs :data:`STEPS`, where process 0 holds every terrain and process
   1 lacks ``desert`` and ``extreme``; each process records its outputs and synchronised
   gradients of the first step and the per-terrain running statistics at the end.
   :func:`reference` computes what they must be in one process;
2. real ``Trainer`` runs with ``model.norm=batch`` on ``--data`` and a batch plan whose
   batches for process 1 lack ``extreme``: ``domain_bn`` alone (``sync = "global"``), and
   ``domain_bn`` with ``pcgrad`` in both sync modes. All must finish with the same
   statistics on both processes.

    accelerate launch --multi_gpu --num_processes 2 tests/distributed/domain_bn_ddp.py \\
        --data DIR --out OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from core.config import load_config
from core.hookspecs import hookimpl
from core.plugins import ActivePlugin, PluginManager
from core.run import close_process_group, exit_process
from core.tasks.dem_sr.terrain import TERRAINS
from core.train import Trainer
from plugins.gradients.pcgrad import PCGrad
from plugins.norms.domain_bn import (
    SYNC_MODES,
    DomainBN,
    DomainBNConfig,
    TerrainBatchNorm2d,
    swap_batchnorms,
)

CHANNELS = 3
WORLD = 2
STEPS = [  # per step: each process's terrain labels; process 1 never has desert or extreme
    ([0, 1, 2, 3, 4, 4], [0, 0, 1, 2]),
    ([4, 3, 3, 1], [2, 1, 1, 0, 2]),
]


def build_model(sync: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, CHANNELS, 3, padding=1),
        nn.BatchNorm2d(CHANNELS),
        nn.ReLU(),
        nn.Conv2d(CHANNELS, 1, 3, padding=1),
    )
    swap_batchnorms(model, len(TERRAINS), sync=sync)
    return model


def step_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Process ``rank``'s inputs and labels at ``step``; scale and offset depend on terrain."""
    labels = torch.tensor(STEPS[step][rank])
    generator = torch.Generator().manual_seed(10 * step + rank)
    x = torch.randn(len(labels), 1, 6, 5, generator=generator)
    shift = labels.float()[:, None, None, None]
    return x * (1 + shift) + 2 * shift, labels


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [step_batch(step, rank) for rank in range(WORLD)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def layer_state(model: nn.Module) -> dict[str, Any]:
    layer = next(m for m in model.modules() if isinstance(m, TerrainBatchNorm2d))
    return {
        "running_mean": layer.running_mean.tolist(),
        "running_var": layer.running_var.tolist(),
        "num_batches_tracked": layer.num_batches_tracked.tolist(),
        "seen": layer.seen.tolist(),
    }


def run_steps(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], world: int):
    """Forward and backward each batch (loss: the global per-sample mean, times ``world``
    because DDP averages gradients); returns the first step's outputs and gradients."""
    first: dict[str, Any] = {}
    for step, (x, labels) in enumerate(batches):
        total = sum(len(per_rank) for per_rank in STEPS[step])
        for module in model.modules():
            if isinstance(module, TerrainBatchNorm2d):
                module.route(labels)
        out = model(x)
        (out.square().mean((1, 2, 3)).sum() * world / total).backward()
        if step == 0:
            first["out"] = out.detach()
            first["grads"] = [p.grad.clone().flatten() for p in model.parameters()]
        model.zero_grad()
    return first


def reference(sync: str) -> dict[str, Any]:
    """What each process must record, computed in one process.

    Running statistics: always those of one model fed the global batches. ``global``: the
    outputs and gradients of that model too. ``running``: each process's outputs are those of
    a model fed only its own batch, and the gradient is the mean of those models' gradients.
    """
    model = build_model(sync)
    first = run_steps(model, [global_batch(step) for step in range(len(STEPS))], world=1)
    expected = layer_state(model)
    if sync == "global":
        expected["out"] = first["out"].split([len(labels) for labels in STEPS[0]])
        expected["grads"] = first["grads"]
    else:
        local = [run_steps(build_model(sync), [step_batch(0, r)], WORLD) for r in range(WORLD)]
        expected["out"] = [part["out"] for part in local]
        expected["grads"] = [
            sum(grads) / WORLD for grads in zip(*(p["grads"] for p in local), strict=True)
        ]
    return expected


class LopsidedPlan:
    """Batches alternate between the processes; process 1's never hold ``extreme``."""

    name = "lopsided_plan"

    @hookimpl
    def batch_plan(self, dataset: Any, indices: np.ndarray, epoch: int, ctx: Any) -> list:
        rng = np.random.default_rng([ctx.config.run.seed, epoch])
        by_terrain = [
            rng.permutation(indices[dataset.terrains[indices] == t]) for t in range(len(TERRAINS))
        ]
        plan = []
        for k in range(4):
            terrains = [t for t in range(len(TERRAINS)) if k % 2 == 0 or TERRAINS[t] != "extreme"]
            plan.append([int(by_terrain[t][k % len(by_terrain[t])]) for t in terrains])
        return plan


def train(data: str, out: Path, sync: str, *others: Any) -> dict[str, Any]:
    """A real training run with ``domain_bn`` and :class:`LopsidedPlan`; its layer state."""
    config = load_config(
        None,
        [
            "model.n_resgroups=1", "model.n_resblocks=2", "model.n_feats=8",
            "model.norm='batch'", "train.progress='never'", "train.cpu=true", "run.epochs=1",
            f"data.dir='{data}'", f"run.out='{out}'",
        ],
    )  # fmt: skip
    plugins = [DomainBN(DomainBNConfig(sync=sync)), *others, LopsidedPlan()]
    active = [ActivePlugin(p.name, "test", p, getattr(p, "config", None)) for p in plugins]
    trainer = Trainer(config, PluginManager(active))
    rows = trainer.fit()
    return {
        "world_size": trainer.accelerator.num_processes,
        "losses": [row[key] for row in rows for key in ("train_loss", "val_loss")],
        "missing": [row["batches_missing_a_terrain"] for row in rows],
        **layer_state(trainer.accelerator.unwrap_model(trainer.model)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    result: dict[str, Any] = {}
    for sync in SYNC_MODES:
        model = accelerator.prepare(build_model(sync))
        first = run_steps(model, [step_batch(s, rank) for s in range(len(STEPS))], WORLD)
        result[sync] = {
            "out": first["out"].tolist(),
            "grads": [g.tolist() for g in first["grads"]],
            **layer_state(accelerator.unwrap_model(model)),
        }
    result["train_global"] = train(args.data, args.out / "global", "global")
    pcgrad = PCGrad(PCGrad.Config())
    result["train_running_pcgrad"] = train(args.data, args.out / "running", "running", pcgrad)
    result["train_global_pcgrad"] = train(args.data, args.out / "global_pcgrad", "global", pcgrad)
    (args.out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
    close_process_group()
    exit_process(0)  # as core.run leaves: gloo may abort the interpreter's finalization
