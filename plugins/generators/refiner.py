"""``refiner``: the seed's two-stage option. TerraMind stays frozen; a small network learns
to correct its output.

TerraMind generates once per training tile, without gradient, at set-up; the generations
are cached in the run folder (``cache/refiner_generated.pt``), so neither later epochs nor
a resumed run generate them again. The refiner maps (generated optical, SAR) to optical as
a residual correction, trained with L1 against the target. Validation generates and then
refines, so the metrics score the whole two-stage model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from core.hookspecs import Batch, hookimpl
from core.models.terramind import TerraMindSarToOptical
from core.plugins import Plugin
from core.safe_io import save_tensors
from plugins.generators import sar2opt_task, terramind_of

if TYPE_CHECKING:
    from core.context import RunContext

SAR_BANDS, OPTICAL_BANDS = 2, 12


@attrs.frozen
class RefinerConfig:
    """``[plugins.refiner]``: the refinement network's width and depth."""

    channels: int = attrs.field(default=32, validator=attrs.validators.ge(1))
    blocks: int = attrs.field(default=4, validator=attrs.validators.ge(1))


class RefinementNet(nn.Module):
    """(generated optical, SAR) -> correction of the generated optical; starts as identity."""

    def __init__(self, channels: int, blocks: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(OPTICAL_BANDS + SAR_BANDS, channels, 3, padding=1)]
        for _ in range(blocks):
            layers += [nn.GELU(), nn.Conv2d(channels, channels, 3, padding=1)]
        layers += [nn.GELU(), nn.Conv2d(channels, OPTICAL_BANDS, 3, padding=1)]
        self.body = nn.Sequential(*layers)
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, generated: torch.Tensor, sar: torch.Tensor) -> torch.Tensor:
        return generated + self.body(torch.cat([generated, sar], dim=1))


class RefinedTerraMind(nn.Module):
    """Frozen TerraMind followed by the trainable refiner; ``generate`` runs both stages."""

    def __init__(self, terramind: TerraMindSarToOptical, refiner: RefinementNet) -> None:
        super().__init__()
        self.terramind_generator = terramind
        self.refiner = refiner

    def forward(self, generated: torch.Tensor, sar: torch.Tensor) -> torch.Tensor:
        return self.refiner(generated, sar)

    @torch.no_grad()
    def generate(self, sar: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
        return self.refiner(self.terramind_generator.generate(sar, steps, seed), sar)


class Refiner(Plugin):
    """Two-stage training: cached frozen-TerraMind generations, a trainable refiner."""

    name = "refiner"
    Config = RefinerConfig

    def __init__(self, config: RefinerConfig) -> None:
        super().__init__(config)
        self.generated: torch.Tensor | None = None

    @hookimpl
    def configure_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        sar2opt_task(ctx, self.name)
        model.requires_grad_(False)  # LoRA adapters included: TerraMind is not tuned here
        return RefinedTerraMind(model, RefinementNet(self.config.channels, self.config.blocks))

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        self.generated = self.cached_generations(terramind_of(ctx.model, ctx, self.name), ctx)

    def cached_generations(self, terramind: TerraMindSarToOptical, ctx: RunContext) -> torch.Tensor:
        """``[N_train, 12, H, W]`` TerraMind outputs (standardised), generated once per tile."""
        dataset = ctx.train_dataset
        path = ctx.run_dir / "cache" / "refiner_generated.pt"
        names = list(dataset.names)
        steps = ctx.config.model.diffusion_steps
        with ctx.accelerator.main_process_first():
            if path.exists():
                cached = torch.load(path, weights_only=True)
                if cached["names"] == names and cached["diffusion_steps"] == steps:
                    return cached["generated"]
            generated = torch.cat(
                [
                    terramind.generate(
                        dataset[i]["sar"].unsqueeze(0).to(ctx.device),
                        steps,
                        ctx.config.run.seed + i,
                    ).cpu()
                    for i in tqdm(
                        range(len(dataset)),
                        desc="refiner: generating with frozen TerraMind",
                        leave=False,
                        disable=not ctx.accelerator.is_main_process,
                    )
                ]
            )
            if ctx.accelerator.is_main_process:
                path.parent.mkdir(parents=True, exist_ok=True)
                cache = {"names": names, "diffusion_steps": steps, "generated": generated}
                save_tensors(path, cache)
        return generated

    @hookimpl
    def training_forward(self, model: nn.Module, batch: Batch, ctx: RunContext) -> torch.Tensor:
        generated = self.generated[batch["idx"].cpu()].to(batch["sar"].device)
        refined = model(generated, batch["sar"])
        return F.l1_loss(refined, batch["optical"], reduction="none").mean((1, 2, 3)).unsqueeze(1)
