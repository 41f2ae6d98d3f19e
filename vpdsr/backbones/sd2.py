"""The SD-2 family: Stable Diffusion 2.x (``sd21-base``, ``sd-turbo``) and our small backbones
(``tiny``, ``tiny-v2``, ``tiny-v3``), which are built the same way at other widths.

- Conditioning: the UNet cross-attends to token embeddings, nothing else; a student stores them
  as ``prompt_embeds`` (tokens x dim).
- Text encoder: OpenCLIP ViT-H-14 read at the penultimate block (``vpdsr.text_encoder``), built
  from a single file's ``cond_stage_model.model.*`` tensors or a diffusers folder's
  ``text_encoder/``; the tiny backbones have none and always use their stored conditioning.
- Single files: the original LDM layout, ``model.diffusion_model.*`` (UNet),
  ``first_stage_model.*`` (VAE) and ``cond_stage_model.*`` (text). SD 1.x files share it (with a
  transformers CLIP under ``cond_stage_model.transformer.*``); they are told apart by the UNet's
  cross-attention width, which the weight loader checks next.
- LoRA: the defaults of :class:`~vpdsr.backbones.family.BackboneFamily`.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelFileError
from .family import BackboneFamily

__all__ = ["SD2Family"]


class SD2Family(BackboneFamily):
    name = "sd2"
    checkpoint_kinds = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x"}
    text_prefix = "cond_stage_model.model."

    @classmethod
    def detect(cls, keys: Collection[str]) -> bool:
        """An LDM UNet without added embeddings (``label_emb``) and no SDXL ``conditioner``."""
        has_unet = any(k.startswith(cls.unet_prefix) for k in keys)
        added = any(k.startswith((cls.unet_prefix + "label_emb.", "conditioner.")) for k in keys)
        return has_unet and not added

    def text_encoder_from_checkpoint(self, state: dict[str, torch.Tensor], source: str) -> nn.Module | None:
        spec = self.config.text_encoder
        if not spec:
            return None
        if not state:
            warnings.warn(f"{source}: no text encoder weights ('{self.text_prefix}*'); prompts are unavailable",
                          stacklevel=4)  # fmt: skip
            return None
        from ..text_encoder import build_open_clip_text_encoder  # open_clip loads only with base weights

        try:
            encoder = build_open_clip_text_encoder(spec, state, source=source)
        except ModelFileError as err:
            warnings.warn(f"{err}; prompts are unavailable", stacklevel=4)
            return None
        shape = (encoder.tokenizer.context_length, encoder.tower.token_embedding.weight.shape[1])
        needed = tuple(self.config.prompt_embed_shape)
        if shape != needed:
            warnings.warn(f"{source}: its text encoder gives {shape} embeddings, the backbone needs {needed}",
                          stacklevel=4)  # fmt: skip
            return None
        return encoder

    def text_encoder_from_folder(self, folder: Path) -> nn.Module | None:
        from ..text_encoder import load_hf_text_encoder

        spec = self.config.text_encoder
        return load_hf_text_encoder(folder, spec, self.config.prompt_embed_shape) if spec else None
