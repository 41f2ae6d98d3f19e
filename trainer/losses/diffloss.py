"""DiffLoss: a frozen diffusion UNet as a constraint on the SR latents.

SR and HR latents are noised with the same timestep and the same noise; the frozen UNet's noise
predictions and mid-block features must then agree. Unlike the released implementation, the SR
branch is NOT under ``no_grad``: the whole point is that gradients flow back through the frozen
UNet into the SR latent (and so into the student). Only the HR branch is a fixed target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import LatentDiffusion, capture_outputs, random_timesteps
from .registry import LossConfig, LossContext, StudentLoss, StudentStep, Terms, timestep

__all__ = ["DiffLoss", "DiffLossConfig", "DiffLossTerm"]


@dataclass
class DiffLossConfig(LossConfig):
    """A frozen diffusion UNet as a constraint: SR and HR noised alike must look alike to it."""

    weight: float = 0.0
    t_min: int = timestep(50)
    t_max: int = timestep(500)
    feature_weight: float = 1.0
    """Relative weight of the mid-block features against the noise predictions."""


class DiffLoss(nn.Module):
    def __init__(self, prior: LatentDiffusion, t_min: int = 50, t_max: int = 500, feature_weight: float = 1.0) -> None:
        super().__init__()
        self.prior, self.t_min, self.t_max, self.feature_weight = prior, t_min, t_max, feature_weight

    def _eps_and_mid(
        self, z_t: torch.Tensor, t: torch.Tensor, z_lr: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with capture_outputs([self.prior.unet.mid_block]) as feats:
            pred = self.prior.predict(z_t, t, z_lr)
        eps, _ = self.prior.eps_and_x0(z_t, t, pred)
        return eps, feats[0]

    def forward(
        self, z_sr: torch.Tensor, z_hr: torch.Tensor, z_lr: torch.Tensor | None, generator: torch.Generator
    ) -> torch.Tensor:
        t = random_timesteps(z_sr.shape[0], self.t_min, self.t_max, generator, z_sr.device)
        noise = torch.randn(z_sr.shape, generator=generator, device=generator.device).to(z_sr)
        eps_sr, mid_sr = self._eps_and_mid(self.prior.add_noise(z_sr, noise, t), t, z_lr)
        with torch.no_grad():
            eps_hr, mid_hr = self._eps_and_mid(self.prior.add_noise(z_hr, noise, t), t, z_lr)
        loss = F.mse_loss(eps_sr.float(), eps_hr.float())
        return loss + self.feature_weight * F.mse_loss(mid_sr.float(), mid_hr.float())


class DiffLossTerm(StudentLoss, key="diffloss", config=DiffLossConfig):
    config: DiffLossConfig

    def __init__(self, config: DiffLossConfig, ctx: LossContext) -> None:
        super().__init__(config, ctx)
        self.loss = DiffLoss(ctx.need_prior("losses.diffloss"), config.t_min, config.t_max, config.feature_weight)

    def terms(self, s: StudentStep) -> Terms:
        return {"diffloss": (self.config.weight, self.loss(s.z_sr, s.z_hr, s.z_lr_prior, s.generator))}
