"""Discriminators for the adversarial loss: a pixel U-Net, or light heads on a frozen UNet's features.

The pixel U-Net (spectral-normalised, per-pixel logits, as popularised by Real-ESRGAN) judges
every location at once, from local texture up to the layout the bottleneck sees. The feature
heads are far cheaper to train: the frozen diffusion UNet already knows what real latents look
like at every noise level, so a small convolution per block is enough to read it out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

__all__ = ["FeatureHeads", "UNetDiscriminator"]


class UNetDiscriminator(nn.Module):
    """Images (B, C, H, W) -> per-pixel realness logits (B, 1, H, W)."""

    def __init__(self, in_channels: int = 3, channels: int = 32) -> None:
        super().__init__()
        c = channels
        self.conv_in = nn.Conv2d(in_channels, c, 3, 1, 1)
        self.down = nn.ModuleList(
            spectral_norm(nn.Conv2d(c * 2**i, c * 2 ** (i + 1), 4, 2, 1, bias=False)) for i in range(3)
        )
        self.up = nn.ModuleList(
            spectral_norm(nn.Conv2d(c * 2 ** (i + 1), c * 2**i, 3, 1, 1, bias=False)) for i in reversed(range(3))
        )
        self.refine = nn.Sequential(
            spectral_norm(nn.Conv2d(c, c, 3, 1, 1, bias=False)), nn.LeakyReLU(0.2), nn.Conv2d(c, 1, 3, 1, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [F.leaky_relu(self.conv_in(x), 0.2)]
        for conv in self.down:
            skips.append(F.leaky_relu(conv(skips[-1]), 0.2))
        h = skips.pop()
        for conv in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = F.leaky_relu(conv(h), 0.2) + skip
        return self.refine(h)


class FeatureHeads(nn.Module):
    """One small conv head per feature map: list of (B, C_i, H_i, W_i) -> list of (B, 1, H_i, W_i)."""

    def __init__(self, feature_channels: list[int], channels: int = 32) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(spectral_norm(nn.Conv2d(c, channels, 3, 1, 1)), nn.LeakyReLU(0.2), nn.Conv2d(channels, 1, 1))
            for c in feature_channels
        )

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.heads):
            raise ValueError(f"expected {len(self.heads)} feature maps, got {len(features)}")
        return [head(f.float()) for head, f in zip(self.heads, features, strict=True)]
