"""The one-step student: encode -> one UNet call at a fixed timestep -> x0 -> decode.

It holds no I/O and no tiling; the pipeline drives its three stages (``encode``, ``denoise``,
``decode``) separately so each can be tiled on its own. The trainer calls the same module, so
training, inference and benchmarks never drift apart.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from .backbones import BackboneConfig, alphas_cumprod

__all__ = ["OneStepStudent", "predicted_x0"]


def predicted_x0(z_t: torch.Tensor, prediction: torch.Tensor, abar_t: torch.Tensor | float, prediction_type: str) -> torch.Tensor:
    """x0 from a UNet prediction at one timestep, computed directly.

    ``DDPMScheduler.step`` cannot be used at t=999 (it indexes t+1 and raises), and the direct
    formula is what OSEDiff's one-step sampler reduces to anyway.
    """
    abar = torch.as_tensor(abar_t, dtype=torch.float32, device=z_t.device)
    sqrt_a, sqrt_1ma = abar.sqrt(), (1.0 - abar).sqrt()
    if prediction_type == "epsilon":
        return (z_t - sqrt_1ma * prediction) / sqrt_a
    if prediction_type == "v_prediction":
        return sqrt_a * z_t - sqrt_1ma * prediction
    if prediction_type == "sample":
        return prediction
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


class OneStepStudent(nn.Module):
    """An SD-style VAE and UNet used as a single-step restoration network.

    ``prompt_embeds`` is the stored conditioning (tokens x dim); a text encoder is optional at
    inference, which is what lets the tiny backbone and stripped SD students run without one.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        config: BackboneConfig,
        *,
        timestep: int = 999,
        prompt_embeds: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.vae = vae
        self.unet = unet
        self.config = config
        steps = int(config.scheduler.get("num_train_timesteps", 1000))
        if not 0 <= timestep < steps:
            raise ValueError(f"timestep must be in [0, {steps - 1}], got {timestep}")
        self.timestep = int(timestep)
        abar = alphas_cumprod(config.scheduler)[self.timestep]
        self.register_buffer("abar_t", torch.tensor(float(abar)), persistent=False)
        if prompt_embeds is None:
            prompt_embeds = torch.zeros(config.prompt_embed_shape)
        if prompt_embeds.dim() == 3:
            prompt_embeds = prompt_embeds[0]
        if tuple(prompt_embeds.shape) != tuple(config.prompt_embed_shape):
            raise ValueError(
                f"prompt_embeds must have shape {tuple(config.prompt_embed_shape)}, got {tuple(prompt_embeds.shape)}"
            )
        self.prompt_embeds = nn.Parameter(prompt_embeds.float().clone(), requires_grad=False)

    @property
    def vae_factor(self) -> int:
        return self.config.vae_factor

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latent; the mean by default so output is deterministic."""
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        return z * self.config.scaling_factor

    def denoise(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """One UNet call at the fixed timestep, turned into the clean-latent estimate."""
        t, cond = self.unet_inputs(z, cond)
        return self.x0(z, self.unet(z, t, encoder_hidden_states=cond).sample)

    def unet_inputs(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The timestep and conditioning batch of the one UNet call, for ``z``'s batch and dtype."""
        if cond is None:
            cond = self.prompt_embeds
        if cond.dim() == 2:
            cond = cond.unsqueeze(0)
        cond = cond.to(device=z.device, dtype=z.dtype).expand(z.shape[0], -1, -1)
        return torch.full((z.shape[0],), self.timestep, device=z.device, dtype=torch.long), cond

    def x0(self, z: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """The clean-latent estimate from the UNet's prediction at the fixed timestep."""
        return predicted_x0(z, prediction, self.abar_t, self.config.prediction_type).to(z.dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / self.config.scaling_factor).sample

    @property
    def refiner(self) -> nn.Module | None:
        """The backbone's pixel refiner (``vpdsr.refiner``), if it has one."""
        return getattr(self.vae, "refiner", None)

    def refine(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The decoded image ``y`` corrected with the input ``x``; ``y`` itself without a refiner."""
        refiner = self.refiner
        return y if refiner is None else refiner(y, x)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Untiled pass on an already upscaled image in [-1, 1] whose sides divide by ``vae_factor``."""
        return self.refine(self.decode(self.denoise(self.encode(x), cond)), x)
