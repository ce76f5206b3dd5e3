"""``encoder_only``: LoRA on TerraMind's encoder only, trained in latent space.

Decoder and sampling stay frozen and unused in training. The target is the encoding of the
target optical image by TerraMind's own encoder *without* adapters, computed once per tile
and cached in the run folder (``cache/encoder_targets.npy``, memory-mapped, keyed by
TerraMind's frozen weights and by the tiles); the loss pulls the adapted
encoding of the SAR image towards it, token by token (MSE). An encoder that makes SAR look
like optical to the frozen decoder lets generation from SAR behave like generation from
optical. Only approximately: the decoder reads the encoder's output plus each context
token's modality embedding, and the S1 GRD embedding stays, so even a perfect latent match
does not condition the decoder as optical input does.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import PluginError
from core.hookspecs import Batch, hookimpl
from core.plugins import Plugin
from core.tasks.sar2opt.terramind import (
    OPTICAL_RAW,
    TerraMindSarToOptical,
    frozen_tensors,
    lora_parameters,
)
from plugins.generators import sar2opt_task, terramind_of

if TYPE_CHECKING:
    from core.context import RunContext

ENCODER_BLOCK = re.compile(r"(^|\.)encoder\.\d+\.")
ENCODER_TARGETS = "encoder_targets"


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` without its peft LoRA adapters, leaving which ones train unchanged
    (peft's ``enable_adapters(True)`` would mark every adapter trainable again)."""
    from peft.tuners.lora import LoraLayer

    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    trainable = {name: p.requires_grad for name, p in lora_parameters(model)}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for name, parameter in lora_parameters(model):
            parameter.requires_grad_(trainable[name])


class EncoderOnly(Plugin):
    """Adapted SAR encoding -> frozen optical encoding, MSE per token."""

    name = "encoder_only"

    def __init__(self, config: object) -> None:
        super().__init__(config)
        self.targets: np.ndarray | None = None

    @hookimpl
    def configure_model(self, model: nn.Module, ctx: RunContext) -> None:
        sar2opt_task(ctx, self.name)
        encoder = 0
        for name, parameter in lora_parameters(model):
            in_encoder = bool(ENCODER_BLOCK.search(name))
            parameter.requires_grad_(in_encoder)
            encoder += in_encoder
        if not encoder:
            raise PluginError(
                "plugin 'encoder_only': no LoRA adapter sits in TerraMind's encoder blocks; "
                f"model.lora_targets {ctx.config.model.lora_targets!r} must match "
                "encoder.<i>.attn/mlp modules and model.lora_rank must be > 0"
            )

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        self.targets = self.optical_encodings(terramind_of(ctx.model, ctx, self.name), ctx)

    def optical_encodings(self, terramind: TerraMindSarToOptical, ctx: RunContext) -> np.ndarray:
        """``[N_train, T, D]`` encodings of the training targets by the un-adapted encoder,
        computed once per run folder and read back memory-mapped (10,000 tiles of 224 at
        ``base`` are 23 GB of float32: page cache, not each process's memory).

        With adapters switched off the encoder is the base model as built or loaded, also on
        a resumed run whose adapters have already trained. So the key holds the transformer's
        frozen weights only: neither the adapters, which the encodings never see, nor any
        weight another plugin trains (a norm, a bias), which a resumed run loads trained and
        whose change must not throw away the targets computed before training.
        """
        dataset, device = ctx.train_dataset, ctx.device

        @torch.no_grad()
        def encode(indices: np.ndarray) -> torch.Tensor:
            with adapters_disabled(terramind):
                return torch.cat(
                    [
                        terramind.encode(
                            torch.stack([dataset[int(i)]["optical"] for i in chunk]).to(device),
                            OPTICAL_RAW,
                        ).cpu()
                        for chunk in np.array_split(indices, max(1, len(indices) // 16))
                    ]
                )

        task = sar2opt_task(ctx, self.name)
        frozen = {
            name: tensor
            for name, tensor in frozen_tensors(terramind.terramind)
            if "lora_" not in name
        }
        key = task.cache_key(ENCODER_TARGETS, frozen, "optical", ctx.config)
        return task.cached_per_tile(ENCODER_TARGETS, key, encode, ctx)

    @hookimpl
    def training_forward(self, model: nn.Module, batch: Batch, ctx: RunContext) -> torch.Tensor:
        rows = self.targets[batch["idx"].cpu().numpy()]
        target = torch.from_numpy(rows).to(batch["sar"].device)
        encoding = model(batch["sar"], output="encoding")
        return F.mse_loss(encoding, target, reduction="none").mean((1, 2)).unsqueeze(1)
