"""A pixel-space refiner after the VAE decoder, fed the decoded image and the input itself.

Why it exists: a small VAE is a bottleneck. The tiny-v2 VAE alone, encoding and decoding
the DRealSR HR images, reaches only HaarPSI 0.544, and a student that must pass everything
through its latent ends near that, below plain bicubic (0.616). The refiner sees the
bicubic-upscaled input at full resolution beside the decoder's output, so the detail the
latent drops can come straight from the input while the decoder adds what the input lacks.

It has no normalisation layers, so tiled runs (``vpdsr.layerwise``) need only each conv's
halo. Its last layer starts at zero: a refiner
added to a trained student leaves that student's output unchanged until it is trained.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["PixelRefiner", "build_refiner"]


class PixelRefiner(nn.Module):
    """``y + f([y, x])``: a residual on the decoded image ``y`` given the input ``x`` (both in [-1, 1])."""

    def __init__(self, channels: int = 24, layers: int = 4) -> None:
        super().__init__()
        if layers < 2 or channels < 1:
            raise ValueError(f"a refiner needs at least 2 layers and 1 channel, got {layers} and {channels}")
        widths = [6] + [channels] * (layers - 1) + [3]
        convs: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            convs.append(nn.Conv2d(c_in, c_out, 3, padding=1))
            if i < layers - 1:
                convs.append(nn.SiLU())
        self.net = nn.Sequential(*convs)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y + self.net(torch.cat([y, x.to(y.dtype)], dim=1))


def build_refiner(spec: dict[str, Any] | None) -> PixelRefiner | None:
    """The refiner a backbone config's ``refiner`` entry describes (None: the backbone has none)."""
    if spec is None:
        return None
    return PixelRefiner(channels=int(spec.get("channels", 24)), layers=int(spec.get("layers", 4)))
