"""The one-step student: encode -> one UNet call at a fixed timestep -> x0 -> decode.

It holds no I/O and no tiling; the pipeline drives its three stages (``encode``, ``denoise``,
``decode``) separately so each can be tiled on its own. The trainer calls the same module, so
training, inference and benchmarks never drift apart. How the VAE scales latents and how the UNet
is conditioned belong to the backbone's family (``vpdsr.backbones.family``); :class:`LatentModel`
asks it, for the student here and for the trainer's multi-step diffusion model alike.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from .backbones import BackboneConfig, alphas_cumprod, backbone_family

__all__ = ["LatentModel", "OneStepStudent", "predicted_x0"]


def predicted_x0(
    z_t: torch.Tensor, prediction: torch.Tensor, abar_t: torch.Tensor | float, prediction_type: str
) -> torch.Tensor:
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


class LatentModel(nn.Module):
    """A backbone's VAE and UNet, called the way its family says: scaled latents, one UNet call."""

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, config: BackboneConfig) -> None:
        super().__init__()
        self.vae = vae
        self.unet = unet
        self.config = config
        self.family = backbone_family(config)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latent; the mean by default so output is deterministic."""
        return self.family.encode(self.vae, x, generator, sample)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> pixels in [-1, 1]."""
        return self.family.decode(self.vae, z)


class OneStepStudent(LatentModel):
    """An SD-style VAE and UNet used as a single-step restoration network.

    ``prompt_embeds`` is the stored conditioning (tokens x dim) and ``extra_embeds`` the rest of
    it where the family has more (SDXL's pooled embedding, ``BackboneFamily.extra_embeds``); a
    text encoder is optional at inference, which is what lets the tiny backbone and stripped SD
    students run without one.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        config: BackboneConfig,
        *,
        timestep: int = 999,
        prompt_embeds: torch.Tensor | None = None,
        extra_embeds: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(vae, unet, config)
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
        extras = self.family.extra_tensors(extra_embeds)
        self.extra_embeds = nn.ParameterDict({k: nn.Parameter(v, requires_grad=False) for k, v in extras.items()})

    @property
    def vae_factor(self) -> int:
        return self.config.vae_factor

    def stored_conditioning(self) -> dict[str, torch.Tensor]:
        """The conditioning tensors a model file stores, by their names there."""
        return {"prompt_embeds": self.prompt_embeds, **dict(self.extra_embeds.items())}

    def denoise(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """One UNet call at the fixed timestep, turned into the clean-latent estimate."""
        return self.x0(z, self.unet(z, **self.unet_inputs(z, cond)).sample)

    def unet_inputs(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> dict[str, Any]:
        """The keyword arguments of the one UNet call after ``z``: the timestep and the family's
        conditioning for ``z``'s batch and dtype. ``cond`` replaces the stored token embeddings."""
        t = torch.full((z.shape[0],), self.timestep, device=z.device, dtype=torch.long)
        embeds = self.prompt_embeds if cond is None else cond
        return {"timestep": t, **self.family.unet_kwargs(embeds, dict(self.extra_embeds.items()), z)}

    def x0(self, z: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """The clean-latent estimate from the UNet's prediction at the fixed timestep."""
        return predicted_x0(z, prediction, self.abar_t, self.config.prediction_type).to(z.dtype)

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
