"""Adversarial loss: a discriminator with its own optimizer, switched on after a warm-up.

Two discriminators (see ``discriminators``) and two objectives: hinge, or the non-saturating
logistic loss. The generator term is computed with the discriminator's weights frozen so that
the student's backward pass leaves no gradients in them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import LatentDiffusion, capture_outputs, random_timesteps
from .discriminators import FeatureHeads, UNetDiscriminator

__all__ = ["AdversarialLoss", "discriminator_loss", "generator_loss"]

Objective = Literal["hinge", "non_saturating"]


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
        discriminator: Literal["pixel_unet", "prior_features"] = "pixel_unet",
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
