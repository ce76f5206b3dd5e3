"""Train with ``stratified`` under ``accelerate launch`` and record what each rank trained.

Each process writes ``OUT_DIR/rank<r>.json``: the plan its ``stratified`` computed for
every epoch and the batches (dataset indices) it trained on::

    accelerate launch --multi_gpu --num_processes 2 tests/distributed/stratified_shares.py \\
        DATA_DIR RUN_DIR OUT_DIR

``--multi_gpu`` makes Accelerate start one process per rank through torchrun (with
``--cpu`` it starts a single process unless MPI is set up); ``train.cpu`` keeps them on the
CPU, where they talk over gloo.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from core.config import load_config
from core.context import RunContext
from core.hookspecs import hookimpl
from core.plugins import ActivePlugin, PluginManager
from core.run import close_process_group, exit_process
from core.train import Trainer
from plugins.samplers.stratified import Stratified, StratifiedConfig


class RecordedStratified(Stratified):
    """``stratified`` itself, keeping a copy of each epoch's plan."""

    def __init__(self, config: StratifiedConfig) -> None:
        super().__init__(config)
        self.plans: dict[int, list[list[int]]] = {}

    @hookimpl
    def batch_plan(
        self, dataset: Any, indices: np.ndarray, epoch: int, ctx: RunContext
    ) -> list[np.ndarray]:
        plan = super().batch_plan(dataset, indices, epoch, ctx)
        self.plans[epoch] = [batch.tolist() for batch in plan]
        return plan


class TrainedBatches:
    """The dataset indices of every training batch this rank ran, per epoch."""

    name = "trained_batches"

    def __init__(self) -> None:
        self.batches: dict[int, list[list[int]]] = {}

    @hookimpl
    def route_batch(self, model: nn.Module, batch: dict[str, Any], ctx: RunContext) -> None:
        if model.training:
            self.batches.setdefault(ctx.epoch, []).append(batch["idx"].tolist())


def main(data_dir: str, run_dir: str, out: str) -> None:
    config = load_config(
        None,
        [
            "model.n_resgroups=1",
            "model.n_resblocks=1",
            "model.n_feats=8",
            "train.progress='never'",
            "train.cpu=true",
            "data.batch_size=5",
            "run.epochs=2",
            f"data.dir='{data_dir}'",
            f"run.out='{run_dir}'",
        ],
    )
    sampler = RecordedStratified(StratifiedConfig(epoch_length="smallest"))
    probe = TrainedBatches()
    plugins = PluginManager(
        [
            ActivePlugin("stratified", "test", sampler, sampler.config),
            ActivePlugin(probe.name, "test", probe, None),
        ]
    )
    trainer = Trainer(config, plugins)
    trainer.fit()
    record = {
        "world_size": trainer.accelerator.num_processes,
        "plans": sampler.plans,
        "trained": probe.batches,
    }
    (Path(out) / f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:4])
    close_process_group()
    exit_process(0)  # as core.run leaves: gloo may abort the interpreter's finalization
