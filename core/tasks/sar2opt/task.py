"""SAR -> optical: TerraMind generates Sentinel-2 L2A from Sentinel-1 GRD, tuned with LoRA.

TerraMind's generation samples discrete tokens, so there is no default training forward:
each generator plugin (``teacher_forcing``, ``straight_through``, ``reinforce``, ``refiner``,
``encoder_only``) is one way around the sampling. Validation always runs the real
generation (token sampling and diffusion decoding) and scores it in reflectance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from core.config import Config
from core.context import RunContext
from core.data.spatial_split import refuse_regions
from core.errors import UsageError
from core.keyed_cache import cached_rows, fingerprint
from core.run_folder import CACHE
from core.tasks import Batch, PredictOptions, ReportMetric, metric_text
from core.tasks.sar2opt import metrics
from core.tasks.sar2opt.bigearthnet import TILE_SIZE as REAL_TILE_SIZE
from core.tasks.sar2opt.bigearthnet import ensure_bigearthnet_pairs
from core.tasks.sar2opt.config import NoLossSection, PairsSection, TerraMindSection
from core.tasks.sar2opt.data import (
    DEFAULT_TILE_SIZE,
    OPTICAL_BANDS,
    TERRAMIND_V1,
    PairDataset,
    ensure_default_pairs,
    load_pairs,
)
from core.tasks.sar2opt.generation import terramind_in
from core.tasks.sar2opt.plots import plot_sar_optical
from core.tasks.sar2opt.terramind import (
    FROZEN_DTYPES,
    TerraMindSarToOptical,
    build_terramind,
    checkpoint_blocks,
    frozen_fingerprint,
    hold_frozen_weights,
    lora_parameters,
    seeded,
)

GENERATORS = ("teacher_forcing", "straight_through", "reinforce", "refiner", "encoder_only")
REFLECTANCE_SCALE = 10_000.0
"""S2 L2A digital numbers per unit reflectance; metrics compare reflectances in [0, 1]."""
NO_GENERATOR = (
    "sar2opt trains through a generator plugin: TerraMind samples discrete tokens, so a loss "
    'on its generated output has no gradient ("element 0 of tensors does not require grad"). '
    f"Add one of --plugins {','.join(GENERATORS)}"
)


def validation_steps(config: Config, epoch: int) -> int:
    """Diffusion steps of validation: ``model.final_diffusion_steps`` at the last epoch."""
    model = config.model
    if epoch == config.run.epochs and model.final_diffusion_steps:
        return model.final_diffusion_steps
    return model.diffusion_steps


class SarToOptical:
    """TerraMind S1GRD -> S2L2A on co-registered GeoTIFF pairs, validated by generating."""

    name = "sar2opt"
    components = ("objective",)
    """Each generator plugin returns its own per-sample objective as the single component."""
    terrains = ("scene",)
    """Pairs carry no terrain label: one domain, so samplers and counts stay well-defined."""
    train_tokens: np.ndarray | None = None
    val_tokens: np.ndarray | None = None
    frozen_weights: dict[str, dict[str, Any]] | None = None
    """The :func:`frozen_fingerprint` of the TerraMind ``build_model`` built last."""

    report_metrics = (
        ReportMetric("val_l1", "val L1 (reflectance)"),
        ReportMetric("val_psnr", "val PSNR (dB)", higher_is_better=True),
        ReportMetric("val_ssim", "val SSIM", higher_is_better=True),
    )
    reference_name = ""
    sections = MappingProxyType(
        {"model": TerraMindSection, "loss": NoLossSection, "pairs": PairsSection}
    )

    def __init__(self) -> None:
        self.skipped: list[tuple[str, str]] = []
        self.ceilings: dict[int, dict[str, float]] = {}
        """The tokenizer's ceiling per number of diffusion steps: decode(tokenize(target))
        scored against the target, the best any token prediction can reach."""

    def build_datasets(self, config: Config, ctx: RunContext) -> tuple[PairDataset, PairDataset]:
        if ctx.plugins.provider("training_forward") is None:
            raise UsageError(NO_GENERATOR)
        data = config.data
        if data.dir:
            with ctx.accelerator.main_process_first():  # one process builds the window index
                self.train_dataset, self.val_dataset = load_pairs(
                    Path(data.dir),
                    data,
                    config.task_sections["pairs"],
                    quiet=not ctx.accelerator.is_main_process,
                )
            self.skipped = self.train_dataset.skipped
        else:
            self.train_dataset, self.val_dataset = self.default_datasets(config, ctx)
            self.skipped = self.train_dataset.skipped
        return self.train_dataset, self.val_dataset

    @staticmethod
    def default_datasets(config: Config, ctx: RunContext) -> tuple[PairDataset, PairDataset]:
        """Train on every procedural pair, validate on the six real BigEarthNet pairs.

        Six pairs are too few to train on, but validating on them puts every run's pixel
        metrics on real imagery. ``data.val_fraction``, ``data.val_regions`` and
        ``data.exclude_regions`` apply to a ``--data`` folder only (the last two refused here).
        """
        refuse_regions(
            config.data,
            "the built-in sar2opt data trains on procedural pairs and validates on six "
            "BigEarthNet pairs",
            "give --data a folder of pairs to split by region",
        )
        quiet = not ctx.accelerator.is_main_process
        size = config.data.tile_size or DEFAULT_TILE_SIZE
        with ctx.accelerator.main_process_first():
            procedural = ensure_default_pairs(size, quiet=quiet)
            real = ensure_bigearthnet_pairs(quiet=quiet)
        return (
            PairDataset.from_folder(procedural, TERRAMIND_V1, size=size, strict=True),
            PairDataset.from_folder(real.folder, TERRAMIND_V1, size=REAL_TILE_SIZE, strict=True),
        )

    def build_model(self, config: Config) -> nn.Module:
        """TerraMind with LoRA; needs no data, so a trained model loads without its training set."""
        model = config.model
        terramind = build_terramind(
            model.terramind,
            pretrained=model.pretrained,
            lora_rank=model.lora_rank,
            lora_alpha=model.lora_alpha,
            lora_targets=model.lora_targets,
        )
        self.frozen_weights = frozen_fingerprint(terramind)
        if model.gradient_checkpointing:
            checkpoint_blocks(terramind.terramind)
        hold_frozen_weights(terramind, FROZEN_DTYPES[model.frozen_dtype])
        terramind.configure_generation(
            top_p=model.top_p,
            temperature=model.temperature,
            thresholding=model.decoder_thresholding,
            clip=model.decoder_clip,
        )
        return terramind

    def cache_key(
        self,
        what: str,
        weights: nn.Module | Mapping[str, torch.Tensor],
        tiles: str,
        config: Config,
        dataset: PairDataset | None = None,
        **settings: Any,
    ) -> dict:
        """The key of a per-tile cache made by ``weights`` (a module, or the part of a state
        dict that the cache depends on) from the ``tiles`` (``"sar"`` or ``"optical"``) of
        ``dataset`` (default: training): model, weight and tile fingerprints, ``settings``."""
        model = config.model
        return {
            "what": what,
            "model": f"terramind_v1_{model.terramind}",
            "pretrained": model.pretrained,
            "weights": fingerprint(weights),
            "tiles": (self.train_dataset if dataset is None else dataset).fingerprint(tiles),
            **settings,
        }

    def cached_per_tile(
        self,
        name: str,
        key: dict,
        compute: Callable[[np.ndarray], torch.Tensor],
        ctx: RunContext,
        dataset: PairDataset | None = None,
    ) -> np.ndarray:
        """``compute`` over every tile of ``dataset`` (default: training), kept
        memory-mapped in ``cache/<name>.npy`` of the run folder and recomputed whenever
        ``key`` changes."""
        path = ctx.run_dir / CACHE / f"{name}.npy"
        rows = len(self.train_dataset if dataset is None else dataset)
        return cached_rows(path, key, rows, compute, ctx.accelerator)

    def prepare_target_tokens(self, terramind: TerraMindSarToOptical, ctx: RunContext) -> None:
        """Tokenize every training target once, for the plugins that read target tokens.

        Keyed by the tokenizer's weights, so a run re-started with another model size or
        with pretrained weights never reads the tokens of another tokenizer. The validation
        targets are tokenized now too, after which nothing runs the tokenizer's encoder.
        """
        self.train_tokens = self.cached_tokens(terramind, self.train_dataset, "target_tokens", ctx)
        self.prepare_validation_tokens(terramind, ctx)

    def prepare_validation_tokens(self, terramind: TerraMindSarToOptical, ctx: RunContext) -> None:
        """Tokenize every validation target once (token scores and the ceiling read them),
        then park the tokenizer's encoder on the CPU, off the training device."""
        self.val_tokens = self.cached_tokens(terramind, self.val_dataset, "val_target_tokens", ctx)
        terramind.park_tokenizer_encoder()

    def cached_tokens(
        self, terramind: TerraMindSarToOptical, dataset: PairDataset, name: str, ctx: RunContext
    ) -> np.ndarray:
        """``[N, T]`` token ids of ``dataset``'s targets, cached per tile as ``name``."""
        device = ctx.device

        def tokenize(indices: np.ndarray) -> torch.Tensor:
            chunks = np.array_split(indices, max(1, len(indices) // 16))
            return torch.cat(
                [
                    terramind.target_tokens(
                        torch.stack([dataset[i]["optical"] for i in chunk]).to(device)
                    ).cpu()
                    for chunk in tqdm(
                        chunks,
                        desc="tokenizing targets",
                        leave=False,
                        disable=len(indices) < 64 or not ctx.accelerator.is_main_process,
                    )
                ]
            )

        key = self.cache_key(name, terramind.tokenizer, "optical", ctx.config, dataset)
        return self.cached_per_tile(name, key, tokenize, ctx, dataset)

    def target_tokens(self, batch: Batch) -> torch.Tensor:
        """``[B, T]`` cached token ids of a training batch's targets, on its device."""
        if self.train_tokens is None:
            raise RuntimeError("target tokens are read before prepare_target_tokens ran")
        rows = self.train_tokens[batch["idx"].cpu().numpy()]
        return torch.from_numpy(rows).to(batch["optical"].device)

    def forward_losses(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        raise UsageError(NO_GENERATOR)

    @torch.no_grad()
    def validate(self, model: nn.Module, batches: Iterable[Batch], ctx: RunContext) -> dict:
        """Scores of real generations against the targets in reflectance, token scores of the
        logits, and the tokenizer's ceiling, tile by tile with a seed per tile: the same
        whatever the batch size or number of processes."""
        if self.val_tokens is None:  # plugins that read no target tokens: at the first epoch
            self.prepare_validation_tokens(terramind_in(model), ctx)
        steps = validation_steps(ctx.config, ctx.epoch)
        with_ceiling = steps not in self.ceilings
        sums = {
            name: torch.zeros(
                len(OPTICAL_BANDS) if name == "band_l1" else 1,
                dtype=torch.float64,
                device=ctx.device,
            )
            for name in self.score_names(with_ceiling)
        }  # a process without tiles still joins the reduction with zeros
        for batch in batches:
            for i in range(len(batch["idx"])):
                tile = {key: value[i : i + 1] for key, value in batch.items()}
                for name, value in self.tile_scores(model, tile, steps, with_ceiling, ctx):
                    sums[name] += value.double()
        flat = ctx.accelerator.reduce(torch.cat(list(sums.values())), "sum").tolist()
        totals, offset = {}, 0
        for name, value in sums.items():
            totals[name] = flat[offset : offset + len(value)]
            offset += len(value)
        count = totals.pop("tiles")[0]
        if count == 0:
            return {"val_loss": math.nan, "val_l1": math.nan, "val_psnr": math.nan}
        mean = {name: [v / count for v in values] for name, values in totals.items()}
        if with_ceiling:
            self.ceilings[steps] = {
                "val_ceiling_l1": mean.pop("ceiling_l1")[0],
                "val_ceiling_psnr": mean.pop("ceiling_psnr")[0],
            }
        band_l1 = mean.pop("band_l1")
        return {
            "val_loss": mean["l1"][0],
            **{f"val_{name}": values[0] for name, values in mean.items()},
            "val_l1_by_band": dict(zip(OPTICAL_BANDS, band_l1, strict=True)),
            **self.ceilings[steps],
            "val_diffusion_steps": steps,
        }

    @staticmethod
    def score_names(with_ceiling: bool) -> Iterable[str]:
        yield from ("tiles", "l1", "psnr", "ssim", "spectral_angle_deg", "ndvi_mae")
        yield from ("band_l1", "token_ce", "token_accuracy")
        if with_ceiling:
            yield from ("ceiling_l1", "ceiling_psnr")

    def tile_scores(
        self, model: nn.Module, tile: Batch, steps: int, with_ceiling: bool, ctx: RunContext
    ) -> Iterable[tuple[str, torch.Tensor]]:
        """``(name, value)`` of one tile, in :meth:`score_names` order."""
        from torchmetrics.functional.image import structural_similarity_index_measure

        seed = ctx.config.data.split_seed + int(tile["idx"][0])  # fixed per tile, every run
        terramind = terramind_in(model)
        target = self.reflectance(tile["optical"])
        generated = self.reflectance(model.generate(tile["sar"], steps, seed))
        mask = tile["mask"]  # the valid pixels: filled nodata is scored nowhere
        _, ssim = structural_similarity_index_measure(
            generated, target, data_range=1.0, return_full_image=True
        )
        yield "tiles", torch.ones(1, device=target.device)
        yield "l1", metrics.masked_mean((generated - target).abs(), mask)
        yield "psnr", metrics.psnr(generated, target, mask)
        yield "ssim", metrics.masked_mean(ssim, mask)
        yield "spectral_angle_deg", metrics.spectral_angle(generated, target, mask)
        yield "ndvi_mae", metrics.ndvi_error(generated, target, mask)
        yield "band_l1", metrics.band_l1(generated, target, mask)[0]
        tokens = torch.from_numpy(self.val_tokens[tile["idx"].cpu().numpy()]).to(target.device)
        with seeded(seed):  # the logits do not depend on ROAR's shuffle; keep RNGs untouched
            logits = terramind(tile["sar"], output="logits").float()
        cross_entropy, accuracy = metrics.token_scores(logits, tokens)
        yield "token_ce", cross_entropy
        yield "token_accuracy", accuracy
        if with_ceiling:
            size = tuple(tile["optical"].shape[-2:])
            ceiling = self.reflectance(terramind.decode(tokens, size, steps, seed))
            yield "ceiling_l1", metrics.masked_mean((ceiling - target).abs(), mask)
            yield "ceiling_psnr", metrics.psnr(ceiling, target, mask)

    def reflectance(self, optical: torch.Tensor) -> torch.Tensor:
        """Standardised optical -> reflectance clipped to [0, 1]."""
        dataset = self.val_dataset
        return (dataset.destandardise_optical(optical.float()) / REFLECTANCE_SCALE).clamp(0, 1)

    def epoch_summary(self, row: dict[str, Any]) -> str:
        return (
            f"train_loss {metric_text(row['train_loss'], '.4f')} "
            f"val_l1 {metric_text(row['val_l1'], '.4f')} "
            f"PSNR {metric_text(row['val_psnr'], '.2f')} dB "
            f"SSIM {metric_text(row.get('val_ssim'), '.3f')} "
            f"token accuracy {metric_text(row.get('val_token_accuracy'), '.3f')} "
            f"(ceiling: L1 {metric_text(row.get('val_ceiling_l1'), '.4f')})"
        )

    def export_model(self, model: nn.Module, ctx: RunContext) -> None:
        """The LoRA adapters in peft's format in ``RUN_DIR/adapters``, when they trained
        (none when a plugin froze them with the rest of TerraMind, as ``refiner`` does)."""
        from core.tasks.sar2opt.adapters import ADAPTERS, save_adapters

        terramind = terramind_in(model)
        if any(parameter.requires_grad for _, parameter in lora_parameters(terramind)):
            save_adapters(terramind, ctx.config, ctx.run_dir / ADAPTERS)

    def checkpoint_meta(self, train: PairDataset, val: PairDataset) -> dict[str, Any]:
        """The fingerprint of TerraMind's frozen weights: they are not saved but rebuilt from
        config.toml (the seed draws random ones), so predict and the merged export check that
        they rebuilt those the run trained with."""
        return {"frozen_weights": self.frozen_weights}

    def plot_examples(self, val: PairDataset) -> list[int]:
        """The first four validation pairs."""
        return list(range(min(4, len(val))))

    @torch.no_grad()
    def write_plots(
        self,
        run_dir: Path,
        rows: list[dict],
        model: nn.Module,
        examples: Iterable[Batch],
        ctx: RunContext,
    ) -> None:
        sar, generated, target = [], [], []
        steps, seed = ctx.config.model.diffusion_steps, ctx.config.run.seed
        for i, batch in enumerate(examples):  # a seed per position: the same every epoch
            generated.append(model.generate(batch["sar"], steps, seed + i))
            sar.append(batch["sar"])
            target.append(batch["optical"])
        plot_sar_optical(
            torch.cat(sar).cpu().numpy(),
            self.reflectance(torch.cat(generated)).cpu().numpy(),
            self.reflectance(torch.cat(target).cpu()).numpy(),
            run_dir / "sar_generated_target.png",
        )

    def predict(self, run_dir: Path, src: Path, dst: Path, options: PredictOptions) -> None:
        from core.tasks.sar2opt.predict import predict

        predict(run_dir, src, dst, options)
