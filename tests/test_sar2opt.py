"""The sar2opt task and the five generator plugins, on the real TerraMind tiny (random weights).

Each plugin is trained through the trainer's own optimizer step on one fixed batch (an
overfit run): its loss must fall, and gradient must reach the trainable parameters on every
step. The plain approach of the seed (a loss on TerraMind's generated output) must fail
with the seed's error.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from core.config import load_config
from core.errors import ConfigError, PluginError, UsageError
from core.hookspecs import hookimpl
from core.plugins import ActivePlugin, PluginManager
from core.safe_io import load_checkpoint
from core.tasks.sar2opt.config import TerraMindSection
from core.tasks.sar2opt.data import OPTICAL_BANDS, TERRAMIND_V1
from core.tasks.sar2opt.terramind import (
    OPTICAL_RAW,
    build_terramind,
    checkpoint_blocks,
    hold_frozen_weights,
)
from core.train import Trainer
from plugins.generators.straight_through import expected_code_error, gumbel_code_error
from terraplug.testing import reset_accelerate_state
from tests.conftest import read_metrics

pytestmark = pytest.mark.slow

TOKENIZER_ENCODER = tuple(
    f"generator.tokenizer.tok_sen2l2a@224.{part}." for part in ("encoder", "quant_proj", "quantize")
)
FAST = [
    "run.task='sar2opt'",
    "train.progress='never'",
    "model.diffusion_steps=1",
    "optim.schedule='constant'",
]


class GradientProbe:
    """Records, after every step's backward, the gradient norm of each trainable tensor."""

    name = "gradient_probe"

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    @hookimpl
    def transform_gradients(self, model: nn.Module, ctx: Any) -> None:
        self.steps.append(
            {
                name: 0.0 if p.grad is None else float(p.grad.norm())
                for name, p in model.named_parameters()
                if p.requires_grad
            }
        )


class TrainsANorm:
    """Marks a norm of TerraMind's first encoder block trainable, as a plugin that trains
    weights of TerraMind's own (not adapters) would."""

    name = "trains_a_norm"

    @hookimpl
    def configure_model(self, model: nn.Module, ctx: Any) -> None:
        model.terramind.encoder[0].norm1.weight.requires_grad_(True)


def make_trainer(
    out: Path, plugin: str, *overrides: str, extra: tuple[Any, ...] = ()
) -> tuple[Trainer, GradientProbe]:
    """A trainer of ``plugin``, then ``extra`` test plugins, then a :class:`GradientProbe`."""
    config = load_config(None, [*FAST, f"run.out='{out}'", f"run.plugins=['{plugin}']", *overrides])
    probe = GradientProbe()
    plugins = PluginManager.from_names(config.run.plugins, config.plugins)
    tests = [ActivePlugin(added.name, "test", added, None) for added in (*extra, probe)]
    trainer = Trainer(config, PluginManager([*plugins.active, *tests]))
    return trainer, probe


def overfit(trainer: Trainer, steps: int, tiles: int = 2) -> tuple[list[float], list[dict]]:
    """Train ``steps`` optimizer steps on the first ``tiles`` training tiles; per-step
    losses and whatever the plugins logged at each step."""
    trainer.setup()
    ctx = trainer.ctx
    batch = default_collate([ctx.train_dataset[i] for i in range(tiles)])
    losses, logged = [], []
    for step in range(steps):
        sums = trainer.optimizer_step([batch], progress=step / steps)
        losses.append(float(sums[0] / sums[1]))
        logged.append(ctx.pop_logged())
    assert trainer.nonfinite_total == 0
    return losses, logged


def assert_gradient_every_step(probe: GradientProbe, steps: int) -> None:
    """Non-zero gradient on every step; from the second step on, in every trainable tensor.

    Zero-initialised output layers (LoRA's B, the refiner's last convolution) leave the
    tensors before them without gradient on the very first step, by design.
    """
    assert len(probe.steps) == steps
    for step, norms in enumerate(probe.steps):
        assert sum(norms.values()) > 0, f"step {step}: no gradient reached the model"
        if step:
            starved = [name for name, norm in norms.items() if norm == 0]
            assert not starved, f"step {step}: no gradient for {starved[:5]}"


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.parametrize(
    ("plugin", "steps", "overrides"),
    [
        ("teacher_forcing", 30, ["optim.lr=1e-2"]),
        ("straight_through", 40, ["optim.lr=1e-2", "plugins.straight_through.estimator='gumbel'"]),
        ("refiner", 250, ["optim.lr=5e-3", "model.lora_rank=0"]),
        ("encoder_only", 30, ["optim.lr=3e-3"]),
    ],
)
def test_plugin_overfits_a_fixed_batch(
    tmp_path: Path, plugin: str, steps: int, overrides: list[str]
) -> None:
    trainer, probe = make_trainer(tmp_path / plugin, plugin, *overrides)
    losses, _ = overfit(trainer, steps)
    assert_gradient_every_step(probe, steps)
    first, last = mean(losses[:3]), mean(losses[-3:])
    assert last <= first * 2 / 3, f"{plugin}: loss {first:.4g} -> {last:.4g} (< 1/3 drop)"


def test_straight_through_expected_loss_overfits_and_anneals_per_step(tmp_path: Path) -> None:
    """A one-epoch run still anneals: the temperature falls at every optimizer step."""
    steps = 30
    trainer, probe = make_trainer(
        tmp_path / "expected",
        "straight_through",
        "optim.lr=1e-2",
        "plugins.straight_through.estimator='expected'",
    )
    losses, logged = overfit(trainer, steps)
    assert_gradient_every_step(probe, steps)
    assert mean(losses[-3:]) <= mean(losses[:3]) * 2 / 3
    temperatures = [row["straight_through_temperature"] for row in logged]
    assert temperatures[0] == 1.0
    assert all(later < earlier for earlier, later in itertools.pairwise(temperatures))


def test_expected_code_error_is_exact_and_the_gumbel_sample_estimates_it_at_tau_1() -> None:
    """``expected`` is the exact expectation under softmax(logits / tau); the hard Gumbel
    sample's forward value is distributed as softmax(logits) whatever its temperature."""
    torch.manual_seed(0)
    logits, codebook = torch.randn(2, 3, 7), torch.randn(7, 5)
    targets = torch.randint(0, 7, (2, 3))
    p = torch.softmax(logits / 0.7, dim=-1)
    distances = (codebook[None, None] - codebook[targets][..., None, :]).square().sum(-1)
    # float32 defaults: sums of 7 terms of up to ~40 round by ~1e-6 in any order
    torch.testing.assert_close(
        expected_code_error(logits, codebook, targets, 0.7), (p * distances).sum(-1)
    )
    draws = torch.stack([gumbel_code_error(logits, codebook, targets, 0.3) for _ in range(4000)])
    tolerance = 5 * draws.std(0) / math.sqrt(len(draws))  # 5 standard errors: P(|Z| > 5) = 6e-7
    gap = (draws.mean(0) - expected_code_error(logits, codebook, targets, 1.0)).abs()
    assert bool((gap < tolerance).all()), (gap, tolerance)


def test_reinforce_raises_the_reward(tmp_path: Path) -> None:
    """The sampled reward is noisy: its mean over the last quarter of the run must beat the
    first quarter's by more than twice the standard error of the difference."""
    steps = 40
    trainer, probe = make_trainer(
        tmp_path / "reinforce",
        "reinforce",
        "optim.lr=5e-3",
        "data.tile_size=32",
        "plugins.reinforce.samples=4",
    )
    _, logged = overfit(trainer, steps, tiles=1)
    assert_gradient_every_step(probe, steps)
    rewards = np.array([row["reinforce_reward_mean"] for row in logged])
    quarter = steps // 4
    early, late = rewards[:quarter], rewards[-quarter:]
    gain = late.mean() - early.mean()
    stderr = math.sqrt(early.var(ddof=1) / quarter + late.var(ddof=1) / quarter)
    assert gain > 2 * stderr, f"reward {early.mean():.4f} -> {late.mean():.4f} (se {stderr:.4f})"
    assert all(row["reinforce_reward_var"] >= 0 for row in logged)


def test_plain_generation_loss_has_no_gradient_and_plugins_avoid_it(tmp_path: Path) -> None:
    """The seed's failure, reproduced: LoRA is attached and trainable, yet a loss on the
    generated output cannot be backpropagated. The plugins' objectives on the same model and
    batch can."""
    trainer, _ = make_trainer(tmp_path / "plain", "teacher_forcing")
    trainer.setup()
    model = trainer.accelerator.unwrap_model(trainer.model)
    batch = default_collate([trainer.ctx.train_dataset[i] for i in range(2)])
    assert any(p.requires_grad for p in model.parameters())
    generated = model.generate(batch["sar"], steps=1, seed=0)
    loss = F.l1_loss(generated, batch["optical"])
    with pytest.raises(RuntimeError, match="element 0 of tensors does not require grad"):
        loss.backward()
    for name in ("teacher_forcing", "straight_through", "reinforce", "encoder_only"):
        plugin = PluginManager.from_names([name]).active[0].obj
        if name == "encoder_only":
            plugin.setup(trainer.ctx)
        losses = plugin.training_forward(model=model, batch=batch, ctx=trainer.ctx)
        assert losses.shape == (2, 1) and losses.requires_grad, name
        model.zero_grad()
        losses.sum().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_reinforce_probes_the_decoded_error_its_reward_is_made_of(tmp_path: Path) -> None:
    """The surrogate the policy gradient trains is no level of the model's error (negative
    as often as not), so the probe set reads the decoded error: positive, and minus the
    reward the training forward draws from the same generators."""
    trainer, _ = make_trainer(tmp_path / "reinforce", "reinforce", "data.tile_size=32")
    trainer.setup()
    model = trainer.accelerator.unwrap_model(trainer.model)
    batch = default_collate([trainer.ctx.train_dataset[i] for i in range(2)])
    plugin = PluginManager.from_names(["reinforce"]).active[0].obj
    with torch.no_grad():
        torch.manual_seed(3)
        errors = plugin.probe_losses(model=model, batch=batch, ctx=trainer.ctx)
        torch.manual_seed(3)
        plugin.training_forward(model=model, batch=batch, ctx=trainer.ctx)
    assert errors.shape == (2,) and bool((errors > 0).all())
    [reward] = trainer.ctx.logged_values()["reinforce_reward_mean"]
    # the same float32 errors averaged in another order: a few ulps of ~1
    assert reward == pytest.approx(-errors.mean().item(), rel=1e-6)


@pytest.fixture(scope="module")
def terramind() -> nn.Module:
    """TerraMind tiny with the default LoRA adapters (random weights)."""
    return build_terramind(
        "tiny",
        pretrained=False,
        lora_rank=8,
        lora_alpha=16.0,
        lora_targets=TerraMindSection().lora_targets,
    )


def test_token_logits_come_in_raster_order_whatever_order_roar_visits(
    terramind: nn.Module,
) -> None:
    """ROAR shuffles the decoder's query order at random; the logits handed to the plugins
    must not depend on that shuffle, or token i would be scored against target j."""
    # In float64: another query order is another summation order, and the float32 rounding
    # that ~300 M parameters amplify varies with the CPU's kernels (up to 3.5e-3 in this
    # model's logits). In float64 the logits (up to ~0.7) move by ~1e-15, so forward's
    # cast to float32 leaves them at most one float32 ulp apart: rtol float32 epsilon, and
    # atol 1e-12 for logits near 0
    model = copy.deepcopy(terramind).double()
    sar = torch.randn(2, 2, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(1)
        first = model(sar, output="logits")
        torch.manual_seed(2)
        second = model(sar, output="logits")
    assert first.shape == (2, 16, 15360)
    torch.testing.assert_close(first, second, rtol=torch.finfo(torch.float32).eps, atol=1e-12)


def test_gradient_checkpointing_recomputes_blocks_and_keeps_the_gradient(
    terramind: nn.Module,
) -> None:
    """Checkpointed blocks run their forward again in the backward pass; the LoRA gradients
    are those of the plain model, and parameter names (LoRA targets) do not change."""
    model = copy.deepcopy(terramind).double()  # the module's other tests use the plain blocks
    sar = torch.randn(1, 2, 64, 64, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    calls = []
    hook = model.terramind.encoder[0].attn.register_forward_hook(lambda *_: calls.append(1))

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(1)
        model(sar).float().logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    assert len(calls) == 1 and plain
    blocks = len(model.terramind.encoder) + len(model.terramind.decoder)
    assert checkpoint_blocks(model.terramind) == blocks
    checkpointed = gradients()
    assert len(calls) == 3  # forward, then recomputed in backward
    assert [n for n, _ in model.named_parameters()] == names
    hook.remove()
    # float64: the recomputed blocks run the same kernels with the same RNG state, so the
    # gradients (up to 4e-4) can differ only where an accumulation order changes, by ~1e-16
    # relative; rtol 1e-9 and atol 1e-12 (zero gradients) leave a margin of 1e3 or more
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-9, atol=1e-12)


def test_bf16_frozen_weights_keep_lora_in_fp32_and_the_loss_close(terramind: nn.Module) -> None:
    """Frozen weights in bfloat16, LoRA, norms and the tokenizer's encoder in float32; the
    teacher_forcing loss and its LoRA gradients stay close to float32's on the same batch.

    Tolerance: bfloat16 keeps 8 significant bits, a relative rounding of 2^-9 (0.2 %) per
    weight and per autocast matmul input; averaged over positions the cross-entropy moves far
    less, so 1 % of the loss and a gradient cosine of 0.99 leave room, while a wrong cast
    (a layer dropped, the encoder's tokens changed) moves the loss by far more."""
    half = copy.deepcopy(terramind)
    assert hold_frozen_weights(half, torch.bfloat16) > 0
    for name, module in half.named_modules():
        norm = isinstance(module, nn.LayerNorm | nn.GroupNorm)
        for p in module.parameters(recurse=False):
            fp32 = norm or p.requires_grad or f"{name}.".startswith(TOKENIZER_ENCODER)
            assert p.dtype == (torch.float32 if fp32 else torch.bfloat16), name
    assert half.terramind.encoder[0].attn.qkv.base_layer.weight.dtype == torch.bfloat16
    assert half.tokenizer.decoder.out[-1].weight.dtype == torch.bfloat16  # diffusion decoder

    sar, optical = torch.randn(2, 2, 64, 64), torch.randn(2, 12, 64, 64)
    targets = terramind.target_tokens(optical)
    assert torch.equal(half.target_tokens(optical), targets)

    def step(model: nn.Module) -> tuple[float, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(1)
        logits = model(sar)
        assert logits.dtype == torch.float32
        loss = F.cross_entropy(logits.transpose(1, 2), targets)
        loss.backward()
        grads = [p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad]
        return loss.item(), torch.cat(grads)

    loss32, grad32 = step(terramind)
    loss16, grad16 = step(half)
    assert math.isfinite(loss16) and grad16.abs().sum() > 0
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    assert F.cosine_similarity(grad16, grad32, dim=0) > 0.99
    terramind.zero_grad()


def test_frozen_dtype_comes_from_the_config_and_refuses_other_values() -> None:
    from core.tasks.sar2opt.task import SarToOptical

    with pytest.raises(ConfigError, match="frozen_dtype"):
        load_config(None, [*FAST, "model.frozen_dtype='fp16'"])
    model = SarToOptical().build_model(load_config(None, [*FAST, "model.frozen_dtype='bf16'"]))
    assert model.compute_dtype == torch.bfloat16
    assert model.terramind.encoder[0].mlp.fc1.base_layer.weight.dtype == torch.bfloat16
    assert model.terramind.encoder[0].mlp.fc1.lora_A.default.weight.dtype == torch.float32


def test_lora_sits_on_transformer_blocks_and_the_tokenizer_is_frozen(
    terramind: nn.Module,
) -> None:
    model = terramind
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert not any(name.startswith("generator.tokenizer") for name in trainable)
    assert any(".encoder.0.attn.qkv.lora_A" in name for name in trainable)
    assert any(".decoder.0.cross_attn" in name for name in trainable)
    assert any(".to_logits.lora_" in name for name in trainable)  # the token-logit head
    assert not any("encoder_embeddings" in name for name in trainable)  # patch embeddings
    # about 0.44 M adapter weights on tiny (r=8) of ~300 M parameters
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0.3e6 < count < 0.6e6


def test_encoder_only_trains_the_encoder_adapters_alone(tmp_path: Path) -> None:
    trainer, _ = make_trainer(tmp_path / "enc", "encoder_only")
    trainer.setup()
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(".encoder." in n and "lora_" in n for n in trainable)


def stored_key(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / "cache" / f"{name}.npy.key.json").read_text())


def test_refiner_caches_generations_and_freezes_terramind(tmp_path: Path) -> None:
    """The generations are cached per tile; re-started into the same folder with other
    diffusion steps, the refiner generates again instead of reading the old ones."""
    out = tmp_path / "ref"
    trainer, _ = make_trainer(out, "refiner", "data.tile_size=32")
    trainer.setup()
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("refiner.") for n in trainable)
    cache = np.load(out / "cache" / "refiner_generated.npy")
    assert cache.shape[0] == len(trainer.ctx.train_dataset)
    assert stored_key(out, "refiner_generated")["diffusion_steps"] == 1

    trainer.release_run_dir()  # the re-start below claims the same folder
    reset_accelerate_state()
    again, _ = make_trainer(out, "refiner", "data.tile_size=32", "model.diffusion_steps=2")
    again.setup()
    assert stored_key(out, "refiner_generated")["diffusion_steps"] == 2
    terramind = again.accelerator.unwrap_model(again.model).terramind_generator
    sar = again.ctx.train_dataset[0]["sar"].unsqueeze(0)
    # float32 defaults: the cache was generated tile by tile with this seed, the same kernels
    # on the same input in this process, so at most a last-bit difference
    torch.testing.assert_close(
        torch.from_numpy(np.load(out / "cache" / "refiner_generated.npy")[:1]),
        terramind.generate(sar, 2, again.config.run.seed),
    )


def test_encoder_only_caches_its_targets_keyed_by_the_frozen_weights(tmp_path: Path) -> None:
    """The un-adapted encodings of the targets are computed once into the run folder: a
    set-up after the adapters trained reads them back, and so does one after another
    plugin trained a weight of TerraMind's own (a norm); one after a frozen weight changed
    computes them again."""
    from plugins.generators.encoder_only import adapters_disabled

    out = tmp_path / "enc"
    trainer, _ = make_trainer(out, "encoder_only", "data.tile_size=32", extra=(TrainsANorm(),))
    trainer.setup()
    plugin = next(p.obj for p in trainer.ctx.plugins.active if p.name == "encoder_only")
    model = trainer.accelerator.unwrap_model(trainer.model)
    dataset = trainer.ctx.train_dataset
    path = out / "cache" / "encoder_targets.npy"
    stored = path.stat()
    optical = torch.stack([dataset[i]["optical"] for i in (0, len(dataset) - 1)])
    with adapters_disabled(model), torch.no_grad():
        expected = model.encode(optical, OPTICAL_RAW)
    # float32, the same kernels on the same tiles in this process, in batches of another
    # size: at most a few ulps of the encodings (about 1)
    torch.testing.assert_close(torch.from_numpy(plugin.targets[[0, len(dataset) - 1]]), expected)
    assert stored_key(out, "encoder_targets")["what"] == "encoder_targets"

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name and parameter.requires_grad:
                parameter.add_(0.1)  # what training does to the adapters
    plugin.setup(trainer.ctx)
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (stored.st_ino, stored.st_mtime_ns)

    key = stored_key(out, "encoder_targets")
    with torch.no_grad():
        model.terramind.encoder[0].norm1.weight.mul_(1.5)  # TrainsANorm's training, resumed
    plugin.setup(trainer.ctx)
    assert stored_key(out, "encoder_targets") == key
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (stored.st_ino, stored.st_mtime_ns)

    with torch.no_grad():
        model.terramind.encoder[0].mlp.fc1.base_layer.weight.add_(0.1)  # other frozen weights
    plugin.setup(trainer.ctx)
    assert path.stat().st_ino != stored.st_ino
    with adapters_disabled(model), torch.no_grad():
        changed = model.encode(optical, OPTICAL_RAW)
    torch.testing.assert_close(torch.from_numpy(plugin.targets[[0, len(dataset) - 1]]), changed)


def test_target_tokens_are_cached_per_tile_and_keyed_by_the_tokenizer(tmp_path: Path) -> None:
    """Cached tokens are the tokenizer's; a run re-started into the same folder with another
    model size (another tokenizer) tokenizes again rather than train on the old labels."""
    out = tmp_path / "tok"
    tokens = {}
    for size in ("tiny", "small"):
        trainer, _ = make_trainer(out, "teacher_forcing", f"model.terramind='{size}'")
        trainer.setup()
        model = trainer.accelerator.unwrap_model(trainer.model)
        dataset = trainer.ctx.train_dataset
        tokens[size] = torch.from_numpy(np.load(out / "cache" / "target_tokens.npy"))
        assert tokens[size].shape[0] == len(dataset)
        assert stored_key(out, "target_tokens")["model"] == f"terramind_v1_{size}"
        optical = torch.stack([dataset[i]["optical"] for i in (0, len(dataset) - 1)])
        assert torch.equal(tokens[size][[0, len(dataset) - 1]], model.target_tokens(optical))
        trainer.release_run_dir()  # the next size re-starts into the same folder
        reset_accelerate_state()
    assert not torch.equal(tokens["tiny"], tokens["small"])


def test_after_setup_training_and_validation_never_run_the_tokenizer_encoder(
    tmp_path: Path,
) -> None:
    """Training and validation targets are tokenized once at set-up; after it the encoder is
    parked on the CPU and no training step or validation pass runs it. The validation tokens
    are the tokenizer's, tile by tile, so validation scores are those of tokenizing each
    tile."""
    out = tmp_path / "park"
    trainer, probe = make_trainer(out, "teacher_forcing", "data.tile_size=32")
    trainer.setup()
    ctx = trainer.ctx
    model = trainer.accelerator.unwrap_model(trainer.model)
    calls = []
    hook = model.tokenizer.encoder.register_forward_pre_hook(lambda *_: calls.append(1))
    batch = default_collate([ctx.train_dataset[i] for i in range(2)])
    sums = trainer.optimizer_step([batch], progress=0.0)
    assert math.isfinite(float(sums[0] / sums[1])) and trainer.nonfinite_total == 0
    assert_gradient_every_step(probe, 1)
    ctx.epoch = 1
    row = trainer.validate()
    assert math.isfinite(row["val_token_ce"]) and math.isfinite(row["val_ceiling_l1"])
    assert calls == []
    hook.remove()
    val = trainer.val_dataset
    cached = torch.from_numpy(np.load(out / "cache" / "val_target_tokens.npy"))
    per_tile = torch.cat([model.target_tokens(val[i]["optical"][None]) for i in range(len(val))])
    assert torch.equal(cached, per_tile)


def test_validation_scores_every_tile_alike_whatever_the_batch_size(tmp_path: Path) -> None:
    """Seeds per tile: batch size 1 and 2 give identical metrics. The cheap deterministic
    scores and the tokenizer's ceiling are there, the ceiling computed once."""
    trainer, _ = make_trainer(tmp_path / "val", "teacher_forcing", "data.val_fraction=0.1")
    trainer.setup()
    trainer.ctx.epoch = 1
    assert len(trainer.val_dataset) >= 3  # an odd count leaves a short last batch
    rows = {}
    for batch_size in (2, 1):
        trainer.config.data.batch_size = batch_size
        rows[batch_size] = trainer.validate()
    assert rows[1] == rows[2]
    row = rows[1]
    for key in ("val_token_ce", "val_token_accuracy", "val_ceiling_l1", "val_ceiling_psnr",
                "val_spectral_angle_deg", "val_ndvi_mae"):  # fmt: skip
        assert math.isfinite(row[key]), key
    assert 0 <= row["val_token_accuracy"] <= 1 and row["val_token_ce"] > 0
    assert list(row["val_l1_by_band"]) == list(OPTICAL_BANDS)
    # approx's rel 1e-6: float32 means of non-negative terms (no cancellation) round by ~1e-7
    assert np.mean(list(row["val_l1_by_band"].values())) == pytest.approx(row["val_l1"])
    assert list(trainer.ctx.task.ceilings) == [1]


def test_decoder_thresholding_bounds_images_to_one_standard_deviation(
    terramind: nn.Module,
) -> None:
    """TerraTorch's default thresholding keeps every generated value within +-1 (standardised
    units: no dark water or shadow); the project's default clips at +-3 instead."""
    tokens = torch.randint(0, 15360, (1, 16))
    bounds = {}
    try:
        for thresholding in (True, False):
            terramind.configure_generation(
                top_p=0.8, temperature=1.0, thresholding=thresholding, clip=3.0
            )
            bounds[thresholding] = float(terramind.decode(tokens, (64, 64), 1, 0).abs().max())
    finally:
        terramind.configure_generation(top_p=0.8, temperature=1.0, thresholding=False, clip=3.0)
    # 1e-6: a few float32 ulps (1.2e-7 above 1) of the scheduler's arithmetic after its clamp
    assert bounds[True] <= 1.0 + 1e-6
    assert 1.0 < bounds[False] <= 3.0 + 1e-6


def test_decode_noise_is_terratorchs_pipeline_with_the_noise_given(terramind: nn.Module) -> None:
    """Predict hands the diffusion its starting noise; given the noise TerraTorch's pipeline
    draws from a seeded generator, the image is exactly the pipeline's (one image at a time:
    a batch may sum in another order)."""
    tokens = torch.randint(0, 15360, (2, 16))
    for steps in (1, 3):
        for one in tokens:
            noise = torch.randn((1, 12, 64, 64), generator=torch.Generator().manual_seed(5))
            theirs = terramind.tokenizer.decode_tokens(
                one.reshape(1, 4, 4), image_size=(64, 64), timesteps=steps,
                generator=torch.Generator().manual_seed(5),
            )  # fmt: skip
            assert torch.equal(terramind.decode_noise(one[None], noise, steps), theirs)


def test_sample_tokens_draws_as_terratorchs_sampler(terramind: nn.Module) -> None:
    """The Gumbel-max draw of predict follows TerraTorch's sampling rule: top-p on the
    logits, then softmax at the temperature; the most likely token at temperature 0."""
    probabilities = torch.tensor([0.5, 0.3, 0.2, 1e-12, 1e-12])  # any vocabulary size
    logits = probabilities.log().expand(1, 4000, -1)  # 4000 positions, one distribution
    noise = torch.empty(1, 4000, 5).exponential_(generator=torch.Generator().manual_seed(0))
    gumbel = -noise.log()
    try:
        for top_p, kept in ((0.0, 3), (0.6, 2)):  # 0.6: the nucleus is the first two tokens
            terramind.configure_generation(
                top_p=top_p, temperature=0.5, thresholding=False, clip=3.0
            )
            counts = torch.bincount(terramind.sample_tokens(logits, gumbel)[0], minlength=5)
            wanted = torch.softmax(probabilities[:kept].log() / 0.5, dim=0)
            assert counts[kept:].sum() == 0
            # 4000 draws: a share's standard error is at most 0.008, so 0.04 is five of them
            torch.testing.assert_close(counts[:kept] / 4000, wanted, atol=0.04, rtol=0)
        terramind.configure_generation(top_p=0.8, temperature=1e-11, thresholding=False, clip=3.0)
        assert (terramind.sample_tokens(logits, gumbel) == 0).all()
    finally:
        terramind.configure_generation(top_p=0.8, temperature=1.0, thresholding=False, clip=3.0)


def test_temperature_zero_is_greedy_whatever_the_seed(terramind: nn.Module) -> None:
    """``model.temperature = 0`` (and predict's ``--temperature 0``) picks the most likely
    token at every position: the tokens drawn with two seeds' noise are the logits' argmax;
    a negative temperature is refused naming the key."""
    from core.tasks.sar2opt.predict import SceneNoise

    assert load_config(None, [*FAST, "model.temperature=0"]).model.temperature == 0
    with pytest.raises(ConfigError, match="temperature"):
        load_config(None, [*FAST, "model.temperature=-1"])
    torch.manual_seed(0)
    logits = terramind(torch.randn(1, 2, 64, 64), output="logits")
    vocabulary = logits.shape[-1]
    drawn = [torch.from_numpy(SceneNoise(seed, 16, 12, vocabulary).row(0, 16)[0])[None]
             for seed in (0, 1)]  # fmt: skip
    try:
        terramind.configure_generation(top_p=0.8, temperature=0.0, thresholding=False, clip=3.0)
        greedy = [terramind.sample_tokens(logits, gumbel) for gumbel in drawn]
        terramind.configure_generation(top_p=0.8, temperature=1.0, thresholding=False, clip=3.0)
        sampled = [terramind.sample_tokens(logits, gumbel) for gumbel in drawn]
    finally:
        terramind.configure_generation(top_p=0.8, temperature=1.0, thresholding=False, clip=3.0)
    assert torch.equal(greedy[0], logits.argmax(-1)) and torch.equal(greedy[1], greedy[0])
    assert not torch.equal(sampled[0], sampled[1])  # the seed matters when sampling


def test_the_docs_state_the_thresholding_bounds_in_reflectance() -> None:
    """±1 standard deviation of TerraMind's pretraining statistics, in reflectance: the dark
    bound of NIR and the bright bounds of red and NIR that docs/terramind.md gives."""
    docs = Path(__file__).resolve().parents[1] / "docs" / "terramind.md"
    text = " ".join(docs.read_text().split())
    mean = dict(zip(OPTICAL_BANDS, TERRAMIND_V1.optical_mean / 10_000, strict=True))
    std = dict(zip(OPTICAL_BANDS, TERRAMIND_V1.optical_std / 10_000, strict=True))
    red, nir = mean["B04"] + std["B04"], mean["B08"] + std["B08"]
    assert f"NIR reflectance cannot fall below about {mean['B08'] - std['B08']:.2f}" in text
    assert f"B04 (red) is at most {red:.2f} reflectance and B08 (NIR) at most {nir:.2f}" in text


def test_sar2opt_without_a_generator_plugin_says_which_to_use(tmp_path: Path) -> None:
    config = load_config(None, [*FAST, f"run.out='{tmp_path / 'none'}'"])
    with pytest.raises(UsageError, match="teacher_forcing,straight_through,reinforce"):
        Trainer(config, PluginManager([])).fit()


def test_generator_plugin_on_dem_sr_names_the_task(tmp_path: Path, procedural_dir: Path) -> None:
    config = load_config(
        None,
        [
            "train.progress='never'",
            f"data.dir='{procedural_dir}'",
            f"run.out='{tmp_path / 'dem'}'",
            "run.epochs=1",
        ],
    )
    with pytest.raises(PluginError, match="--task sar2opt"):
        Trainer(config, PluginManager.from_names(["teacher_forcing"])).fit()


def test_pretrained_without_cached_weights_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UsageError, match=r"ibm-esa-geospatial/TerraMind-1\.0-tiny") as error:
        build_terramind("tiny", pretrained=True, lora_rank=8, lora_alpha=16.0, lora_targets=".*qkv")
    # the pinned huggingface_hub installs only `hf`; older ones only `huggingface-cli`
    assert "hf download <repo> <file>" in str(error.value)
    assert "huggingface-cli download <repo> <file>" in str(error.value)


def test_cli_run_writes_the_run_folder_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m core.run --task sar2opt``: validation on the six real BigEarthNet pairs,
    named on the console; metrics with generation scores, the comparison PNG, a checkpoint
    without the frozen 300 M parameters, and a resume that continues."""
    from core.run import main

    out = tmp_path / "cli"
    common = ["--task", "sar2opt", "--out", str(out), "--set", "model.diffusion_steps=1"]
    common += ["--set", "train.progress='never'", "--set", "train.max_steps_per_epoch=2"]
    assert main([*common, "--plugins", "teacher_forcing", "--epochs", "1"]) == 0
    console = capsys.readouterr().out
    assert "40 training / 6 validation tiles" in console
    assert "6 real BigEarthNet S1 GRD / S2 L2A pairs" in console
    for place in ("Austria", "Ireland", "Finland", "Portugal", "S2A_MSIL2A_20170613T101031_87_48"):
        assert place in console
    rows = read_metrics(out)
    assert {"val_l1", "val_psnr", "val_ssim", "val_loss"} <= set(rows[0])
    assert 0 < rows[0]["val_ssim"] <= 1 and rows[0]["val_psnr"] > 0
    assert (out / "sar_generated_target.png").stat().st_size > 0
    state = load_checkpoint(out / "checkpoint.pt")
    assert all("lora_" in key or not key.endswith("weight") for key in state["model"])
    assert (out / "checkpoint.pt").stat().st_size < 10 * 2**20  # adapters, not 1.2 GB
    assert main(["--resume", str(out), "--epochs", "2"]) == 0
    assert [row["epoch"] for row in read_metrics(out)] == [1, 2]
