"""The :class:`terraplug.Task` the trainer calls: data, model, losses, validation, plots.

A task decides *what* is trained; strategy plugins (samplers, loss weighting, gradient
handling) decide *how*, and work on any task that keeps the contract: per-sample losses
``[B, len(components)]`` from ``forward_losses``, and a ``terrain`` domain label on every
sample. This one has a single domain, ``tile``. Its data is a folder of GeoTIFF DEMs, or
without one the built-in DEM tiles of ``data.source`` (``terraplug.data``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from terraplug import (
    Batch,
    Config,
    PredictOptions,
    ReportMetric,
    RunContext,
    UsageError,
    metric_text,
)
from terraplug.data import ensure_source_tiles, train_val_split
from terraplug_example_task.config import DenoiseLossSection, DenoiseModelSection, DenoiseSection
from terraplug_example_task.data import NoisyDemDataset, load_tiles
from terraplug_example_task.model import NoiseCNN, denoise
from terraplug_example_task.plots import plot_denoised

COMPONENTS = ("l1", "gradient")
"""The loss components, in the order of ``forward_losses``' columns; each is weighted by
the ``[loss]`` key of its name."""


def loss_components(denoised: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Per-sample L1 and slope (finite-difference) errors, ``[B, 2]``, in normalised units."""
    cells = (1, 2, 3)
    l1 = (denoised - clean).abs().mean(dim=cells)
    along_rows = (denoised.diff(dim=2) - clean.diff(dim=2)).abs().mean(dim=cells)
    along_cols = (denoised.diff(dim=3) - clean.diff(dim=3)).abs().mean(dim=cells)
    return torch.stack([l1, (along_rows + along_cols) / 2], dim=1)


class DemDenoising:
    """Learn to remove Gaussian noise of ``denoise.noise_m`` metres from DEM tiles."""

    name = "dem_denoise"
    sections = MappingProxyType(
        {"model": DenoiseModelSection, "loss": DenoiseLossSection, "denoise": DenoiseSection}
    )
    """``[model]`` and ``[loss]``, which every task has, and the task's own ``[denoise]``."""
    components = COMPONENTS
    terrains = ("tile",)
    report_metrics = (ReportMetric("val_rmse_m", "val RMSE (m)", reference="val_rmse_m_noisy"),)
    reference_name = "noisy input"

    def __init__(self) -> None:
        self.skipped: list[tuple[str, str]] = []

    # --- data and model ----------------------------------------------------------------

    def build_datasets(
        self, config: Config, ctx: RunContext
    ) -> tuple[NoisyDemDataset, NoisyDemDataset]:
        """Every tile of ``data.dir`` with its seeded noise, split by ``data.val_fraction``
        and ``data.split_seed`` like the built-in tasks. Without ``data.dir``, the tiles of
        the built-in DEM source ``data.source``, cut on first use by the main process while
        the others wait; they come in ``train/`` and ``val/``, a spatially separate block
        that validates as it is."""
        data = config.data
        if data.dir:
            folder = Path(data.dir)
        else:
            with ctx.accelerator.main_process_first():
                folder = ensure_source_tiles(
                    data.source,
                    tile_size=data.tile_size or 48,
                    quiet=not ctx.accelerator.is_main_process,
                )
        noise_m = config.task_sections["denoise"].noise_m
        tiles, self.skipped = load_tiles(folder, noise_m, data.split_seed, data.strict)
        dataset = NoisyDemDataset(tiles, np.arange(len(tiles.paths)))
        if (folder / "train").is_dir() and (folder / "val").is_dir():
            held_out = np.array([path.is_relative_to(folder / "val") for path in tiles.paths])
            train = dataset.subset(np.flatnonzero(~held_out))
            val = dataset.subset(np.flatnonzero(held_out))
        else:
            train, val = train_val_split(dataset, data.val_fraction, data.split_seed)
        if len(val) == 0 or len(train) == 0:
            raise UsageError(f"{folder}: {len(dataset)} usable tile(s), none to train or validate")
        return train, val

    def build_model(self, config: Config) -> nn.Module:
        return NoiseCNN(config.model.channels, config.model.depth)

    # --- training and validation -------------------------------------------------------

    def forward_losses(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return loss_components(denoise(model, batch["noisy"]), batch["clean"])

    @torch.no_grad()
    def validate(self, model: nn.Module, batches: Iterable[Batch], ctx: RunContext) -> dict:
        """``val_loss`` with the base ``[loss]`` weights (comparable between runs whatever
        weighting plugin trained them), and the RMSE in metres of the denoised tiles and,
        as the bar to clear, of the noisy input.

        Sums are reduced over all processes; one without batches still joins the reduction
        with zeros, or the others would wait for it forever.
        """
        loss = ctx.config.loss
        weights = torch.tensor([getattr(loss, c) for c in COMPONENTS], device=ctx.device)
        # loss sum, samples, squared error sums (denoised, noisy) in m², cells
        sums = torch.zeros(5, dtype=torch.float64, device=ctx.device)
        for batch in batches:
            with ctx.accelerator.autocast():
                denoised = denoise(model, batch["noisy"]).float()
            clean, noisy = batch["clean"], batch["noisy"]
            scale = batch["scale"].view(-1, 1, 1, 1)  # normalised units -> metres
            sums += torch.stack([
                (loss_components(denoised, clean) @ weights).sum(),
                torch.tensor(float(len(clean)), device=ctx.device),
                (((denoised - clean) * scale) ** 2).sum(),
                (((noisy - clean) * scale) ** 2).sum(),
                torch.tensor(float(clean.numel()), device=ctx.device),
            ]).double()  # fmt: skip
        sums = ctx.accelerator.reduce(sums, "sum")
        loss_sum, samples, denoised_sq, noisy_sq, cells = sums.tolist()
        return {
            "val_loss": loss_sum / samples if samples else math.nan,
            "val_rmse_m": math.sqrt(denoised_sq / cells) if cells else math.nan,
            "val_rmse_m_noisy": math.sqrt(noisy_sq / cells) if cells else math.nan,
        }

    def epoch_summary(self, row: dict[str, Any]) -> str:
        return (
            f"train_loss {metric_text(row['train_loss'], '.4f')} "
            f"val_loss {metric_text(row['val_loss'], '.4f')} "
            f"val_rmse {metric_text(row['val_rmse_m'], '.2f')} m "
            f"(noisy input {metric_text(row['val_rmse_m_noisy'], '.2f')} m)"
        )

    # --- checkpoints, plots, tools -----------------------------------------------------

    def checkpoint_meta(self, train: NoisyDemDataset, val: NoisyDemDataset) -> dict[str, Any]:
        """Nothing: the config rebuilds the model, and there is no predict tool to inform."""
        return {}

    def export_model(self, model: nn.Module, ctx: RunContext) -> None:
        """The checkpoint is the model; a task that ships e.g. TorchScript writes it here."""

    def plot_examples(self, val: NoisyDemDataset) -> list[int]:
        """The first three validation tiles (fewer if there are fewer)."""
        return list(range(min(3, len(val))))

    @torch.no_grad()
    def write_plots(
        self,
        run_dir: Path,
        rows: list[dict],
        model: nn.Module,
        examples: Iterable[Batch],
        ctx: RunContext,
    ) -> None:
        """``denoised.png``: noisy, denoised and clean tile in metres, one row per example."""
        shown = []
        for batch in examples:
            mean, scale = batch["mean"][0].item(), batch["scale"][0].item()
            tiles = (batch["noisy"], denoise(model, batch["noisy"]).float(), batch["clean"])
            shown.append(tuple((t[0, 0].cpu().numpy() * scale + mean) for t in tiles))
        plot_denoised(shown, run_dir / "denoised.png")

    def predict(self, run_dir: Path, src: Path, dst: Path, options: PredictOptions) -> None:
        raise UsageError("dem_denoise has no predict tool")
