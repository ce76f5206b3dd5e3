"""The sar2opt task and the five generator plugins, on the real TerraMind tiny (random weights).

Each plugin is trained through the trainer's own optimizer step on one fixed batch (an
overfit run): its loss must fall, and gradient must reach the trainable parameters on every
step. The plain approach of the seed (a loss on TerraMind's generated output) must fail
with the seed's error.
"""

from __future__ import annotations

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
from core.errors import PluginError, UsageError
from core.hookspecs import hookimpl
from core.models.terramind import build_terramind
from core.plugins import ActivePlugin, PluginManager
from core.train import Trainer
from tests.conftest import read_metrics

pytestmark = pytest.mark.slow

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


def make_trainer(out: Path, plugin: str, *overrides: str) -> tuple[Trainer, GradientProbe]:
    config = load_config(None, [*FAST, f"run.out='{out}'", f"run.plugins=['{plugin}']", *overrides])
    probe = GradientProbe()
    plugins = PluginManager.from_names(config.run.plugins, config.plugins)
    trainer = Trainer(
        config, PluginManager([*plugins.active, ActivePlugin(probe.name, "test", probe, None)])
    )
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
        ("straight_through", 40, ["optim.lr=1e-2"]),
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


@pytest.fixture(scope="module")
def terramind() -> nn.Module:
    """TerraMind tiny with the default LoRA adapters (random weights)."""
    return build_terramind(
        "tiny",
        pretrained=False,
        lora_rank=8,
        lora_alpha=16.0,
        lora_targets=load_config().model.lora_targets,
    )


def test_token_logits_come_in_raster_order_whatever_order_roar_visits(
    terramind: nn.Module,
) -> None:
    """ROAR shuffles the decoder's query order at random; the logits handed to the plugins
    must not depend on that shuffle, or token i would be scored against target j."""
    sar = torch.randn(2, 2, 64, 64)
    with torch.no_grad():
        torch.manual_seed(1)
        first = terramind(sar, output="logits")
        torch.manual_seed(2)
        second = terramind(sar, output="logits")
    assert first.shape == (2, 16, 15360)
    torch.testing.assert_close(first, second, rtol=1e-4, atol=1e-4)


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


def test_refiner_caches_generations_and_freezes_terramind(tmp_path: Path) -> None:
    trainer, _ = make_trainer(tmp_path / "ref", "refiner", "data.tile_size=32")
    trainer.setup()
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("refiner.") for n in trainable)
    cache = torch.load(tmp_path / "ref" / "cache" / "refiner_generated.pt", weights_only=True)
    assert cache["generated"].shape[0] == len(trainer.ctx.train_dataset)


def test_target_tokens_are_cached_once_per_tile(tmp_path: Path) -> None:
    trainer, _ = make_trainer(tmp_path / "tok", "teacher_forcing")
    trainer.setup()
    model = trainer.accelerator.unwrap_model(trainer.model)
    dataset = trainer.ctx.train_dataset
    cache = torch.load(tmp_path / "tok" / "cache" / "target_tokens.pt", weights_only=True)
    assert cache["names"] == list(dataset.names)
    optical = torch.stack([dataset[i]["optical"] for i in (0, len(dataset) - 1)])
    assert torch.equal(cache["tokens"][[0, len(dataset) - 1]], model.target_tokens(optical))


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
    with pytest.raises(UsageError, match=r"ibm-esa-geospatial/TerraMind-1\.0-tiny"):
        build_terramind("tiny", pretrained=True, lora_rank=8, lora_alpha=16.0, lora_targets=".*qkv")


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
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert all("lora_" in key or not key.endswith("weight") for key in state["model"])
    assert (out / "checkpoint.pt").stat().st_size < 10 * 2**20  # adapters, not 1.2 GB
    assert main(["--resume", str(out), "--epochs", "2"]) == 0
    assert [row["epoch"] for row in read_metrics(out)] == [1, 2]
