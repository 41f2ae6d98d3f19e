"""The SDXL family: a UNet with SDXL's added conditioning (``addition_embed_type: "text_time"``).

- Conditioning: besides cross-attending to token embeddings, SDXL adds to its timestep embedding
  a projection of the pooled text embedding concatenated with sinusoidal embeddings of its "time
  ids", the micro-conditioning on size and crop: ``(original h, w, crop top, left, target h, w)``.
  A student stores the pooled embedding as ``pooled_prompt_embeds`` beside ``prompt_embeds``. The
  time ids are fixed per backbone (``"time_ids"`` in its config, by default the uncropped
  training size, ``sample_size`` latent pixels times the VAE factor, 1024 for SDXL): a one-step
  student always sees the same ones, which keeps every tile of an image under one condition.
- Text encoder: none yet. SDXL concatenates two CLIP towers (ViT-L and OpenCLIP bigG) and pools
  the second; vpdsr does not build them, so SDXL students run on their stored conditioning and
  prompts are refused.
- Single files: the LDM prefixes for the UNet and VAE, text under ``conditioner.embedders.*``;
  recognised by that, or by the UNet's ``label_emb`` (the added-embedding projection).
- LoRA: the defaults of :class:`~vpdsr.backbones.family.BackboneFamily`; the added-embedding
  projections are left alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ModelFileError
from .family import BackboneFamily, batched

if TYPE_CHECKING:
    from . import BackboneConfig

__all__ = ["SDXLFamily"]

POOLED = "pooled_prompt_embeds"
_NO_TEXT_ENCODER = "vpdsr builds no SDXL text encoders yet; prompts are unavailable (stored conditioning is used)"


class SDXLFamily(BackboneFamily):
    name = "sdxl"
    checkpoint_kinds = {2048: "SDXL"}
    text_prefix = "conditioner.embedders."

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__(config)
        unet = config.unet
        if unet.get("addition_embed_type") != "text_time":
            raise ModelFileError(
                f"the {config.name} backbone is an SDXL-family backbone, so its UNet needs addition_embed_type "
                f"'text_time', not {unet.get('addition_embed_type')!r}"
            )
        sample = int(unet.get("sample_size", 128)) * config.vae_factor
        self.time_ids = tuple(float(v) for v in config.extra.get("time_ids", (sample, sample, 0, 0, sample, sample)))
        width = int(unet.get("projection_class_embeddings_input_dim") or 0)
        self.pooled_dim = width - len(self.time_ids) * int(unet.get("addition_time_embed_dim") or 0)
        if self.pooled_dim <= 0:
            raise ModelFileError(
                f"the {config.name} backbone: projection_class_embeddings_input_dim ({width}) leaves no room for a "
                f"pooled text embedding beside {len(self.time_ids)} time ids of addition_time_embed_dim each"
            )

    @classmethod
    def detect(cls, keys: Collection[str]) -> bool:
        return any(k.startswith(("conditioner.embedders.", cls.unet_prefix + "label_emb.")) for k in keys)

    def text_encoder_from_checkpoint(self, state: dict[str, torch.Tensor], source: str) -> nn.Module | None:
        if state:
            warnings.warn(f"{source}: {_NO_TEXT_ENCODER}", stacklevel=4)
        return None

    def text_encoder_from_folder(self, folder: Path) -> nn.Module | None:
        if (folder / "text_encoder_2").is_dir():
            warnings.warn(f"{folder}: {_NO_TEXT_ENCODER}", stacklevel=4)
        return None

    def extra_embeds(self) -> dict[str, tuple[int, ...]]:
        return {POOLED: (self.pooled_dim,)}

    def unet_kwargs(
        self, embeds: torch.Tensor, extras: Mapping[str, torch.Tensor], like: torch.Tensor
    ) -> dict[str, Any]:
        time_ids = torch.tensor(self.time_ids)
        added = {"text_embeds": batched(extras[POOLED], like, rank=1), "time_ids": batched(time_ids, like, rank=1)}
        return {**super().unet_kwargs(embeds, extras, like), "added_cond_kwargs": added}
