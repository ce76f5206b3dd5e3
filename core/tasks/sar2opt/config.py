"""sar2opt's config sections: ``[model]`` (TerraMind), an empty ``[loss]`` (each generator
plugin defines its own objective and options) and ``[pairs]`` (how pairs are read)."""

from __future__ import annotations

import attrs

from core import validators as check


@attrs.define
class TerraMindSection:
    """TerraMind's size, weights, LoRA adapters and generation."""

    terramind: str = attrs.field(
        default="tiny", validator=attrs.validators.in_(("tiny", "small", "base", "large"))
    )
    pretrained: bool = False
    """Load TerraMind's weights from the local Hugging Face cache (never downloads)."""
    lora_rank: int = attrs.field(default=8, validator=check.non_negative_int)
    """0 trains no adapters (``refiner`` needs none)."""
    lora_alpha: float = attrs.field(default=16.0, validator=check.positive)
    lora_targets: str = (
        r".*((encoder|decoder)\.\d+\.(attn|self_attn|cross_attn|mlp)\.(qkv|q|kv|proj|fc1|fc2)"
        r"|decoder_embeddings\..*\.to_logits)"
    )
    """Full-match regex over TerraMind's module names. Default: the transformer blocks and the
    token-logit head (a bare ``proj`` would also wrap the patch embeddings). With random
    weights the frozen head's small norm caps the logits, so adapters on the blocks alone
    cannot make any token likely."""
    diffusion_steps: int = attrs.field(default=2, validator=check.positive_int)
    """Diffusion decoding steps of validation generation (TerraMind's default is 50)."""
    final_diffusion_steps: int = attrs.field(default=0, validator=check.non_negative_int)
    """Diffusion steps of the last epoch's validation and of ``core.predict``; 0: as above."""
    top_p: float = attrs.field(default=0.8, validator=check.fraction)
    """Generation's nucleus (top-p) token sampling; 0 samples from all tokens."""
    temperature: float = attrs.field(default=1.0, validator=check.non_negative)
    """Generation's token sampling temperature; 0 is greedy: the most likely token at every
    position (TerraTorch's argmax), whatever the seed."""
    decoder_thresholding: bool = False
    """TerraTorch's default (true): dynamic thresholding with ``sample_max_value`` 1, which
    bounds every generated image to +-1 standard deviation of the pretraining data, so no
    dark pixels (water, shadow). False clips to +-``decoder_clip`` instead."""
    gradient_checkpointing: bool = False
    """Recompute TerraMind's transformer blocks in the backward pass instead of keeping their
    activations: less memory for about one more forward's time."""
    frozen_dtype: str = attrs.field(
        default="fp32", validator=attrs.validators.in_(("fp32", "bf16"))
    )
    """``bf16`` holds TerraMind's frozen weights in bfloat16 (about half their memory) and
    computes under autocast; LoRA adapters and the tokenizer's encoder stay float32."""
    decoder_clip: float = attrs.field(default=3.0, validator=check.non_negative)
    """Without thresholding: clip each predicted image to +-this many standard deviations
    (0: no clipping)."""


@attrs.define
class NoLossSection:
    """No loss weights: the single ``objective`` component is the generator plugin's own."""


@attrs.define
class PairsSection:
    """``[pairs]``: how a ``--data`` folder of SAR/optical pairs is read (docs/data-format.md,
    "SAR -> optical pairs"); the built-in pairs ignore it."""

    crops: int = attrs.field(default=3, validator=check.non_negative_int)
    """Training crops per window that has room to move (a pair larger than one window):
    each starts up to half a window away, drawn once from ``data.split_seed``; 0: the
    windows alone."""
    flips: bool = True
    """Flip half of the crops north-south: the radar still looks east or west (range
    geometry kept); east-west flips and rotations are never drawn."""
    min_valid: float = attrs.field(
        default=0.9, validator=[check.fraction, attrs.validators.gt(0.0)]
    )
    """Share of valid pixels (in both files, every band) a window needs; invalid pixels of
    the windows kept are masked."""
    l2a_offset: float = attrs.field(default=0.0, validator=check.non_negative)
    """The DN of reflectance 0, subtracted from every S2 L2A DN before use: 1000 undoes ESA's
    ``BOA_ADD_OFFSET`` (-1000) of processing baseline 04.00 and later (products since 25
    January 2022)."""
