"""A VAE decoder whose capacity sits at the latent's resolution, ending in a sub-pixel (pixel shuffle) step.

Why it exists: diffusers' decoder spends its work where it holds the least. In the tiny-v2
backbone about half of the CPU time went to a 16-channel block at full output resolution, while
the decoder's only wide layers (64 channels) saw the latent. Here every layer but the last works
at the latent's size with ``channels`` channels, and the last one writes the ``factor`` x
``factor`` output pixels of each latent pixel at once (ESPCN's sub-pixel convolution). The same
budget then buys about four times the width where the decisions are made.

The last convolution is ICNR-initialised (Aitken et al., 2017): each output pixel of a cell starts
with the same weights, so the untrained decoder draws no fixed pattern inside the cells, only
their averages, which training then refines.

It has no normalisation layers, so tiled runs (``vpdsr.layerwise``) need only each conv's halo.
It takes ``(z)`` like diffusers' ``Decoder`` and sits in its place inside the ``AutoencoderKL``
(``vae.decoder``), so model files, EMA and the trainer's decoder switches need nothing new.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ResidualConvBlock", "ShuffleDecoder", "build_decoder"]


class ResidualConvBlock(nn.Module):
    """``x + conv2(silu(conv1(silu(x))))``: EDSR's block without normalisation, pre-activated."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(self.act(x))))


def _icnr_(conv: nn.Conv2d, factor: int) -> None:
    """Give the ``factor**2`` sub-pixel outputs of each channel the same weights and bias."""
    out_c = conv.out_channels // factor**2
    base = torch.empty(out_c, conv.in_channels, *conv.kernel_size)
    nn.init.kaiming_uniform_(base, a=5**0.5)  # Conv2d's own default, for one sub-pixel
    with torch.no_grad():
        conv.weight.copy_(base.repeat_interleave(factor**2, dim=0) * 0.1)
        conv.bias.zero_()


class ShuffleDecoder(nn.Module):
    """Latent (``latent_channels``) -> image (``out_channels``) at ``factor`` x the size.

    ``conv_in`` -> ``blocks`` residual blocks -> SiLU -> ``conv_out`` (to ``out_channels * factor**2``)
    -> pixel shuffle.
    """

    def __init__(self, latent_channels: int, out_channels: int, factor: int, channels: int = 64, blocks: int = 4) -> None:
        super().__init__()
        if factor < 1 or channels < 1 or blocks < 0:
            raise ValueError(f"a shuffle decoder needs factor, channels >= 1 and blocks >= 0; got {factor}, {channels}, {blocks}")
        self.factor = factor
        self.conv_in = nn.Conv2d(latent_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(ResidualConvBlock(channels) for _ in range(blocks))
        self.act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels, out_channels * factor**2, 3, padding=1)
        _icnr_(self.conv_out, factor)
        self.gradient_checkpointing = False  # diffusers' enable_gradient_checkpointing() looks for it

    def forward(self, z: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        """Accepts and ignores diffusers' extra decoder arguments (``latent_embeds``)."""
        h = self.conv_in(z)
        for block in self.blocks:
            h = block(h)
        return F.pixel_shuffle(self.conv_out(self.act(h)), self.factor)


def build_decoder(spec: dict[str, Any] | None, vae_config: dict[str, Any], factor: int) -> ShuffleDecoder | None:
    """The decoder a backbone config's ``vae_decoder`` entry describes; None keeps diffusers' own.

    ``{"kind": "shuffle", "channels": 64, "blocks": 4}``; the latent and output channels and the
    factor come from the VAE's own config, so the encoder and the decoder cannot disagree.
    """
    if spec is None:
        return None
    kind = spec.get("kind")
    if kind != "shuffle":
        raise ValueError(f"vae_decoder kind must be 'shuffle', got {kind!r}")
    return ShuffleDecoder(
        latent_channels=int(vae_config["latent_channels"]),
        out_channels=int(vae_config.get("out_channels", 3)),
        factor=factor,
        channels=int(spec.get("channels", 64)),
        blocks=int(spec.get("blocks", 4)),
    )
