"""A multi-step latent diffusion model: VAE + UNet + noise schedule, as the trainer needs it.

Two kinds of conditioning cover our uses:

* LR-conditioned (the teacher stage's SR model): the UNet sees the noisy HR latent concatenated
  with the latent of the bicubic-upscaled LR image, so it takes twice the latent channels. A
  blanked (zero) LR latent is the unconditional input that classifier-free guidance needs.
* Text-conditioned (an SD base UNet used as a prior): the UNet sees only the noisy latent; the
  prompt embedding conditions it and a negative-prompt embedding is the unconditional branch.

The same object is the trained model of the teacher stage and, frozen, the "real" prior of the
student stage's VSD, DiffLoss and feature-discriminator losses. The VAE scaling and the UNet call
are the backbone family's (``vpdsr.model.LatentModel``), the same the one-step student uses.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import nn

from vpdsr.backbones import BackboneConfig, alphas_cumprod
from vpdsr.model import LatentModel, predicted_x0

__all__ = ["LatentDiffusion", "capture_outputs", "conditional_unet_config", "expand_conv_in", "random_timesteps"]


def conditional_unet_config(config: BackboneConfig) -> dict:
    """The backbone's UNet config with room for the LR latent beside the noisy latent."""
    unet = copy.deepcopy(config.unet)
    unet["in_channels"] = 2 * config.latent_channels
    return unet


def expand_conv_in(unet: UNet2DConditionModel, in_channels: int) -> UNet2DConditionModel:
    """Widen a pretrained UNet's first convolution; the new input channels start at zero, so the
    widened UNet initially behaves exactly like the pretrained one."""
    old = unet.conv_in
    if old.in_channels == in_channels:
        return unet
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new.to(old.weight.device, old.weight.dtype)
    unet.register_to_config(in_channels=in_channels)
    return unet


def random_timesteps(n: int, t_min: int, t_max: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n,) integer timesteps uniform in [t_min, t_max], drawn from ``generator``."""
    t = torch.randint(t_min, t_max + 1, (n,), generator=generator, device=generator.device)
    return t.to(device)


@contextmanager
def capture_outputs(modules: Sequence[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Collect the hidden-state output of each module during the forward passes in the block.

    Down blocks return ``(hidden, residuals)``; only the hidden state is kept.
    """
    outputs: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: object, output: object) -> None:
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


class LatentDiffusion(LatentModel):
    """VAE + UNet + schedule with the operations training needs: noise, targets, predict, sample.

    ``cond``/``uncond`` are token embeddings (tokens x dim); ``extras``/``uncond_extras`` the rest
    of the conditioning where the family has more (SDXL's pooled embedding), zeros when not given.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        config: BackboneConfig,
        *,
        lr_conditioned: bool,
        cond: torch.Tensor,
        uncond: torch.Tensor | None = None,
        extras: Mapping[str, torch.Tensor] | None = None,
        uncond_extras: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(vae, unet, config)
        self.lr_conditioned = lr_conditioned
        expected = 2 * config.latent_channels if lr_conditioned else config.latent_channels
        if unet.config.in_channels != expected:
            raise ValueError(
                f"a {'LR-conditioned' if lr_conditioned else 'text-conditioned'} UNet needs {expected} input "
                f"channels, this one has {unet.config.in_channels}"
            )
        cond = cond[0] if cond.dim() == 3 else cond
        uncond = cond if uncond is None else (uncond[0] if uncond.dim() == 3 else uncond)
        self.register_buffer("cond", cond.detach().float().clone())
        self.register_buffer("uncond", uncond.detach().float().clone())
        for branch, given in (("cond", extras), ("uncond", extras if uncond_extras is None else uncond_extras)):
            for name, tensor in self.family.extra_tensors(given).items():
                self.register_buffer(f"{branch}_{name}", tensor)
        self.register_buffer("abar", alphas_cumprod(config.scheduler).float(), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return int(self.abar.shape[0])

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.abar.to(like.device)[t].view(-1, 1, 1, 1).to(like.dtype)

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self._abar(t, z0)
        return abar.sqrt() * z0 + (1 - abar).sqrt() * noise

    def target(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to output for this prediction type."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            abar = self._abar(t, z0)
            return abar.sqrt() * noise - (1 - abar).sqrt() * z0
        return z0

    def eps_and_x0(
        self, z_t: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise and clean-latent estimates implied by a raw UNet output."""
        abar = self._abar(t, z_t)
        x0 = predicted_x0(z_t, prediction, abar, self.prediction_type).to(z_t.dtype)
        eps = (z_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        return eps, x0

    def _unet_call(
        self, unet: nn.Module, z_t: torch.Tensor, t: torch.Tensor, z_lr: torch.Tensor | None, uncond: bool
    ) -> torch.Tensor:
        if self.lr_conditioned:
            if z_lr is None:
                raise ValueError("an LR-conditioned diffusion model needs the LR latent")
            x = torch.cat([z_t, torch.zeros_like(z_lr) if uncond else z_lr], dim=1)
        else:
            x = z_t
        branch = "uncond" if uncond else "cond"
        extras = {name: getattr(self, f"{branch}_{name}") for name in self.family.extra_embeds()}
        return self.family.predict(unet, x, t, getattr(self, branch), extras)

    def predict(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor,
        z_lr: torch.Tensor | None = None,
        guidance: float = 1.0,
        unet: nn.Module | None = None,
    ) -> torch.Tensor:
        """Raw UNet output, with classifier-free guidance when ``guidance != 1``.

        ``unet`` replaces the model's own UNet (same inputs), e.g. VSD's trainable "fake" copy.
        """
        unet = self.unet if unet is None else unet
        cond = self._unet_call(unet, z_t, t, z_lr, uncond=False)
        if guidance == 1.0:
            return cond
        uncond = self._unet_call(unet, z_t, t, z_lr, uncond=True)
        return uncond + guidance * (cond - uncond)

    def lr_input(self, z_lr: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The LR latent with the samples where ``keep`` is False blanked (condition dropout)."""
        return z_lr * keep.view(-1, 1, 1, 1).to(z_lr.dtype)

    @torch.no_grad()
    def sample(
        self,
        z_lr: torch.Tensor,
        steps: int,
        generator: torch.Generator,
        guidance: float = 1.0,
        shape: torch.Size | None = None,
    ) -> torch.Tensor:
        """Deterministic DDIM (eta 0) from pure noise to a clean latent in ``steps`` UNet calls.

        "trailing" spacing makes the first call t=999, the timestep the one-step student uses.
        """
        scheduler = DDIMScheduler(
            num_train_timesteps=self.num_timesteps,
            beta_start=float(self.config.scheduler["beta_start"]),
            beta_end=float(self.config.scheduler["beta_end"]),
            beta_schedule=self.config.scheduler.get("beta_schedule", "scaled_linear"),
            prediction_type=self.prediction_type,
            clip_sample=False,
            set_alpha_to_one=False,
            timestep_spacing="trailing",
        )
        scheduler.set_timesteps(steps, device=z_lr.device)
        shape = z_lr.shape if shape is None else shape
        z = torch.randn(shape, generator=generator, device=generator.device).to(z_lr.device, z_lr.dtype)
        for t in scheduler.timesteps:
            ts = torch.full((shape[0],), int(t), device=z.device, dtype=torch.long)
            pred = self.predict(z, ts, z_lr, guidance)
            z = scheduler.step(pred, t, z).prev_sample
        return z
