"""Variational score distillation (distribution matching), in OSEDiff's form.

The student's latents are noised at a random timestep and scored twice: by the frozen "real"
diffusion model (with classifier-free guidance) and by a "fake" copy that keeps learning, with
the ordinary diffusion loss, the distribution of the student's own outputs. The difference of
their clean-latent estimates points from what the student makes towards what the real model
finds likely; it is applied as a gradient through an MSE against a detached target, normalised
per sample by the distance to the real estimate (the DMD weighting) so its scale does not
depend on the timestep.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vpdsr.lora import LoraSpec, add_lora

from ..diffusion import LatentDiffusion, random_timesteps
from .registry import LossConfig, LossContext, Optimize, OwnModel, StudentLoss, StudentStep, Terms, at_least, timestep

__all__ = ["VSDLoss", "VSDLossConfig", "VSDTerm", "vsd_target"]


@dataclass
class VSDLossConfig(LossConfig):
    """Variational score distillation (OSEDiff's distribution matching)."""

    weight: float = 0.0
    guidance: float = 1.5
    """Classifier-free guidance on the real (frozen) branch."""
    t_min: int = timestep(20)
    t_max: int = timestep(980)
    fake_lr: float = 1e-4
    fake_lora_rank: int = at_least(1, 8)


def vsd_target(z: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """The detached latent the student is pulled towards: one normalised step from fake to real."""
    weight = (z - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    grad = torch.nan_to_num((x0_fake - x0_real) / weight)
    return (z - grad).detach()


class VSDLoss(nn.Module):
    """Student term (``forward``) and the fake model's own diffusion loss (``fake_loss``).

    The fake model is a copy of the prior's UNet with a LoRA adapter (starting as a no-op, so
    fake == real at step 0); only the adapter trains, with its own optimizer.
    """

    def __init__(self, prior: LatentDiffusion, guidance: float = 1.5, t_min: int = 20, t_max: int = 980,
                 lora_rank: int = 8) -> None:  # fmt: skip
        super().__init__()
        self.prior = prior
        self.guidance, self.t_min, self.t_max = guidance, t_min, t_max
        self.fake_unet = copy.deepcopy(prior.unet)
        targets = prior.family.unet_lora_targets(self.fake_unet)
        self.fake_spec = LoraSpec(part="unet", name="vsd_fake", rank=lora_rank, alpha=float(lora_rank), targets=targets)
        add_lora(self.fake_unet, self.fake_spec)

    def fake_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.fake_unet.named_parameters() if "lora_" in n]

    def forward(self, z: torch.Tensor, z_lr: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        n = z.shape[0]
        t = random_timesteps(n, self.t_min, self.t_max, generator, z.device)
        noise = torch.randn(z.shape, generator=generator, device=generator.device).to(z)
        with torch.no_grad():
            z_t = self.prior.add_noise(z.detach(), noise, t)
            _, x0_real = self.prior.eps_and_x0(z_t, t, self.prior.predict(z_t, t, z_lr, self.guidance))
            _, x0_fake = self.prior.eps_and_x0(z_t, t, self.prior.predict(z_t, t, z_lr, unet=self.fake_unet))
        return 0.5 * F.mse_loss(z.float(), vsd_target(z.detach(), x0_real, x0_fake).float())

    def fake_loss(self, z: torch.Tensor, z_lr: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        """Diffusion loss of the fake model on the student's (detached) latents."""
        z = z.detach()
        t = random_timesteps(z.shape[0], 0, self.prior.num_timesteps - 1, generator, z.device)
        noise = torch.randn(z.shape, generator=generator, device=generator.device).to(z)
        pred = self.prior.predict(self.prior.add_noise(z, noise, t), t, z_lr, unet=self.fake_unet)
        return F.mse_loss(pred.float(), self.prior.target(z, noise, t).float())


class VSDTerm(StudentLoss, key="vsd", config=VSDLossConfig):
    """VSD against the prior; its fake UNet's adapter takes its own step after the student's."""

    config: VSDLossConfig

    def __init__(self, config: VSDLossConfig, ctx: LossContext) -> None:
        super().__init__(config, ctx)
        prior = ctx.need_prior("losses.vsd")
        self.loss = VSDLoss(prior, config.guidance, config.t_min, config.t_max, config.fake_lora_rank).to(ctx.device)

    def terms(self, s: StudentStep) -> Terms:
        return {"vsd": (self.config.weight, self.loss(s.z_sr, s.z_lr_prior, s.generator))}

    def own_model(self) -> OwnModel:
        return OwnModel("fake", self.loss, "fake_unet", self.loss.fake_parameters(), self.config.fake_lr)

    def after_step(self, s: StudentStep, optimize: Optimize) -> dict[str, float]:
        return {"vsd_fake": optimize("fake", self.loss.fake_loss(s.z_sr, s.z_lr_prior, s.generator))}
