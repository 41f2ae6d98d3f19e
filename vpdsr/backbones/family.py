"""The backbone-family seam: everything that differs between SD-2-style and SDXL-style backbones.

A family is one module beside this one (``sd2.py``, ``sdxl.py``) holding a subclass of
:class:`BackboneFamily`, listed in the registry of ``vpdsr.backbones``; a backbone's JSON config
names its family (``"family": "sdxl"``; configs without one are ``sd2``). The family owns:

- how the UNet is conditioned and called (:meth:`BackboneFamily.unet_kwargs`): SD 2 cross-attends
  to token embeddings only; SDXL also adds a pooled text embedding and its size/crop "time ids" to
  the timestep embedding;
- the conditioning a student stores beside its token embeddings (:meth:`BackboneFamily.extra_embeds`);
- the VAE scaling around the latent (:meth:`BackboneFamily.encode`, :meth:`BackboneFamily.decode`);
- the text encoder it builds from base weights;
- its single-file checkpoint key layout and how to recognise it (:meth:`BackboneFamily.detect`);
- its LoRA targets.

The student (``vpdsr.model``), the trainer's diffusion wrapper and the weight loader ask the family
and know none of this themselves: the shape is spandrel's architecture registry, where each
architecture detects its own state dicts and a registry lists them in the order they are tried.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..lora import UNET_TARGET_SUFFIXES, VAE_ENCODER_TARGET_SUFFIXES, default_lora_targets

if TYPE_CHECKING:
    from . import BackboneConfig

__all__ = ["BackboneFamily", "batched"]


class BackboneFamily:
    """One family's answers, bound to one backbone config (``family.config``).

    Subclasses set the class attributes and override what their family does differently; the
    defaults here are the SD-style ones every family so far shares (the LDM single-file prefixes,
    one VAE scaling factor, LoRA on attention, feed-forward and convolution layers).
    """

    name: ClassVar[str] = ""
    """The name backbone configs and model files use (``"sd2"``)."""
    checkpoint_kinds: ClassVar[dict[int, str]] = {}
    """What a checkpoint whose UNet cross-attends to features of this width is called, for messages
    that name the model a user gave instead of the one needed."""
    unet_prefix: ClassVar[str] = "model.diffusion_model."
    vae_prefix: ClassVar[str] = "first_stage_model."
    text_prefix: ClassVar[str] = ""
    """Where a single-file checkpoint keeps the text encoder's weights."""

    def __init__(self, config: BackboneConfig) -> None:
        self.config = config

    # --- single-file checkpoints -------------------------------------------------------------

    @classmethod
    def detect(cls, keys: Collection[str]) -> bool:
        """Whether a single-file checkpoint with these keys is laid out as this family's."""
        raise NotImplementedError

    @classmethod
    def checkpoint_name(cls) -> str:
        """What this family's checkpoints are called, for messages (``"SDXL"``)."""
        return " / ".join(cls.checkpoint_kinds.values()) or cls.name

    def text_encoder_from_checkpoint(self, state: dict[str, torch.Tensor], source: str) -> nn.Module | None:
        """The text encoder from a single file's tensors under ``text_prefix`` (prefix removed), or None.

        It maps a prompt to the UNet's token conditioning, ``(1, tokens, dim)``; None (with a
        warning) means prompts are unavailable, which matters only to students that store no
        conditioning.
        """
        return None

    def text_encoder_from_folder(self, folder: Path) -> nn.Module | None:
        """The text encoder of a diffusers folder, or None; see :meth:`text_encoder_from_checkpoint`."""
        return None

    # --- conditioning and the UNet call --------------------------------------------------------

    def extra_embeds(self) -> dict[str, tuple[int, ...]]:
        """Conditioning tensors a student stores beside ``prompt_embeds``, by name and shape.

        The names are the model file's tensor names; none for SD 2.
        """
        return {}

    def extra_tensors(self, given: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``given``'s extra conditioning checked against :meth:`extra_embeds`, float32; zeros where absent.

        Zeros are what a backbone without a text encoder conditions on (as ``prompt_embeds``).
        """
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.extra_embeds()))
        if unknown:
            raise ValueError(f"the {self.name} family stores no conditioning named {unknown}")
        tensors = {}
        for name, shape in self.extra_embeds().items():
            t = given.get(name)
            t = torch.zeros(shape) if t is None else t.detach().float()
            if t.dim() == len(shape) + 1 and t.shape[0] == 1:
                t = t[0]
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
            tensors[name] = t.clone()
        return tensors

    def unet_kwargs(
        self, embeds: torch.Tensor, extras: Mapping[str, torch.Tensor], like: torch.Tensor
    ) -> dict[str, Any]:
        """The conditioning keyword arguments of ``unet(sample, timestep, **kwargs)``.

        ``embeds`` is ``(tokens, dim)`` or ``(1 or batch, tokens, dim)``; ``extras`` holds the
        tensors named by :meth:`extra_embeds`, unbatched. Everything is brought to ``like``'s
        batch, device and dtype.
        """
        return {"encoder_hidden_states": batched(embeds, like, rank=2)}

    def predict(
        self,
        unet: nn.Module,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        embeds: torch.Tensor,
        extras: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        """The UNet's raw output for a noisy (or LR-concatenated) latent: the one place it is called."""
        return unet(sample, timestep, **self.unet_kwargs(embeds, extras, sample)).sample

    # --- the VAE ---------------------------------------------------------------------------------

    def encode(
        self, vae: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latent; the posterior mean unless ``sample``, so output is deterministic."""
        dist = vae.encode(x).latent_dist
        return (dist.sample(generator) if sample else dist.mean) * self.config.scaling_factor

    def decode(self, vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> pixels in [-1, 1] (not clamped)."""
        return vae.decode(z / self.config.scaling_factor).sample

    # --- LoRA ------------------------------------------------------------------------------------

    def unet_lora_targets(self, unet: nn.Module, include_conv_in: bool = True) -> tuple[str, ...]:
        """The UNet layers a LoRA adapter goes on; students train ``conv_in`` in full instead."""
        suffixes = tuple(s for s in UNET_TARGET_SUFFIXES if include_conv_in or s != "conv_in")
        return default_lora_targets(unet, suffixes)

    def vae_lora_targets(self, vae: nn.Module) -> tuple[str, ...]:
        """The VAE encoder layers a LoRA adapter goes on (the decoder stays frozen under LoRA)."""
        return default_lora_targets(vae, VAE_ENCODER_TARGET_SUFFIXES, prefix="encoder")


def batched(t: torch.Tensor, like: torch.Tensor, rank: int) -> torch.Tensor:
    """``t`` (``rank`` dimensions, or one more for a batch of 1 or of ``like``'s size) expanded to
    ``like``'s batch, on ``like``'s device and dtype."""
    t = t.to(device=like.device, dtype=like.dtype)
    if t.dim() == rank:
        t = t.unsqueeze(0)
    return t.expand(like.shape[0], *t.shape[1:])
