"""``reinforce``: policy gradient through TerraMind's token sampling (REINFORCE with RLOO).

Each input gets ``samples`` token maps drawn from TerraMind's logits. Each map is decoded
by the real diffusion decoder (with fixed noise, so the reward measures the tokens and not
the noise) and scored: reward = minus the mean L1 error against the target over its valid
pixels, per band in standardised units (so every band counts alike and nothing saturates). The
leave-one-out baseline (the mean reward of the other samples of the same input) cuts the
estimator's variance without biasing it; advantages are divided by the spread of that
input's rewards, and a small entropy bonus keeps the policy from collapsing. The gradient is
``-mean_k A_k * grad log p(tokens_k) - entropy_weight * grad H``.

The policy is not the sampler generation deploys: it samples among each position's
``top_k`` tokens (renormalised), where TerraTorch samples with top-p 0.8, and the scaling by
the reward spread changes each input's step size. So this is a training signal on decoded
pixels, not an unbiased gradient of the deployed sampler's expected reward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import torch
from torch import nn
from torch.distributions import Categorical

from core import validators as check
from core.hookspecs import Batch, hookimpl
from core.plugins import Plugin
from core.tasks.sar2opt.metrics import masked_mean
from plugins.generators import terramind_of

if TYPE_CHECKING:
    from core.context import RunContext


@attrs.frozen
class ReinforceConfig:
    """``[plugins.reinforce]``."""

    samples: int = attrs.field(default=4, validator=attrs.validators.ge(2))
    """Token maps per input (at least 2: the baseline leaves one out)."""
    top_k: int = attrs.field(default=8, validator=attrs.validators.ge(0))
    """Sample among each position's ``top_k`` most likely tokens (0: all 15,360), as
    generation filters with top-p: a policy over the whole vocabulary rarely draws a token
    twice, so its gradient estimate would be mostly noise."""
    diffusion_steps: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    """Decoding steps per sample; the reward is only as sharp as the decoding."""
    entropy_weight: float = attrs.field(default=0.03, validator=check.non_negative)
    """Bonus for the policy's entropy: it keeps sampling diverse, so the baseline never
    cancels every advantage (a collapsed policy draws k equal samples and learns nothing)."""
    noise_seed: int = attrs.field(default=0, validator=check.seed)
    """Seed of the decoder's diffusion noise, the same at every step."""


class Reinforce(Plugin):
    """REINFORCE with a leave-one-out baseline; logs the reward's mean and variance."""

    name = "reinforce"
    Config = ReinforceConfig

    def sample(
        self, model: nn.Module, batch: Batch, ctx: RunContext
    ) -> tuple[Categorical, torch.Tensor, torch.Tensor]:
        """The policy, the log-probability of each of ``samples`` token maps per input and
        their decoded errors, both ``[k, B]``."""
        terramind = terramind_of(model, ctx, self.name)
        k = self.config.samples
        logits = model(batch["sar"], output="logits").float()  # [B, N, V]
        top_k = self.config.top_k or logits.shape[-1]
        candidates = logits.topk(min(top_k, logits.shape[-1]), dim=-1)  # values, ids
        policy = Categorical(logits=candidates.values)
        choice = policy.sample((k,))  # [k, B, N] positions among the candidates
        log_prob = policy.log_prob(choice).sum(-1)  # [k, B]
        tokens = candidates.indices.expand(k, -1, -1, -1).gather(-1, choice.unsqueeze(-1))
        tokens = tokens.squeeze(-1)  # [k, B, N] token ids
        with torch.no_grad():
            size = tuple(batch["sar"].shape[-2:])
            decoded = terramind.decode(
                tokens.flatten(0, 1), size, self.config.diffusion_steps, self.config.noise_seed
            )
            target = batch["optical"].repeat(k, 1, 1, 1)
            error = masked_mean((decoded - target).abs(), batch["mask"].repeat(k, 1, 1, 1))
        return policy, log_prob, error.reshape(k, -1)

    @hookimpl
    def probe_losses(self, model: nn.Module, batch: Batch, ctx: RunContext) -> torch.Tensor:
        """The decoded error the reward is made of, per input over its samples: the
        surrogate's level says nothing of the model (it is about as often negative)."""
        return self.sample(model, batch, ctx)[2].mean(0)

    @hookimpl
    def training_forward(self, model: nn.Module, batch: Batch, ctx: RunContext) -> torch.Tensor:
        k = self.config.samples
        policy, log_prob, error = self.sample(model, batch, ctx)
        with torch.no_grad():
            reward = -error  # [k, B]
            baseline = (reward.sum(0, keepdim=True) - reward) / (k - 1)
        ctx.log("reinforce_reward_mean", reward.mean().item())
        ctx.log("reinforce_reward_var", reward.var().item())
        # scaled by the spread of each input's rewards, so the step size does not depend on
        # the reward's units and the entropy bonus keeps a fixed relative weight
        advantage = (reward - baseline) / (reward.std(0, keepdim=True) + 1e-8)
        surrogate = -(advantage * log_prob).mean(0) / policy.batch_shape[-1]  # per position
        entropy = policy.entropy().mean(-1)  # [B], per position
        ctx.log("reinforce_entropy", entropy.mean().item())
        return (surrogate - self.config.entropy_weight * entropy).unsqueeze(1)
