"""DEM super-resolution: RCAN-DEM on GeoTIFF tiles labelled with five terrain categories."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from torch import nn

from core.config import Config
from core.context import RunContext
from core.errors import ConfigError
from core.tasks import (
    VAL_TILES,
    Batch,
    HarnessSettings,
    PredictOptions,
    ReportMetric,
    TileMetric,
    metric_text,
)
from core.tasks.dem_sr.config import DemLossSection, RcanSection
from core.tasks.dem_sr.data.dataset import TileDataset, load_split
from core.tasks.dem_sr.data.procedural import write_procedural_tiles
from core.tasks.dem_sr.data.sources import ensure_source
from core.tasks.dem_sr.losses import COMPONENTS, dem_loss_components
from core.tasks.dem_sr.metrics import ValidationAccumulator, tile_medians, tile_records
from core.tasks.dem_sr.plots import plot_hillshade_triptych, plot_terrain_rmse
from core.tasks.dem_sr.rcan import build_rcan
from core.tasks.dem_sr.terrain import TERRAINS


def base_loss_weights(config: Config) -> torch.Tensor:
    """The ``[loss]`` section as a ``[C]`` tensor in ``COMPONENTS`` order."""
    return torch.tensor([getattr(config.loss, name) for name in COMPONENTS])


class DemSuperResolution:
    """RCAN-DEM trained with the seed's five loss components, validated in metres."""

    name = "dem_sr"
    components = COMPONENTS
    terrains = TERRAINS
    report_metrics = (
        ReportMetric(
            "val_rmse_m",
            "val RMSE (m)",
            by_domain=True,
            reference="val_rmse_m_bicubic",
            tiles=TileMetric("sq_err_m2", "pixels", root=True, reference="bicubic_rmse_m"),
        ),
        ReportMetric(
            "val_slope_rmse_deg",
            "val slope RMSE (°)",
            by_domain=True,
            tiles=TileMetric("slope_sq_err_deg2", "slope_pixels", root=True),
        ),
        ReportMetric("val_tile_median_rmse_m", "val per-tile median RMSE (m)", by_domain=True),
    )
    reference_name = "bicubic"
    sections = MappingProxyType({"model": RcanSection, "loss": DemLossSection})
    harness = HarnessSettings(
        overrides=("model.n_resgroups=1", "model.n_resblocks=1", "model.n_feats=8"),
        data=write_procedural_tiles,
    )
    """The smallest RCAN-DEM on 8 procedural tiles per terrain (48 x 48 at 30 m)."""

    def __init__(self) -> None:
        self.skipped: list[tuple[str, str]] = []
        self.bicubic: dict[str, Any] | None = None
        """Bicubic interpolation's scores: the validation tiles never change, so the first
        validation measures them once."""
        self.bicubic_tiles: dict[str, float] = {}
        """Bicubic's RMSE per validation tile, measured with ``bicubic``."""

    def build_datasets(self, config: Config, ctx: RunContext) -> tuple[TileDataset, TileDataset]:
        data = config.data
        with ctx.accelerator.main_process_first():
            quiet = not ctx.accelerator.is_main_process
            folder, data = (Path(data.dir), data) if data.dir else ensure_source(data, quiet=quiet)
            train, val = load_split(folder, data, data.split_seed, quiet=quiet)
        self.skipped = train.skipped
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
        """RMSE/MAE in metres and slope RMSE in degrees, per terrain, and the per-tile median
        RMSE; ``val_loss`` uses the base ``[loss]`` weights so runs with different weighting
        plugins stay comparable. ``val_rmse_m_bicubic`` is plain bicubic interpolation: the
        bar a model must clear. The per-tile errors of every process go under ``VAL_TILES``."""
        weights = base_loss_weights(ctx.config).to(ctx.device)
        model_errors = ValidationAccumulator(device=ctx.device)
        bicubic_errors = ValidationAccumulator(device=ctx.device) if self.bicubic is None else None
        records: list[dict[str, Any]] = []
        for batch in batches:
            with ctx.accelerator.autocast():
                pred = model(batch["lr"]).float()
            losses = dem_loss_components(pred, batch["hr"], batch["mask"])
            tile = [batch[key] for key in ("hr", "mask", "mean", "std", "terrain", "cell_size")]
            sums = model_errors.update(pred, *tile, loss=losses @ weights)
            if bicubic_errors is not None:
                scale = ctx.config.data.scale
                bicubic = F.interpolate(batch["lr"], scale_factor=scale, mode="bicubic")
                squared = bicubic_errors.update(bicubic, *tile)
                for name, sq, pixels in zip(
                    batch["tile_id"], squared["sq_err"], squared["pixels"], strict=True
                ):
                    self.bicubic_tiles[str(name)] = math.sqrt(sq / pixels) if pixels else math.nan
            bicubic_rmse = [self.bicubic_tiles[str(name)] for name in batch["tile_id"]]
            records += tile_records(batch, sums, bicubic_rmse, batch["region"])
        model_errors.reduce(lambda t: ctx.accelerator.reduce(t, "sum"))
        records = sorted(gather_object(records), key=lambda record: record["tile"])
        if bicubic_errors is not None:  # the validation tiles never change: measure it once
            bicubic_errors.reduce(lambda t: ctx.accelerator.reduce(t, "sum"))
            summary = bicubic_errors.summary()
            self.bicubic = {
                "val_rmse_m_bicubic": summary["val_rmse_m"],
                "val_rmse_m_bicubic_by_terrain": summary["val_rmse_m_by_terrain"],
            }
        return {
            **model_errors.summary(),
            **tile_medians(records),
            **self.bicubic,
            VAL_TILES: records,
        }

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

    def export_model(self, model: nn.Module, ctx: RunContext) -> None:
        """The checkpoint is what ``core.predict`` reads."""

    def checkpoint_meta(self, train: TileDataset, val: TileDataset) -> dict[str, Any]:
        """``core.predict`` sizes its windows like the training tiles."""
        return {"lr_shape": tuple(train[0]["lr"].shape[-2:])}

    def plot_examples(self, val: TileDataset) -> list[int]:
        """The first validation tile of each terrain."""
        terrains = val.terrains
        return [int(np.flatnonzero(terrains == t)[0]) for t in np.unique(terrains)]

    @torch.no_grad()
    def write_plots(
        self,
        run_dir: Path,
        rows: list[dict],
        model: nn.Module,
        examples: Iterable[Batch],
        ctx: RunContext,
    ) -> None:
        plot_terrain_rmse(rows[-1], run_dir / "terrain_rmse.png")
        plot_hillshade_triptych(self.hillshade_examples(model, examples), run_dir / "hillshade.png")

    def hillshade_examples(
        self, model: nn.Module, examples: Iterable[Batch]
    ) -> dict[str, tuple]:
        """Each one-tile batch in metres: (LR, prediction, HR, cell size), by terrain."""
        shown: dict[str, tuple] = {}
        for batch in examples:
            pred = model(batch["lr"]).float()[0, 0].cpu()
            mean, std = batch["mean"][0].item(), batch["std"][0].item()
            hr = (batch["hr"][0, 0].cpu() * std + mean).numpy()
            hr[~batch["mask"][0, 0].cpu().numpy()] = np.nan
            shown[TERRAINS[int(batch["terrain"][0])]] = (
                (batch["lr"][0, 0].cpu() * std + mean).numpy(),
                (pred * std + mean).numpy(),
                hr,
                tuple(batch["cell_size"][0].tolist()),
            )
        return shown

    def predict(self, run_dir: Path, src: Path, dst: Path, options: PredictOptions) -> None:
        from core.tasks.dem_sr.predict import predict

        predict(run_dir, src, dst, options)
