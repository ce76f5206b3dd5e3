"""SAR -> optical: TerraMind generates Sentinel-2 L2A from Sentinel-1 GRD, tuned with LoRA.

TerraMind's generation samples discrete tokens, so there is no default training forward:
each generator plugin (``teacher_forcing``, ``straight_through``, ``reinforce``, ``refiner``,
``encoder_only``) is one way around the sampling. Validation always runs the real
generation (token sampling and diffusion decoding) and scores it in reflectance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from core.config import Config
from core.context import RunContext
from core.data.bigearthnet import ensure_bigearthnet_pairs
from core.data.dataset import train_val_split
from core.data.sar2opt import TERRAMIND_V1, PairDataset, ensure_default_pairs
from core.errors import UsageError
from core.models.terramind import TerraMindSarToOptical, build_terramind
from core.plots import plot_loss_curves, plot_sar_optical
from core.safe_io import save_tensors
from core.tasks import ReportMetric, metric_text

Batch = dict[str, Any]
GENERATORS = ("teacher_forcing", "straight_through", "reinforce", "refiner", "encoder_only")
REFLECTANCE_SCALE = 10_000.0
"""S2 L2A digital numbers per unit reflectance; metrics compare reflectances in [0, 1]."""
DEFAULT_TILE_SIZE = 64
NO_GENERATOR = (
    "sar2opt trains through a generator plugin: TerraMind samples discrete tokens, so a loss "
    'on its generated output has no gradient ("element 0 of tensors does not require grad"). '
    f"Add one of --plugins {','.join(GENERATORS)}"
)


class SarToOptical:
    """TerraMind S1GRD -> S2L2A on co-registered GeoTIFF pairs, validated by generating."""

    name = "sar2opt"
    components = ("objective",)
    """Each generator plugin returns its own per-sample objective as the single component."""
    terrains = ("scene",)
    """Pairs carry no terrain label: one domain, so samplers and counts stay well-defined."""
    report_metrics = (
        ReportMetric("val_l1", "val L1 (reflectance)"),
        ReportMetric("val_psnr", "val PSNR (dB)", higher_is_better=True),
        ReportMetric("val_ssim", "val SSIM", higher_is_better=True),
    )
    reference_name = ""

    def build_datasets(self, config: Config, ctx: RunContext) -> tuple[PairDataset, PairDataset]:
        if ctx.plugins.provider("training_forward") is None:
            raise UsageError(NO_GENERATOR)
        self.ctx = ctx
        data = config.data
        if data.dir:
            dataset = PairDataset.from_folder(Path(data.dir), TERRAMIND_V1, strict=data.strict)
            self.skipped = dataset.skipped
            self.train_dataset, self.val_dataset = train_val_split(
                dataset, data.val_fraction, data.split_seed
            )
        else:
            self.train_dataset, self.val_dataset = self.default_datasets(config, ctx)
            self.skipped = self.train_dataset.skipped
        return self.train_dataset, self.val_dataset

    @staticmethod
    def default_datasets(config: Config, ctx: RunContext) -> tuple[PairDataset, PairDataset]:
        """Train on every procedural pair, validate on the six real BigEarthNet pairs.

        Six pairs are too few to train on, but validating on them puts every run's pixel
        metrics on real imagery. ``data.val_fraction`` applies to a ``--data`` folder only.
        """
        quiet = not ctx.accelerator.is_main_process
        with ctx.accelerator.main_process_first():
            procedural = ensure_default_pairs(
                config.data.tile_size or DEFAULT_TILE_SIZE, quiet=quiet
            )
            real = ensure_bigearthnet_pairs(quiet=quiet)
        return (
            PairDataset.from_folder(procedural, TERRAMIND_V1, strict=True),
            PairDataset.from_folder(real.folder, TERRAMIND_V1, strict=True),
        )

    def build_model(self, config: Config) -> nn.Module:
        model = config.model
        terramind = build_terramind(
            model.terramind,
            pretrained=model.pretrained,
            lora_rank=model.lora_rank,
            lora_alpha=model.lora_alpha,
            lora_targets=model.lora_targets,
        )
        self.train_tokens = self.cached_target_tokens(terramind)
        return terramind

    def cached_target_tokens(self, model: TerraMindSarToOptical) -> torch.Tensor:
        """``[N_train, T]`` token ids of every training target, tokenized once per run.

        Written to ``cache/target_tokens.pt`` in the run folder, so a resumed run (same
        frozen tokenizer) does not tokenize again.
        """
        ctx = self.ctx
        path = ctx.run_dir / "cache" / "target_tokens.pt"
        names = list(self.train_dataset.names)
        with ctx.accelerator.main_process_first():
            if path.exists():
                cached = torch.load(path, weights_only=True)
                if cached["names"] == names:
                    return cached["tokens"]
            if not ctx.accelerator.is_main_process:
                raise RuntimeError(f"{path} was not written by the main process")
            model.tokenizer.to(ctx.device)  # the trainer places the rest of the model later
            tokens = torch.cat(
                [
                    model.target_tokens(
                        torch.stack([self.train_dataset[i]["optical"] for i in chunk]).to(
                            ctx.device
                        )
                    ).cpu()
                    for chunk in tqdm(
                        np.array_split(np.arange(len(names)), max(1, len(names) // 16)),
                        desc="tokenizing targets",
                        leave=False,
                        disable=len(names) < 64,
                    )
                ]
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            save_tensors(path, {"names": names, "tokens": tokens})
        return tokens

    def target_tokens(self, batch: Batch) -> torch.Tensor:
        """``[B, T]`` cached token ids of a training batch's targets, on its device."""
        return self.train_tokens[batch["idx"].cpu()].to(batch["optical"].device)

    def forward_losses(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        raise UsageError(NO_GENERATOR)

    @torch.no_grad()
    def validate(self, model: nn.Module, batches: Iterable[Batch], ctx: RunContext) -> dict:
        """L1, PSNR and SSIM of real generations against the targets, in reflectance."""
        from torchmetrics.functional.image import structural_similarity_index_measure

        config = ctx.config
        sums = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # l1, psnr, ssim, n
        for batch in batches:
            ctx.plugins.call("route_batch", model=model, batch=batch, ctx=ctx)
            seed = config.data.split_seed + int(batch["idx"][0])  # fixed per tile, every run
            generated = self.reflectance(
                model.generate(batch["sar"], config.model.diffusion_steps, seed)
            )
            target = self.reflectance(batch["optical"])
            mse = (generated - target).square().mean((1, 2, 3)).clamp_min(1e-10)
            ssim = structural_similarity_index_measure(
                generated, target, data_range=1.0, reduction="none"
            )
            sums += torch.stack(
                [
                    (generated - target).abs().mean((1, 2, 3)).sum(),
                    (-10 * torch.log10(mse)).sum(),
                    ssim.sum(),
                    torch.tensor(float(len(mse)), device=mse.device),
                ]
            ).double()
        l1, psnr, ssim, count = ctx.accelerator.reduce(sums, "sum").tolist()
        if count == 0:
            return {"val_loss": math.nan, "val_l1": math.nan, "val_psnr": math.nan}
        return {"val_loss": l1 / count, "val_l1": l1 / count, "val_psnr": psnr / count,
                "val_ssim": ssim / count}  # fmt: skip

    def reflectance(self, optical: torch.Tensor) -> torch.Tensor:
        """Standardised optical -> reflectance clipped to [0, 1]."""
        dataset = self.val_dataset
        return (dataset.destandardise_optical(optical.float()) / REFLECTANCE_SCALE).clamp(0, 1)

    def epoch_summary(self, row: dict[str, Any]) -> str:
        return (
            f"train_loss {metric_text(row['train_loss'], '.4f')} "
            f"val_l1 {metric_text(row['val_l1'], '.4f')} "
            f"PSNR {metric_text(row['val_psnr'], '.2f')} dB "
            f"SSIM {metric_text(row.get('val_ssim'), '.3f')}"
        )

    def checkpoint_meta(self) -> dict[str, Any]:
        return {}

    @torch.no_grad()
    def write_plots(
        self, run_dir: Path, rows: list[dict], model: nn.Module, ctx: RunContext
    ) -> None:
        plot_loss_curves(rows, run_dir / "loss_curves.png")
        count = min(4, len(self.val_dataset))
        samples = [self.val_dataset[i] for i in range(count)]
        sar = torch.stack([s["sar"] for s in samples]).to(ctx.device)
        seed = ctx.config.run.seed
        generated = torch.cat(
            [
                model.generate(sar[i : i + 1], ctx.config.model.diffusion_steps, seed + i)
                for i in range(count)
            ]
        )
        plot_sar_optical(
            sar.cpu().numpy(),
            self.reflectance(generated).cpu().numpy(),
            self.reflectance(torch.stack([s["optical"] for s in samples])).numpy(),
            run_dir / "sar_generated_target.png",
        )
