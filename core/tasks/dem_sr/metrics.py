"""dem_sr's validation metrics in physical units (metres, degrees), overall and per terrain.

Losses are computed on normalised values (``data.normalisation``: per tile by default), which
can hide how wrong a model is on a
2000 m-relief Himalayan tile compared with a Hungarian plain; these metrics undo the
normalisation first, as DESIGN.md §5 asks: elevation RMSE and MAE in metres and slope RMSE in
degrees (Horn's method with each tile's true cell size).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from core.tasks.dem_sr.terrain import TERRAINS

ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)
CellSize = torch.Tensor | np.ndarray | Sequence[float]
"""(dy, dx) in metres: one pair, or one pair per sample ([B, 2])."""

# Horn (1981) weights for dz/dx (columns, east) and dz/dy (rows); each sums |w| = 8.
_HORN_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
_HORN_Y = _HORN_X.T.contiguous()


def horn_slope_deg(dem_m: ArrayT, cell_size: CellSize) -> ArrayT:
    """Slope in degrees by Horn's (1981) 3x3 method, interior only: [B,1,H,W] -> [B,1,H-2,W-2].

    ``cell_size`` is ``(dy, dx)`` in metres, either one pair for all samples or ``[B, 2]``, so
    east-west spacing can shrink with latitude per tile. The one-pixel border, where the
    window is incomplete, is dropped rather than padded so no invented slope enters a metric.
    Returns the input's type (numpy in, numpy out) and float dtype (float64 for numpy).
    """
    is_numpy = isinstance(dem_m, np.ndarray)
    dem = torch.from_numpy(np.asarray(dem_m, dtype=np.float64)) if is_numpy else dem_m
    if not dem.is_floating_point():
        dem = dem.double()
    cells = torch.as_tensor(cell_size, dtype=dem.dtype, device=dem.device).reshape(-1, 2)
    kernels = torch.stack([_HORN_Y, _HORN_X])[:, None].to(dem)
    grads = F.conv2d(dem, kernels) / (8.0 * cells[:, :, None, None])
    slope = torch.rad2deg(torch.atan(grads.square().sum(1, keepdim=True).sqrt()))
    return slope.numpy() if is_numpy else slope


def _full_window(mask: torch.Tensor) -> torch.Tensor:
    """Interior positions whose whole 3x3 window is valid, aligned with ``horn_slope_deg``."""
    return -F.max_pool2d(-mask.float(), 3, stride=1) > 0.5


TILE_COLUMNS = {
    "sq_err": "sq_err_m2",
    "pixels": "pixels",
    "slope_sq_err": "slope_sq_err_deg2",
    "slope_pixels": "slope_pixels",
    "loss": "loss",
}
"""The per-tile sums of ``val_tiles.csv.gz`` (``ValidationAccumulator.update``'s names ->
the file's columns): any of the metrics follows from them over any set of tiles."""


def tile_records(
    batch: dict[str, Any],
    sums: dict[str, list[float]],
    bicubic_rmse: Sequence[float],
    regions: Sequence[str],
) -> list[dict[str, Any]]:
    """One ``val_tiles.csv.gz`` row per sample of ``batch``: its tile, terrain and region,
    RMSE in metres, bicubic's and the summed errors."""
    return [
        {
            "tile": str(tile),
            "terrain": TERRAINS[int(terrain)],
            "region": region,
            "rmse_m": math.sqrt(sq / pixels) if pixels else math.nan,
            "bicubic_rmse_m": bicubic,
            **{column: sums[name][i] for name, column in TILE_COLUMNS.items()},
        }
        for i, (tile, terrain, region, sq, pixels, bicubic) in enumerate(
            zip(batch["tile_id"], batch["terrain"].tolist(), regions, sums["sq_err"],
                sums["pixels"], bicubic_rmse, strict=True)
        )
    ]  # fmt: skip


def tile_medians(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The median over tiles of each tile's RMSE, overall and per terrain: beside the
    pixel-pooled RMSE, which a few rough tiles can carry alone."""
    finite = [r for r in records if math.isfinite(r["rmse_m"])]
    by_terrain = {
        name: float(np.median([r["rmse_m"] for r in finite if r["terrain"] == name]))
        for name in TERRAINS
        if any(r["terrain"] == name for r in finite)
    }
    overall = float(np.median([r["rmse_m"] for r in finite])) if finite else math.nan
    return {"val_tile_median_rmse_m": overall, "val_tile_median_rmse_m_by_terrain": by_terrain}


class ValidationAccumulator:
    """Sums validation errors per terrain in float64, reducible across processes.

    Call ``update`` per batch, ``reduce`` once after the last batch (every process must call
    it: it is a collective), then ``summary``. Sums live on ``device``: pass the accelerator's
    device so the cross-process sum runs where the backend expects its tensors (NCCL: CUDA).
    """

    _STATS = ("sq_err", "abs_err", "pixels", "slope_sq_err", "slope_pixels", "loss", "samples")

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.sums = torch.zeros(len(self._STATS), len(TERRAINS), dtype=torch.float64, device=device)

    def update(
        self,
        pred_norm: torch.Tensor,
        hr_norm: torch.Tensor,
        mask: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        terrain: torch.Tensor,
        cell_size: torch.Tensor,
        loss: torch.Tensor | None = None,
    ) -> dict[str, list[float]]:
        """Add one batch; ``loss`` (optional, ``[B]``) is each sample's scalar validation loss.
        Returns the batch's per-sample sums (``tile_sums``): the per-tile errors.

        Predictions and truth are taken back to metres with the tile's ``mean`` and ``std``
        before any error is measured; slope errors count only where the whole 3x3 window is
        valid in ``mask``, so nodata never leaks into a slope.
        """
        scale = std.detach().double()[:, None, None, None]
        offset = mean.detach().double()[:, None, None, None]
        pred_m = pred_norm.detach().double() * scale + offset
        hr_m = hr_norm.detach().double() * scale + offset
        valid = mask.bool() & torch.isfinite(hr_m)
        err = torch.where(valid, pred_m - hr_m, torch.zeros_like(hr_m))

        filled_pred = torch.where(valid, pred_m, torch.zeros_like(pred_m))
        filled_hr = torch.where(valid, hr_m, torch.zeros_like(hr_m))
        cells = cell_size.detach().double()
        slope_err = horn_slope_deg(filled_pred, cells) - horn_slope_deg(filled_hr, cells)
        window = _full_window(valid)
        slope_err = torch.where(window, slope_err, torch.zeros_like(slope_err))

        per_sample = [
            err.square().sum((1, 2, 3)),
            err.abs().sum((1, 2, 3)),
            valid.sum((1, 2, 3)).double(),
            slope_err.square().sum((1, 2, 3)),
            window.sum((1, 2, 3)).double(),
        ]
        ones = torch.ones_like(per_sample[0])
        if loss is None:
            per_sample += [torch.zeros_like(ones), torch.zeros_like(ones)]
        else:
            per_sample += [loss.detach().double().reshape(-1), ones]
        stats = torch.stack(per_sample).to(self.sums.device)
        self.sums.index_add_(1, terrain.to(self.sums.device, torch.long), stats)
        return dict(zip(self._STATS, stats.cpu().tolist(), strict=True))

    def reduce(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the local sums by ``reduce_fn(sums)``, e.g. a cross-process sum."""
        self.sums = reduce_fn(self.sums).to(self.sums.device, torch.float64)

    def summary(self) -> dict[str, Any]:
        """Overall (pixel-weighted over all terrains) and per-terrain metrics.

        Keys: ``val_rmse_m``, ``val_mae_m``, ``val_slope_rmse_deg`` and their
        ``..._by_terrain`` dicts keyed by terrain name (only terrains with data); plus
        ``val_loss`` and ``val_loss_by_terrain`` (sample means) when losses were given.
        Overall values are NaN when nothing was accumulated.
        """
        sums = dict(zip(self._STATS, self.sums.cpu().tolist(), strict=True))
        total = {name: sum(values) for name, values in sums.items()}

        def ratio(num: float, den: float, root: bool = False) -> float:
            if den <= 0:
                return math.nan
            return math.sqrt(num / den) if root else num / den

        def by_terrain(num: str, den: str, root: bool = False) -> dict[str, float]:
            return {
                name: ratio(sums[num][i], sums[den][i], root)
                for i, name in enumerate(TERRAINS)
                if sums[den][i] > 0
            }

        out: dict[str, Any] = {
            "val_rmse_m": ratio(total["sq_err"], total["pixels"], root=True),
            "val_mae_m": ratio(total["abs_err"], total["pixels"]),
            "val_slope_rmse_deg": ratio(total["slope_sq_err"], total["slope_pixels"], root=True),
            "val_rmse_m_by_terrain": by_terrain("sq_err", "pixels", root=True),
            "val_mae_m_by_terrain": by_terrain("abs_err", "pixels"),
            "val_slope_rmse_deg_by_terrain": by_terrain("slope_sq_err", "slope_pixels", root=True),
        }
        if total["samples"] > 0:
            out["val_loss"] = ratio(total["loss"], total["samples"])
            out["val_loss_by_terrain"] = by_terrain("loss", "samples")
        return out
