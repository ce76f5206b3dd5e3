"""TerraMind S1 GRD -> S2 L2A generation (terratorch), with LoRA and differentiable paths.

TerraTorch's generation samples discrete tokens and decodes them with a diffusion pipeline,
both without gradient: a loss on its output cannot train anything (the seed's "element 0 of
tensors does not require grad"). This module keeps the real generation for validation and
exposes what lies *before* the sampling, where gradients do flow: the token logits of one
ROAR step over all target positions (what ``generate`` samples from) and the encoder's
output. The generator plugins build their objectives on these.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from core.errors import ConfigError
from core.tasks.sar2opt.terratorch_import import import_terratorch

if TYPE_CHECKING:
    import peft

SIZES = ("tiny", "small", "base", "large")
SAR = "untok_sen1grd@224"
OPTICAL_RAW = "untok_sen2l2a@224"
OPTICAL_TOKENS = "tok_sen2l2a@224"
FROZEN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""``model.frozen_dtype``: how TerraMind's frozen weights are held."""
TEMPERATURE_ZERO = 1e-10
"""TerraTorch's sampler picks the most likely token at temperatures this close to 0."""


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Fix torch's and Python's RNGs inside the block (generation draws from both)."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


class TerraMindSarToOptical(nn.Module):
    """A TerraTorch ``TerraMindGeneration`` (S1GRD -> S2L2A) seen through the paths we train.

    ``forward(sar, output=...)`` is what training calls, so a DDP wrapper sees every
    differentiable computation: ``"logits"`` gives ``[B, N, V]`` token logits in raster
    order, ``"encoding"`` the encoder's ``[B, N, D]`` output. Images are standardised with
    TerraMind's pretraining statistics.
    """

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator
        self.compute_dtype = torch.float32
        """The dtype the transformer and the diffusion decoder compute in (autocast below
        float32); set by :func:`hold_frozen_weights`."""

    @property
    def terramind(self) -> nn.Module:
        """The transformer (encoder, decoder, embeddings), without the tokenizer."""
        return self.generator.sampler.model

    @property
    def tokenizer(self) -> nn.Module:
        """The S2 L2A tokenizer: ViT encoder, FSQ quantizer, diffusion decoder. Always frozen."""
        return self.generator.tokenizer[OPTICAL_TOKENS]

    @property
    def tokenizer_encoder(self) -> tuple[nn.Module, ...]:
        """The weights ``target_tokens`` runs before the quantizer (whose buffers give the
        ``codebook`` that training reads): needed only while target tokens are cached."""
        return self.tokenizer.encoder, self.tokenizer.quant_proj

    def park_tokenizer_encoder(self) -> None:
        """Move the tokenizer's encoder to the CPU, off the training device: once the target
        tokens are cached, nothing runs it. ``target_tokens`` brings it back when called."""
        for module in self.tokenizer_encoder:
            module.to("cpu")

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Autocast to ``compute_dtype`` when the frozen weights are held below float32."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.compute_dtype)

    @property
    def codebook(self) -> torch.Tensor:
        """``[V, d]``: the FSQ code of every token id, the latent the diffusion decoder reads."""
        return self.tokenizer.quantize.codebook

    def forward(self, image: torch.Tensor, output: str = "logits") -> torch.Tensor:
        paths = {"logits": self.token_logits, "encoding": self.encode}
        if output not in paths:
            raise ValueError(f"unknown output {output!r}: logits or encoding")
        with self.autocast(image.device):
            return paths[output](image).float()

    def _input(self, image: torch.Tensor, modality: str) -> dict:
        from terratorch.models.backbones.terramind.model.generate import init_full_input_modality
        from terratorch.models.backbones.terramind.model.modality_info import MODALITY_INFO

        batch, tokens = image.shape[0], self.num_tokens(image)
        value = {
            "tensor": image,
            "input_mask": torch.zeros(batch, tokens, dtype=torch.bool, device=image.device),
            "target_mask": torch.ones(batch, tokens, dtype=torch.bool, device=image.device),
            "decoder_attention_mask": torch.zeros(
                batch, tokens, dtype=torch.bool, device=image.device
            ),
        }
        return {modality: init_full_input_modality(value, MODALITY_INFO, modality, image.device)}

    def num_tokens(self, image: torch.Tensor) -> int:
        patch = self.tokenizer.patch_size
        return (image.shape[-2] // patch) * (image.shape[-1] // patch)

    def token_logits(self, sar: torch.Tensor) -> torch.Tensor:
        """``[B, N, V]`` logits of every target token given the SAR image, in raster order.

        One ROAR step that decodes all positions at once: the distribution TerraMind's
        ``generate`` samples from with its default single decoding step.
        """
        from terratorch.models.backbones.terramind.model.generate import (
            init_empty_target_modality,
        )
        from terratorch.models.backbones.terramind.model.modality_info import MODALITY_INFO

        tokens = self.num_tokens(sar)
        mod_dict = self._input(sar, SAR)
        mod_dict[OPTICAL_TOKENS] = init_empty_target_modality(
            MODALITY_INFO, OPTICAL_TOKENS, sar.shape[0], tokens, sar.device
        )
        logits, positions = self.generator.sampler.forward_enc_dec_roar_batched(
            mod_dict, OPTICAL_TOKENS, tokens
        )
        order = positions.argsort(dim=1)  # ROAR visits positions in random order
        return logits.gather(1, order.unsqueeze(-1).expand_as(logits))

    def encode(self, image: torch.Tensor, modality: str = SAR) -> torch.Tensor:
        """``[B, N, D]``: TerraMind's encoder output for one image modality alone."""
        sampler, model = self.generator.sampler, self.terramind
        mod_dict = self._input(image, modality)
        embedded = {key: model.encoder_embeddings[key](value) for key, value in mod_dict.items()}
        tokens, emb, mask, _ = sampler.forward_mask_encoder_generation(embedded)
        return model.forward_encoder(tokens + emb, mask)

    @torch.no_grad()
    def target_tokens(self, optical: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` token ids of standardised optical images (raster order), always in
        float32 (see :func:`hold_frozen_weights`), on the images' device."""
        for module in self.tokenizer_encoder:
            module.to(optical.device)
        with torch.autocast(optical.device.type, enabled=False):
            return self.tokenizer.tokenize(optical).flatten(1).long()

    @torch.no_grad()
    def decode(
        self, tokens: torch.Tensor, size: tuple[int, int], steps: int, seed: int
    ) -> torch.Tensor:
        """Standardised optical images from ``[B, N]`` token ids.

        Every image starts from the same diffusion noise (drawn from ``seed`` as TerraTorch's
        pipeline draws it), so two decodes differ only through their tokens.
        """
        shape = (1, self.tokenizer.n_channels, *size)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # on the CPU
        return self.decode_noise(tokens, noise.expand(len(tokens), -1, -1, -1), steps)

    @torch.no_grad()
    def decode_noise(self, tokens: torch.Tensor, noise: torch.Tensor, steps: int) -> torch.Tensor:
        """Standardised optical images from ``[B, N]`` token ids and the diffusion's starting
        noise ``[B, C, H, W]``: TerraTorch's own pipeline (``PipelineCond``: DDIM, trailing
        timesteps, no guidance), with the noise given instead of drawn inside. DDIM's steps
        draw nothing more (eta 0), so the image is a function of tokens and noise."""
        patch = self.tokenizer.patch_size
        height, width = noise.shape[-2:]
        quant = self.condition(tokens.reshape(len(tokens), height // patch, width // patch))
        image = noise.to(tokens.device, torch.float32)
        for t in self.timesteps(steps):
            image = self.denoise(image, t, quant)
        return image

    def condition(self, grid: torch.Tensor) -> torch.Tensor:
        """What the diffusion decoder is conditioned on: the FSQ codes of ``[B, h, w]`` token
        ids laid out on their grid."""
        with self.autocast(grid.device):
            return self.tokenizer.tokens_to_embedding(grid)

    def timesteps(self, steps: int) -> torch.Tensor:
        """The diffusion's timesteps for ``steps`` DDIM steps, as TerraTorch's pipeline sets
        them (trailing)."""
        scheduler = self.tokenizer.noise_scheduler
        scheduler.set_timesteps(steps, mode="trailing")
        return scheduler.timesteps

    @torch.no_grad()
    def denoise(self, image: torch.Tensor, t: torch.Tensor, quant: torch.Tensor) -> torch.Tensor:
        """One DDIM step at timestep ``t`` (of :meth:`timesteps`) of float32 ``[B, C, H, W]``
        images conditioned on ``quant`` (:meth:`condition`): a step of
        :meth:`decode_noise`, for a caller that fuses images between steps (predict)."""
        with self.autocast(image.device):
            output = self.tokenizer.decoder(image, t, quant, orig_res=None)
        return self.tokenizer.noise_scheduler.step(output.float(), t, image).prev_sample

    def sample_tokens(self, logits: torch.Tensor, gumbel: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` token ids drawn from ``[B, N, V]`` logits as TerraTorch's sampler draws
        them (top-p on the logits, then softmax at the temperature; the most likely token at
        temperature 0), by the Gumbel-max trick with the given ``[B, N, V]`` Gumbel noise:
        ``argmax(logits / T + g)`` is distributed as ``softmax(logits / T)``, and two windows
        that share the noise of a position pick the same token where their logits agree."""
        sampler, temperature = self.generator.sampler, self.generator.temps
        flat = logits.reshape(-1, logits.shape[-1]).float().clone()  # filtered in place
        if temperature <= TEMPERATURE_ZERO:  # TerraTorch's own rule for the argmax
            return flat.argmax(-1).reshape(logits.shape[:2])
        filtered = sampler.top_k_top_p_filtering(flat, self.generator.top_k, self.generator.top_p)
        perturbed = filtered / temperature + gumbel.reshape(flat.shape).to(flat.device)
        return perturbed.argmax(-1).reshape(logits.shape[:2])

    @torch.no_grad()
    def generate_noise(
        self, sar: torch.Tensor, steps: int, gumbel: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Standardised optical images from SAR, as :meth:`generate` samples them (one
        decoding step of all tokens at top-p and temperature, then the diffusion decoder),
        with the randomness given: ``[B, N, V]`` Gumbel noise for the tokens and ``[B, C, H,
        W]`` starting noise for the diffusion. The same noise gives the same image,
        whatever else is in the batch."""
        tokens = self.sample_tokens(self(sar, output="logits"), gumbel)
        return self.decode_noise(tokens, noise, steps)

    def generation_settings(self) -> dict[str, float | bool]:
        """What the sampling and the decoder's bound are now (see
        :meth:`configure_generation`), as predict records them in its output."""
        config = self.tokenizer.noise_scheduler.config
        return {
            "top_p": self.generator.top_p,
            "temperature": self.generator.temps,
            "decoder_thresholding": bool(config.thresholding),
            "decoder_clip": float(config.clip_sample_range) if config.clip_sample else 0.0,
        }

    def configure_generation(
        self, *, top_p: float, temperature: float, thresholding: bool, clip: float
    ) -> None:
        """Token sampling (top-p, temperature) and how the diffusion decoder bounds each
        predicted image: TerraTorch's dynamic thresholding (``sample_max_value`` 1, so
        within +-1 standard deviation), else clipping to +-``clip`` (0: none)."""
        self.generator.top_p, self.generator.temps = top_p, temperature
        self.tokenizer.noise_scheduler.register_to_config(
            thresholding=thresholding,
            sample_max_value=1.0,
            clip_sample=not thresholding and clip > 0,
            clip_sample_range=clip or 1.0,
        )

    @torch.no_grad()
    def generate(self, sar: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
        """TerraTorch's own generation (token sampling + diffusion decoding), seeded."""
        with seeded(seed), self.autocast(sar.device):
            generated = self.generator({"S1GRD": sar}, standardize=False, timesteps=steps)
        return generated["S2L2A"].float()


def checkpoint_blocks(transformer: nn.Module) -> int:
    """Activation checkpointing of every encoder and decoder block (TerraTorch stores
    ``use_act_checkpoint`` but never reads it): in training, a block keeps only its input and
    recomputes its activations in the backward pass. The block's own ``forward`` is wrapped
    in place, so module and parameter names (LoRA targets, exported adapters) stay the same.
    Returns the number of blocks wrapped."""
    from torch.utils.checkpoint import checkpoint

    blocks = [*transformer.encoder, *transformer.decoder]
    for block in blocks:

        def forward(*args: Any, _block: nn.Module = block, _inner: Any = block.forward,
                    **kwargs: Any) -> torch.Tensor:  # fmt: skip
            if _block.training and torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
    return len(blocks)


def hold_frozen_weights(model: TerraMindSarToOptical, dtype: torch.dtype) -> int:
    """Hold the frozen parameters and floating buffers in ``dtype`` (bfloat16 halves their
    memory); trainable ones (LoRA) stay float32, and the model then computes under autocast.

    Two parts stay float32, where TerraTorch computes in float32 or exact values matter:
    normalisation layers (the diffusion decoder's ``GroupNorm32`` and the tokenizer encoder's
    last norm cast their input to float32 and need float32 weights), and the tokenizer's
    encoder and quantizer, so target tokens are exactly those of float32; the encoder runs
    only while tokens are cached and is parked on the CPU afterwards. Returns the number of
    tensors cast.
    """
    kept = {
        id(tensor)
        for module in model.modules()
        if isinstance(module, nn.LayerNorm | nn.GroupNorm)
        or module in (*model.tokenizer_encoder, model.tokenizer.quantize)
        for tensor in (*module.parameters(), *module.buffers())
    }
    cast = 0
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            if not parameter.requires_grad and castable(parameter, kept, dtype):
                parameter.data = parameter.data.to(dtype)
                cast += 1
        for name, buffer in module.named_buffers(recurse=False):
            if castable(buffer, kept, dtype):
                setattr(module, name, buffer.to(dtype))
                cast += 1
    model.compute_dtype = dtype
    return cast


def castable(tensor: torch.Tensor, kept: set[int], dtype: torch.dtype) -> bool:
    return tensor.is_floating_point() and tensor.dtype != dtype and id(tensor) not in kept


def lora_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((name, p) for name, p in model.named_parameters() if "lora_" in name)


def build_terramind(
    size: str,
    *,
    pretrained: bool,
    lora_rank: int,
    lora_alpha: float,
    lora_targets: str,
) -> TerraMindSarToOptical:
    """TerraMind ``terramind_v1_<size>_generate`` with LoRA on the transformer, tokenizer frozen.

    Only LoRA parameters require gradient. ``pretrained=True`` reads the weights from the
    local Hugging Face cache and never goes online: missing weights are a clear error.
    """
    if size not in SIZES:
        raise ConfigError(f"model.terramind: unknown size {size!r}; choose one of {SIZES}")
    registry = import_terratorch()
    if pretrained:
        require_cached_weights(size)
    with offline_hub() if pretrained else contextlib.nullcontext():
        generator = registry.build(
            f"terramind_v1_{size}_generate",
            modalities=["S1GRD", "S2L2A"],  # S2L2A as input: its encoding for encoder_only
            output_modalities=["S2L2A"],
            pretrained=pretrained,
        )
    model = TerraMindSarToOptical(generator)
    if not pretrained:
        reinitialise_zeroed_layers(model.tokenizer.decoder)
    model.requires_grad_(False)
    if lora_rank > 0:
        inject_lora(model.terramind, lora_rank, lora_alpha, lora_targets)
    return model


FINGERPRINT_SAMPLES = 4096
FINGERPRINT_TOLERANCE = 1e-5


def frozen_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every tensor training leaves alone: the parameters without
    gradient, as the model was built or loaded, and the buffers (a tied tensor under each
    of its names)."""
    tensors = [*model.named_parameters(remove_duplicate=False),
               *model.named_buffers(remove_duplicate=False)]  # fmt: skip
    return ((name, tensor) for name, tensor in tensors if not tensor.requires_grad)


def frozen_fingerprint(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Shape, and float64 sum and absolute sum of a fixed strided sample of at most
    ``FINGERPRINT_SAMPLES`` elements, of every frozen tensor (parameters without gradient,
    buffers; LoRA's ``base_layer`` left out of the names): plain values a weights-only
    checkpoint holds, computed in milliseconds where summing TerraMind whole takes seconds.

    It tells the frozen weights a checkpoint was trained with from those a changed
    ``config.toml`` rebuilds. Another size changes the shapes; another seed, or pretrained
    instead of random weights, redraws every element, which moves a sample's sum by about
    ``1 / sqrt(4096)`` of its absolute sum, against :data:`FINGERPRINT_TOLERANCE`
    (``1e-5``); the same weights rebuilt on another machine differ at most in their last
    float32 bits (vectorised initialisers), some ``1e-7`` of it.
    """
    fingerprint = {}
    for name, tensor in frozen_tensors(model):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)]
        fingerprint[name.replace(".base_layer.", ".")] = {
            "shape": list(tensor.shape),
            "sum": sample.sum(dtype=torch.float64).item(),
            "abs": sample.abs().sum(dtype=torch.float64).item(),
        }
    return fingerprint


def fingerprint_differences(
    trained: dict[str, Any], rebuilt: dict[str, dict[str, Any]]
) -> list[str]:
    """Names of the tensors whose fingerprints differ, or that only one side has; ``trained``
    comes from a checkpoint, so an entry malformed in it counts as a difference."""

    def same(saved: Any, now: dict[str, Any]) -> bool:
        try:
            scale = FINGERPRINT_TOLERANCE * now["abs"]
            return (
                saved["shape"] == now["shape"]
                and abs(saved["sum"] - now["sum"]) <= scale
                and abs(saved["abs"] - now["abs"]) <= scale
            )
        except (KeyError, TypeError):
            return False

    return [
        name
        for name in sorted(trained.keys() | rebuilt.keys(), key=str)
        if name not in trained or name not in rebuilt or not same(trained[name], rebuilt[name])
    ]


def reinitialise_zeroed_layers(decoder: nn.Module) -> int:
    """Give the diffusion decoder's zero-initialised convolutions a random initialisation.

    TerraTorch zero-initialises the last convolution of every residual and attention block
    and of the output, the usual start for training a diffusion UNet; with random weights
    the decoder then returns the same image (zeros) for any tokens, and nothing that scores
    a generation (validation, ``reinforce``'s reward) could tell two token maps apart.
    Pretrained weights replace all of this. Returns the number of layers reset.
    """
    reset = 0
    for module in decoder.modules():
        if isinstance(module, nn.Conv1d | nn.Conv2d) and not module.weight.any():
            module.reset_parameters()
            reset += 1
    return reset


def lora_config(rank: int, alpha: float, targets: str) -> peft.LoraConfig:
    """The ``peft.LoraConfig`` of TerraMind's adapters, in training and in the exported files."""
    import peft

    return peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)


def inject_lora(module: nn.Module, rank: int, alpha: float, targets: str) -> None:
    """peft LoRA adapters on the modules whose name matches ``targets`` (a full-match regex)."""
    import peft

    config = lora_config(rank, alpha, targets)
    try:
        peft.inject_adapter_in_model(config, module)
    except ValueError as error:
        raise ConfigError(f"model.lora_targets {targets!r}: {error}") from None
    for _, parameter in lora_parameters(module):
        parameter.requires_grad_(True)


@contextlib.contextmanager
def offline_hub() -> Iterator[None]:
    """Hugging Face Hub calls inside read the local cache only."""
    import huggingface_hub.constants as hub

    previous = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = previous


def require_cached_weights(size: str) -> None:
    """Refuse, naming what is missing, unless TerraMind and its S2 L2A tokenizer are cached."""
    from huggingface_hub import try_to_load_from_cache
    from terratorch.models.backbones.terramind.model.terramind_register import (
        pretrained_weights as model_weights,
    )
    from terratorch.models.backbones.terramind.tokenizer.tokenizer_register import (
        pretrained_weights as tokenizer_weights,
    )

    needed = [model_weights[f"terramind_v1_{size}"]]
    needed.append(tokenizer_weights["terramind_v1_tokenizer_s2l2a"])
    missing = [
        f"{entry['hf_hub_id']}/{entry['hf_hub_filename']}"
        for entry in needed
        if not isinstance(try_to_load_from_cache(entry["hf_hub_id"], entry["hf_hub_filename"]), str)
    ]
    if missing:
        raise ConfigError(
            "model.pretrained=true but these weights are not in the local Hugging Face cache: "
            + ", ".join(missing)
            + ". Download them on a connected machine (hf download <repo> <file>, or "
            "huggingface-cli download <repo> <file> with an older huggingface_hub) and copy "
            "the cache (HF_HOME), or train with model.pretrained=false (random weights)."
        )
