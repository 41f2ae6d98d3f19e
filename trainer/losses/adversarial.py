"""Adversarial loss: a discriminator with its own optimizer, switched on after a warm-up.

Two discriminators (see ``discriminators``) and two objectives: hinge, or the non-saturating
logistic loss. The generator term is computed with the discriminator's weights frozen so that
the student's backward pass leaves no gradients in them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import LatentDiffusion, capture_outputs, random_timesteps
from .discriminators import FeatureHeads, UNetDiscriminator
from .registry import LossConfig, LossContext, Optimize, OwnModel, StudentLoss, StudentStep, Terms, at_least, timestep

__all__ = ["AdversarialLoss", "AdversarialLossConfig", "AdversarialTerm", "discriminator_loss", "generator_loss"]

Objective = Literal["hinge", "non_saturating"]
Discriminator = Literal["pixel_unet", "prior_features"]


@dataclass
class AdversarialLossConfig(LossConfig):
    weight: float = 0.0
    discriminator: Discriminator = "pixel_unet"
    """A spectral-norm U-Net on pixels, or light heads on the frozen prior UNet's features."""
    loss: Objective = "hinge"
    start_step: int = 0
    """Warm-up: the discriminator and its loss switch on at this step."""
    lr: float = 1e-4
    channels: int = at_least(4, 32)
    t_min: int = timestep(0)
    t_max: int = timestep(500)
    """Noise levels at which the prior's features are taken (prior_features only)."""


def _mean(logits: list[torch.Tensor], fn) -> torch.Tensor:
    return torch.stack([fn(x).mean() for x in logits]).mean()


def discriminator_loss(real: list[torch.Tensor], fake: list[torch.Tensor], kind: Objective = "hinge") -> torch.Tensor:
    if kind == "hinge":
        return _mean(real, lambda x: F.relu(1 - x)) + _mean(fake, lambda x: F.relu(1 + x))
    if kind == "non_saturating":
        return _mean(real, lambda x: F.softplus(-x)) + _mean(fake, F.softplus)
    raise ValueError(f"unknown adversarial loss {kind!r}")


def generator_loss(fake: list[torch.Tensor], kind: Objective = "hinge") -> torch.Tensor:
    if kind == "hinge":
        return _mean(fake, lambda x: -x)
    if kind == "non_saturating":
        return _mean(fake, lambda x: F.softplus(-x))
    raise ValueError(f"unknown adversarial loss {kind!r}")


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


class AdversarialLoss(nn.Module):
    """``generator_loss`` for the student, ``discriminator_loss`` for the discriminator's step.

    Pixel discriminator: images in [-1, 1]. Feature discriminator: latents, noised at a random
    timestep in [t_min, t_max] and read through the frozen prior UNet (down blocks + mid block).
    """

    def __init__(
        self,
        discriminator: Discriminator = "pixel_unet",
        kind: Objective = "hinge",
        channels: int = 32,
        prior: LatentDiffusion | None = None,
        t_min: int = 0,
        t_max: int = 500,
    ) -> None:
        super().__init__()
        self.kind, self.t_min, self.t_max = kind, t_min, t_max
        if discriminator == "pixel_unet":
            self.prior = None
            self.discriminator: nn.Module = UNetDiscriminator(3, channels)
        elif discriminator == "prior_features":
            if prior is None:
                raise ValueError("the prior_features discriminator needs a diffusion prior (a teacher or base weights)")
            self.prior = prior
            blocks = prior.unet.config.block_out_channels
            self.discriminator = FeatureHeads([*blocks, blocks[-1]], channels)
        else:
            raise ValueError(f"unknown discriminator {discriminator!r}")

    def _logits(self, image: torch.Tensor, latent: torch.Tensor, z_lr: torch.Tensor | None,
                t: torch.Tensor | None, noise: torch.Tensor | None) -> list[torch.Tensor]:  # fmt: skip
        if self.prior is None:
            return [self.discriminator(image)]
        return self.discriminator(self._features(latent, z_lr, t, noise))

    def _noise(
        self, latent: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.prior is None:
            return None, None
        t = random_timesteps(latent.shape[0], self.t_min, self.t_max, generator, latent.device)
        return t, torch.randn(latent.shape, generator=generator, device=generator.device).to(latent)

    def generator_loss(self, sr: torch.Tensor, z_sr: torch.Tensor, z_lr: torch.Tensor | None,
                       generator: torch.Generator) -> torch.Tensor:  # fmt: skip
        t, noise = self._noise(z_sr, generator)
        with _frozen(self.discriminator):
            return generator_loss(self._logits(sr, z_sr, z_lr, t, noise), self.kind)

    def discriminator_loss(self, sr: torch.Tensor, hr: torch.Tensor, z_sr: torch.Tensor, z_hr: torch.Tensor,
                           z_lr: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:  # fmt: skip
        t, noise = self._noise(z_sr, generator)
        if self.prior is None:
            real, fake = self._logits(hr, z_hr, z_lr, t, noise), self._logits(sr.detach(), z_sr, z_lr, t, noise)
        else:
            with torch.no_grad():  # the frozen UNet's features are inputs to the heads, not trained
                real_feats = self._features(z_hr, z_lr, t, noise)
                fake_feats = self._features(z_sr.detach(), z_lr, t, noise)
            real, fake = self.discriminator(real_feats), self.discriminator(fake_feats)
        return discriminator_loss(real, fake, self.kind)

    def _features(
        self, latent: torch.Tensor, z_lr: torch.Tensor | None, t: torch.Tensor, noise: torch.Tensor
    ) -> list[torch.Tensor]:
        unet = self.prior.unet
        with capture_outputs([*unet.down_blocks, unet.mid_block]) as feats:
            self.prior.predict(self.prior.add_noise(latent, noise, t), t, z_lr)
        return list(feats)


class AdversarialTerm(StudentLoss, key="adversarial", config=AdversarialLossConfig):
    """The generator term from ``start_step`` on; the discriminator's step follows the student's,
    against HR or the SR teacher's output (``losses.sr_teacher.gan_target``)."""

    config: AdversarialLossConfig

    def __init__(self, config: AdversarialLossConfig, ctx: LossContext) -> None:
        super().__init__(config, ctx)
        prior = ctx.need_prior("the prior_features discriminator") if config.discriminator == "prior_features" else None
        self.loss = AdversarialLoss(config.discriminator, config.loss, config.channels, prior, config.t_min,
                                    config.t_max).to(ctx.device)  # fmt: skip

    def terms(self, s: StudentStep) -> Terms:
        if s.step < self.config.start_step:
            return {}
        return {"gan_g": (self.config.weight, self.loss.generator_loss(s.sr, s.z_sr, s.z_lr_prior, s.generator))}

    def own_model(self) -> OwnModel:
        params = list(self.loss.discriminator.parameters())
        return OwnModel("discriminator", self.loss, "discriminator", params, self.config.lr)

    def after_step(self, s: StudentStep, optimize: Optimize) -> dict[str, float]:
        if s.step < self.config.start_step:
            return {}
        real = s.target(self.key)
        z_real = s.prior_latent(real) if self.loss.prior is not None else None
        d_loss = self.loss.discriminator_loss(s.sr.detach(), real, s.z_sr.detach(), z_real, s.z_lr_prior, s.generator)
        return {"gan_d": optimize("discriminator", d_loss)}
