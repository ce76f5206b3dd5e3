"""DEM super-resolution: RCAN-DEM on GeoTIFF tiles labelled with five terrain categories."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.config import Config
from core.context import RunContext
from core.data.dataset import TileDataset, load_split
from core.data.sources import ensure_source_tiles
from core.errors import ConfigError
from core.losses import COMPONENTS, dem_loss_components
from core.metrics import ValidationAccumulator
from core.models.rcan import build_rcan
from core.plots import plot_hillshade_triptych, plot_loss_curves, plot_terrain_rmse
from core.tasks import ReportMetric, metric_text
from core.terrain import TERRAINS

Batch = dict[str, Any]


def base_loss_weights(config: Config) -> torch.Tensor:
    """The ``[loss]`` section as a ``[C]`` tensor in ``COMPONENTS`` order."""
    return torch.tensor([getattr(config.loss, name) for name in COMPONENTS])


class DemSuperResolution:
    """RCAN-DEM trained with the seed's five loss components, validated in metres."""

    name = "dem_sr"
    components = COMPONENTS
    terrains = TERRAINS
    report_metrics = (
        ReportMetric("val_rmse_m", "val RMSE (m)", by_domain=True, reference="val_rmse_m_bicubic"),
        ReportMetric("val_slope_rmse_deg", "val slope RMSE (°)", by_domain=True),
    )
    reference_name = "bicubic"

    def build_datasets(self, config: Config, ctx: RunContext) -> tuple[TileDataset, TileDataset]:
        data = config.data
        with ctx.accelerator.main_process_first():
            folder = (
                Path(data.dir)
                if data.dir
                else ensure_source_tiles(
                    data.source,
                    tile_size=data.tile_size or 48,
                    quiet=not ctx.accelerator.is_main_process,
                )
            )
            train, val = load_split(folder, data, data.split_seed)
        self.skipped = train.skipped
        self.train_dataset, self.val_dataset = train, val
        self.bicubic: dict[str, Any] | None = None
        return train, val

    def build_model(self, config: Config) -> nn.Module:
        overrides = {
            key: value
            for key in ("n_resgroups", "n_resblocks", "n_feats")
            if (value := getattr(config.model, key))
        }
        model = config.model
        try:
            return build_rcan(model.preset, config.data.scale, model.norm, **overrides)
        except ValueError as error:
            raise ConfigError(f"[model] / data.scale: {error}") from None

    def forward_losses(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return dem_loss_components(model(batch["lr"]), batch["hr"], batch["mask"])

    @torch.no_grad()
    def validate(self, model: nn.Module, batches: Iterable[Batch], ctx: RunContext) -> dict:
        """RMSE/MAE in metres and slope RMSE in degrees, per terrain; ``val_loss`` uses the
        base ``[loss]`` weights so runs with different weighting plugins stay comparable.
        ``val_rmse_m_bicubic`` is plain bicubic interpolation: the bar a model must clear."""
        weights = base_loss_weights(ctx.config).to(ctx.device)
        model_errors = ValidationAccumulator(device=ctx.device)
        bicubic_errors = ValidationAccumulator(device=ctx.device) if self.bicubic is None else None
        for batch in batches:
            ctx.plugins.call("route_batch", model=model, batch=batch, ctx=ctx)
            with ctx.accelerator.autocast():
                pred = model(batch["lr"]).float()
            losses = dem_loss_components(pred, batch["hr"], batch["mask"])
            tile = [batch[key] for key in ("hr", "mask", "mean", "std", "terrain", "cell_size")]
            model_errors.update(pred, *tile, loss=losses @ weights)
            if bicubic_errors is not None:
                scale = ctx.config.data.scale
                bicubic = F.interpolate(batch["lr"], scale_factor=scale, mode="bicubic")
                bicubic_errors.update(bicubic, *tile)
        model_errors.reduce(lambda t: ctx.accelerator.reduce(t, "sum"))
        if bicubic_errors is not None:  # the validation tiles never change: measure it once
            bicubic_errors.reduce(lambda t: ctx.accelerator.reduce(t, "sum"))
            summary = bicubic_errors.summary()
            self.bicubic = {
                "val_rmse_m_bicubic": summary["val_rmse_m"],
                "val_rmse_m_bicubic_by_terrain": summary["val_rmse_m_by_terrain"],
            }
        return {**model_errors.summary(), **self.bicubic}

    def epoch_summary(self, row: dict[str, Any]) -> str:
        by_terrain = " ".join(
            f"{t} {metric_text(v, '.2f')}" for t, v in row["val_rmse_m_by_terrain"].items()
        )
        return (
            f"train_loss {metric_text(row['train_loss'], '.4f')} "
            f"val_loss {metric_text(row['val_loss'], '.4f')} "
            f"val_rmse {metric_text(row['val_rmse_m'], '.2f')} m "
            f"(bicubic {metric_text(row.get('val_rmse_m_bicubic'), '.2f')} m; {by_terrain})"
        )

    def export_model(self, run_dir: Path, model: nn.Module) -> None:
        """The checkpoint is what ``core.predict`` reads."""

    def checkpoint_meta(self) -> dict[str, Any]:
        """``core.predict`` sizes its windows like the training tiles."""
        return {"lr_shape": tuple(self.train_dataset[0]["lr"].shape[-2:])}

    @torch.no_grad()
    def write_plots(
        self, run_dir: Path, rows: list[dict], model: nn.Module, ctx: RunContext
    ) -> None:
        plot_loss_curves(rows, run_dir / "loss_curves.png")
        plot_terrain_rmse(rows[-1], run_dir / "terrain_rmse.png")
        plot_hillshade_triptych(self._examples(model, ctx), run_dir / "hillshade.png")

    def _examples(self, model: nn.Module, ctx: RunContext) -> dict[str, tuple]:
        """The first validation tile of each terrain, in metres: (LR, prediction, HR, cell)."""
        examples: dict[str, tuple] = {}
        was_training = model.training
        model.eval()
        for terrain_id in np.unique(self.val_dataset.terrains):
            position = int(np.flatnonzero(self.val_dataset.terrains == terrain_id)[0])
            sample = self.val_dataset[position]
            batch = {
                key: value.unsqueeze(0).to(ctx.device) if torch.is_tensor(value) else [value]
                for key, value in sample.items()
            }
            ctx.plugins.call("route_batch", model=model, batch=batch, ctx=ctx)
            pred = model(batch["lr"]).float()[0, 0]
            mean, std = sample["mean"].item(), sample["std"].item()
            hr = (sample["hr"][0] * std + mean).numpy()
            hr[~sample["mask"][0].numpy()] = np.nan
            examples[TERRAINS[terrain_id]] = (
                (sample["lr"][0] * std + mean).numpy(),
                (pred.cpu() * std + mean).numpy(),
                hr,
                tuple(sample["cell_size"].tolist()),
            )
        model.train(was_training)
        return examples
