"""High-frequency perception (HFP): SR against HR on the high-frequency bands only.

Pixel losses are dominated by low frequencies, where a one-step student is already right; its
typical failures (smeared texture, invented or missing fine detail) live in the high bands,
which a plain L1 barely weights. Comparing the bands directly gives those failures their own
term. Two decompositions are offered: a Laplacian pyramid (kornia's pyrdown/pyrup; isotropic
bands an octave apart) and a Haar wavelet split (the horizontal, vertical and diagonal details,
which separate edge orientations). Optionally the finest band is also compared in CLIP's
feature space, which tolerates a shifted texture that shows the same kind of detail.

Band L1 alone is minimised by blur wherever the exact detail cannot be known from the LR, which
above the LR's Nyquist frequency is almost everywhere: a student trained on it comes out as
smooth as bicubic. The energy term compares the bands' local strength (RMS over small windows)
instead of their values, so it asks for the right amount of detail in each place without
demanding its exact phase.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from kornia.geometry.transform import pyrdown, pyrup
from torch import nn

from vpdsr.semantics import SemanticModel

__all__ = ["HFPLoss", "band_energy_loss", "hfp_loss", "laplacian_bands", "wavelet_bands"]

Bands = Literal["laplacian", "wavelet", "both"]


def _check(x: torch.Tensor, levels: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a BCHW image batch, got shape {tuple(x.shape)}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if min(x.shape[-2:]) < 2**levels:
        raise ValueError(f"images of {x.shape[-2]}x{x.shape[-1]} px are too small for {levels} levels")


def laplacian_bands(x: torch.Tensor, levels: int = 3) -> list[torch.Tensor]:
    """The ``levels`` finest Laplacian-pyramid bands, finest first (the low-pass residual is left out)."""
    _check(x, levels)
    bands = []
    for _ in range(levels):
        low = pyrdown(x)
        up = pyrup(low)
        if up.shape[-2:] != x.shape[-2:]:  # odd sizes
            up = F.interpolate(up, size=x.shape[-2:], mode="bilinear", align_corners=False)
        bands.append(x - up)
        x = low
    return bands


def wavelet_bands(x: torch.Tensor, levels: int = 3) -> list[torch.Tensor]:
    """Haar detail coefficients (LH, HL, HH per level, concatenated on channels), finest first."""
    _check(x, levels)
    bands = []
    for _ in range(levels):
        x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
        a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
        c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
        bands.append(torch.cat([a - b + c - d, a + b - c - d, a - b - c + d], dim=1) / 2)
        x = (a + b + c + d) / 2
    return bands


def hfp_loss(sr: torch.Tensor, hr: torch.Tensor, bands: Bands = "laplacian", levels: int = 3) -> torch.Tensor:
    """Mean L1 distance between the high-frequency bands of SR and HR."""
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr must have the same shape, got {tuple(sr.shape)} and {tuple(hr.shape)}")
    splits = {"laplacian": (laplacian_bands,), "wavelet": (wavelet_bands,), "both": (laplacian_bands, wavelet_bands)}
    if bands not in splits:
        raise ValueError(f"bands must be one of {sorted(splits)}, got {bands!r}")
    terms = [
        F.l1_loss(s, h) for split in splits[bands] for s, h in zip(split(sr, levels), split(hr, levels), strict=True)
    ]
    return torch.stack(terms).mean()


def _local_rms(band: torch.Tensor, window: int) -> torch.Tensor:
    window = min(window, *band.shape[-2:])
    return (F.avg_pool2d(band.pow(2), window, stride=max(1, window // 2)) + 1e-8).sqrt()


def band_energy_loss(sr: torch.Tensor, hr: torch.Tensor, levels: int = 3, window: int = 8) -> torch.Tensor:
    """Mean L1 distance between the local RMS of SR's and HR's Laplacian bands."""
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr must have the same shape, got {tuple(sr.shape)} and {tuple(hr.shape)}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    terms = [
        F.l1_loss(_local_rms(s, window), _local_rms(h, window))
        for s, h in zip(laplacian_bands(sr, levels), laplacian_bands(hr, levels), strict=True)
    ]
    return torch.stack(terms).mean()


class HFPLoss(nn.Module):
    """Pixel-band term plus, with a CLIP, a feature term on the high-pass images.

    Images are in [-1, 1]. The high-pass image (finest Laplacian band) is shown to CLIP around
    mid-grey, amplified so that its detail spans CLIP's input range.
    """

    def __init__(self, bands: Bands = "laplacian", levels: int = 3, semantic: SemanticModel | None = None,
                 clip_weight: float = 0.0, gain: float = 4.0, energy_weight: float = 0.0,
                 energy_window: int = 8) -> None:  # fmt: skip
        super().__init__()
        self.energy_weight, self.energy_window = energy_weight, energy_window
        if clip_weight > 0 and semantic is None:
            raise ValueError("the HFP CLIP term needs a CLIP (set clip.path)")
        self.bands, self.levels, self.clip_weight, self.gain = bands, levels, clip_weight, gain
        self.semantic = semantic if clip_weight > 0 else None

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        loss = hfp_loss(sr, hr, self.bands, self.levels)
        if self.energy_weight > 0:
            loss = loss + self.energy_weight * band_energy_loss(sr, hr, self.levels, self.energy_window)
        if self.semantic is not None:
            hp_sr = (laplacian_bands(sr, 1)[0] * self.gain / 2 + 0.5).clamp(0, 1)
            with torch.no_grad():
                hp_hr = (laplacian_bands(hr, 1)[0] * self.gain / 2 + 0.5).clamp(0, 1)
                target = self.semantic.encode_images(hp_hr)
            cos = (self.semantic.encode_images(hp_sr) * target).sum(dim=-1)
            loss = loss + self.clip_weight * (1 - cos).mean()
        return loss
