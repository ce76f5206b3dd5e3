"""fp16 training: overflowing gradients are the GradScaler's to handle, not a reason to stop.

Accelerate creates its GradScaler only for fp16 on a GPU; on the CPU the trainer gets a
real ``torch.amp.GradScaler("cpu")`` in the same place before set-up, so the trainer's
loop runs exactly the code path it runs under ``train.mixed_precision="fp16"`` on a card.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from core.config import load_config
from core.hookspecs import hookimpl
from core.plugins import ActivePlugin, PluginManager
from core.train import NonFiniteLossError, Trainer
from tests.conftest import FAST

INITIAL_SCALE = 2.0**127
"""Large enough that the first steps' scaled gradients overflow float32."""


class ScaleLoss:
    """Multiplies every loss weight by ``factor`` (inf or NaN poison the loss itself)."""

    name = "scale_loss"

    def __init__(self, factor: float) -> None:
        self.factor = factor

    @hookimpl
    def loss_weights(self, weights: torch.Tensor, batch: dict, ctx: object) -> torch.Tensor:
        return weights * self.factor


def scaled_trainer(out: Path, procedural_dir: Path, factor: float) -> Trainer:
    config = load_config(
        None, [*FAST, f"data.dir='{procedural_dir}'", f"run.out='{out}'", "optim.grad_clip=0"]
    )
    probe = ScaleLoss(factor)
    trainer = Trainer(config, PluginManager([ActivePlugin(probe.name, "test", probe, None)]))
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=INITIAL_SCALE)
    trainer.setup()
    return trainer


def run_steps(trainer: Trainer, steps: int) -> None:
    batch = default_collate([trainer.ctx.train_dataset[i] for i in range(4)])
    for step in range(steps):
        trainer.optimizer_step([batch], progress=step / steps)


def test_overflow_at_the_initial_scale_backs_off_and_trains(
    tmp_path: Path, procedural_dir: Path
) -> None:
    trainer = scaled_trainer(tmp_path / "fp16", procedural_dir, 1e3)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    steps = 40
    run_steps(trainer, steps)
    scaler = trainer.accelerator.scaler
    skipped = steps - trainer.ctx.global_step
    # more overflowing steps than max_nonfinite_steps allows in a row, none counted
    assert skipped > trainer.config.train.max_nonfinite_steps
    assert trainer.nonfinite_total == 0
    assert scaler.get_scale() <= INITIAL_SCALE * 0.5**skipped
    assert trainer.ctx.global_step > 0  # once the scale fits, the steps are taken
    after = trainer.model.parameters()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, after, strict=True))


def test_a_nan_loss_still_stops_the_run_under_the_scaler(
    tmp_path: Path, procedural_dir: Path
) -> None:
    """The scaler cannot fix a loss that is NaN whatever the scale (bad data)."""
    trainer = scaled_trainer(tmp_path / "nan", procedural_dir, float("nan"))
    with pytest.raises(NonFiniteLossError):
        run_steps(trainer, trainer.config.train.max_nonfinite_steps)
