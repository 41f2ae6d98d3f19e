"""Named backbones: a diffusers ``AutoencoderKL`` plus ``UNet2DConditionModel`` from a bundled config.

The configs live as JSON beside this file so that nothing is ever fetched from a hub: a
backbone is fully described by its JSON, which is also copied into every model file so a
student stays loadable even if we change the bundled files later.

Each config names its *family* (``"family"``, ``"sd2"`` when absent, as in every file written
before families existed). The family (``family.py``, one module per family, registered in
``FAMILIES`` below) owns how the UNet is conditioned and called, the text encoder, the
single-file checkpoint layout and the LoRA targets; see ``family.py`` for the seam.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from ..errors import ModelFileError
from ..refiner import build_refiner
from ..shuffle_decoder import build_decoder
from .family import BackboneFamily
from .sd2 import SD2Family
from .sdxl import SDXLFamily

__all__ = [
    "FAMILIES",
    "Backbone",
    "BackboneConfig",
    "BackboneFamily",
    "SmoothUpsample",
    "alphas_cumprod",
    "available_backbones",
    "backbone_config",
    "backbone_family",
    "build_backbone",
    "detect_family",
]

FAMILIES: dict[str, type[BackboneFamily]] = {family.name: family for family in (SD2Family, SDXLFamily)}
"""The backbone families by name; :func:`detect_family` tries them in this order."""
DEFAULT_FAMILY = SD2Family.name


@dataclass(frozen=True)
class BackboneConfig:
    """The architecture and the noise-schedule facts a one-step student depends on."""

    name: str
    vae: dict[str, Any]
    unet: dict[str, Any]
    scheduler: dict[str, Any]
    prompt_embed_shape: tuple[int, int]
    text_encoder: dict[str, Any] | None = None
    description: str = ""
    family: str = DEFAULT_FAMILY
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent pixel: each VAE block but the last halves the resolution."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae["latent_channels"])

    @property
    def scaling_factor(self) -> float:
        """Latents are multiplied by this so they have roughly unit variance for the UNet."""
        return float(self.vae.get("scaling_factor", 1.0))

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.get("prediction_type", "epsilon"))

    def to_dict(self) -> dict[str, Any]:
        data = {
            "name": self.name,
            "description": self.description,
            "family": self.family,
            "vae": self.vae,
            "unet": self.unet,
            "scheduler": self.scheduler,
            "text_encoder": self.text_encoder,
            "prompt_embed_shape": list(self.prompt_embed_shape),
        }
        data.update(self.extra)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneConfig:
        known = {"name", "description", "family", "vae", "unet", "scheduler", "text_encoder", "prompt_embed_shape"}
        missing = {"name", "vae", "unet", "scheduler", "prompt_embed_shape"} - data.keys()
        if missing:
            raise ModelFileError(f"backbone config lacks {sorted(missing)}")
        shape = tuple(int(v) for v in data["prompt_embed_shape"])
        if len(shape) != 2:
            raise ModelFileError(f"prompt_embed_shape must be (tokens, dim), got {shape}")
        family = str(data.get("family", DEFAULT_FAMILY))
        if family not in FAMILIES:
            raise ModelFileError(f"unknown backbone family {family!r}; vpdsr knows {sorted(FAMILIES)}")
        return cls(
            name=str(data["name"]),
            vae=dict(data["vae"]),
            unet=dict(data["unet"]),
            scheduler=dict(data["scheduler"]),
            prompt_embed_shape=shape,  # type: ignore[arg-type]
            text_encoder=data.get("text_encoder"),
            description=str(data.get("description", "")),
            family=family,
            extra={k: v for k, v in data.items() if k not in known},
        )


class SmoothUpsample(nn.Module):
    """The VAE decoder's 2x upsampling as bilinear resize then its 3x3 conv, in place of
    diffusers' nearest-neighbour resize: a nearest copy gives each output pixel of a 2x2 cell
    the same input, which the conv after it turns into a pattern repeating every 2 (then 4)
    pixels, the block grid people saw. Holds the same ``conv`` weights under the same keys."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, hidden_states: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        size = output_size or (hidden_states.shape[-2] * 2, hidden_states.shape[-1] * 2)
        return self.conv(F.interpolate(hidden_states, size=size, mode="bilinear", align_corners=False))


def _use_smooth_upsampling(vae: AutoencoderKL) -> None:
    for block in vae.decoder.up_blocks:
        if block.upsamplers is not None:
            block.upsamplers = nn.ModuleList(SmoothUpsample(up.conv) for up in block.upsamplers)


@dataclass
class Backbone:
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    config: BackboneConfig


def available_backbones() -> list[str]:
    files = resources.files(__package__).joinpath("configs").iterdir()
    return sorted(f.name.removesuffix(".json") for f in files if f.name.endswith(".json"))


def backbone_config(name_or_config: str | Path | dict[str, Any] | BackboneConfig) -> BackboneConfig:
    """Resolve a bundled name, a JSON file with a backbone config (a path ending in ``.json``: what
    the trainer's ``backbone`` and ``vpdsr convert-osediff --backbone`` take), a config dict (e.g.
    from a model file) or a config itself."""
    if isinstance(name_or_config, BackboneConfig):
        return name_or_config
    if isinstance(name_or_config, dict):
        return BackboneConfig.from_dict(name_or_config)
    if isinstance(name_or_config, Path) or name_or_config.endswith(".json"):
        path = Path(name_or_config)
        if not path.is_file():
            raise ModelFileError(f"backbone config file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelFileError(f"{path.name}: not a JSON backbone config ({err})") from None
        if not isinstance(data, dict):
            raise ModelFileError(f"{path.name}: a backbone config is a JSON object, got {type(data).__name__}")
        return BackboneConfig.from_dict(data)
    names = available_backbones()
    if name_or_config not in names:
        raise ModelFileError(f"unknown backbone {name_or_config!r}; bundled backbones are {names}")
    text = resources.files(__package__).joinpath("configs", f"{name_or_config}.json").read_text()
    return BackboneConfig.from_dict(json.loads(text))


def build_backbone(
    name_or_config: str | dict[str, Any] | BackboneConfig, device: torch.device | str | None = None
) -> Backbone:
    """Build randomly initialised parts; ``device="meta"`` allocates nothing (for checks)."""
    config = backbone_config(name_or_config)
    backbone_family(config)  # a config its family cannot condition fails here, not at the first UNet call
    with torch.device(device or "cpu"):
        vae = AutoencoderKL(**config.vae)
        unet = UNet2DConditionModel(**config.unet)
        refiner = build_refiner(config.extra.get("refiner"))
        try:
            decoder = build_decoder(config.extra.get("vae_decoder"), config.vae, config.vae_factor)
        except (ValueError, KeyError, TypeError) as err:
            raise ModelFileError(f"backbone {config.name}: vae_decoder: {err}") from None
    if decoder is not None:
        vae.decoder = decoder  # in diffusers' Decoder's place, so AutoencoderKL.decode calls it
    if refiner is not None:
        # held by the VAE, whose decoder it completes, so model files, EMA and the trainer's
        # decoder switches treat it as decoder weights (``vae.refiner.*``) with no new part
        vae.refiner = refiner
    upsample = config.extra.get("vae_upsample", "nearest")
    if upsample == "bilinear" and decoder is not None:
        raise ModelFileError(f"backbone {config.name}: vae_upsample applies to diffusers' decoder, not a vae_decoder")
    if upsample == "bilinear":
        _use_smooth_upsampling(vae)
    elif upsample != "nearest":
        raise ModelFileError(f"vae_upsample must be 'nearest' or 'bilinear', got {upsample!r}")
    return Backbone(vae=vae, unet=unet, config=config)


def backbone_family(config: BackboneConfig) -> BackboneFamily:
    """The family that conditions, calls and loads this backbone (its config checked by the family)."""
    return FAMILIES[config.family](config)


def detect_family(keys: Collection[str]) -> type[BackboneFamily] | None:
    """The family whose single-file checkpoint layout these keys have, or None if no family's."""
    return next((family for family in FAMILIES.values() if family.detect(keys)), None)


def alphas_cumprod(scheduler: dict[str, Any]) -> torch.Tensor:
    """The DDPM signal fractions abar_t, in float64, from the scheduler facts of a config.

    Only the two schedules SD-family models use are supported; anything else would silently
    change what the timestep means, so it is refused.
    """
    steps = int(scheduler.get("num_train_timesteps", 1000))
    start, end = float(scheduler["beta_start"]), float(scheduler["beta_end"])
    kind = scheduler.get("beta_schedule", "scaled_linear")
    if kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    elif kind == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float64)
    else:
        raise ModelFileError(f"unsupported beta_schedule {kind!r} (expected scaled_linear or linear)")
    return torch.cumprod(1.0 - betas, dim=0)
