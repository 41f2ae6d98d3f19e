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

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from kornia.geometry.transform import pyrdown, pyrup
from torch import nn

from vpdsr.semantics import SemanticModel

from .registry import LossConfig, LossContext, StudentLoss, StudentStep, Terms, at_least
from .weights_io import clip_judge

__all__ = [
    "HFPLoss",
    "HFPLossConfig",
    "HFPTerm",
    "band_energy_loss",
    "hfp_loss",
    "laplacian_bands",
    "split_bands",
    "wavelet_bands",
]

Bands = Literal["laplacian", "wavelet", "both"]


@dataclass
class HFPLossConfig(LossConfig):
    """High-frequency perception: SR vs HR on high-frequency bands."""

    weight: float = 0.0
    bands: Bands = "laplacian"
    levels: int = at_least(1, 3)
    clip_weight: float = 0.0
    """Cosine loss on CLIP embeddings of the high-pass images (needs clip.path)."""
    energy_weight: float = at_least(0, 0.0)
    """L1 on the local RMS of the same bands: asks for detail of the right strength without its
    exact phase, which band L1 alone punishes into blur."""
    energy_window: int = at_least(1, 8)
    """Side in pixels of the windows the band RMS is taken over."""


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


_SPLITS = {"laplacian": (laplacian_bands,), "wavelet": (wavelet_bands,), "both": (laplacian_bands, wavelet_bands)}


def split_bands(x: torch.Tensor, bands: Bands = "laplacian", levels: int = 3) -> list[torch.Tensor]:
    """The high-frequency bands of ``x`` under the chosen decomposition(s), finest first."""
    if bands not in _SPLITS:
        raise ValueError(f"bands must be one of {sorted(_SPLITS)}, got {bands!r}")
    return [band for split in _SPLITS[bands] for band in split(x, levels)]


def _check_pair(sr: torch.Tensor, hr: torch.Tensor) -> None:
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr must have the same shape, got {tuple(sr.shape)} and {tuple(hr.shape)}")


def _mean_l1(sr_bands: list[torch.Tensor], hr_bands: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([F.l1_loss(s, h) for s, h in zip(sr_bands, hr_bands, strict=True)]).mean()


def _local_rms(bands: list[torch.Tensor], window: int) -> list[torch.Tensor]:
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out = []
    for band in bands:
        w = min(window, *band.shape[-2:])
        out.append((F.avg_pool2d(band.pow(2), w, stride=max(1, w // 2)) + 1e-8).sqrt())
    return out


def hfp_loss(sr: torch.Tensor, hr: torch.Tensor, bands: Bands = "laplacian", levels: int = 3) -> torch.Tensor:
    """Mean L1 distance between the high-frequency bands of SR and HR."""
    _check_pair(sr, hr)
    return _mean_l1(split_bands(sr, bands, levels), split_bands(hr, bands, levels))


def band_energy_loss(
    sr: torch.Tensor, hr: torch.Tensor, bands: Bands = "laplacian", levels: int = 3, window: int = 8
) -> torch.Tensor:
    """Mean L1 distance between the local RMS (``window`` px) of SR's and HR's bands."""
    _check_pair(sr, hr)
    return _mean_l1(
        _local_rms(split_bands(sr, bands, levels), window), _local_rms(split_bands(hr, bands, levels), window)
    )


class HFPLoss(nn.Module):
    """Pixel-band term plus, with a CLIP, a feature term on the high-pass images.

    Images are in [-1, 1]. The high-pass image (finest Laplacian band) is shown to CLIP around
    mid-grey, amplified so that its detail spans CLIP's input range.
    """

    def __init__(self, bands: Bands = "laplacian", levels: int = 3, semantic: SemanticModel | None = None,
                 clip_weight: float = 0.0, gain: float = 4.0, energy_weight: float = 0.0,
                 energy_window: int = 8) -> None:  # fmt: skip
        super().__init__()
        if clip_weight > 0 and semantic is None:
            raise ValueError("the HFP CLIP term needs a CLIP (set clip.path)")
        self.bands, self.levels, self.clip_weight, self.gain = bands, levels, clip_weight, gain
        self.energy_weight, self.energy_window = energy_weight, energy_window
        self.semantic = semantic if clip_weight > 0 else None

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        _check_pair(sr, hr)
        sr_bands, hr_bands = split_bands(sr, self.bands, self.levels), split_bands(hr, self.bands, self.levels)
        loss = _mean_l1(sr_bands, hr_bands)
        if self.energy_weight > 0:  # the same bands, not split a second time
            rms_sr, rms_hr = _local_rms(sr_bands, self.energy_window), _local_rms(hr_bands, self.energy_window)
            loss = loss + self.energy_weight * _mean_l1(rms_sr, rms_hr)
        if self.semantic is not None:
            hp_sr = (laplacian_bands(sr, 1)[0] * self.gain / 2 + 0.5).clamp(0, 1)
            with torch.no_grad():
                hp_hr = (laplacian_bands(hr, 1)[0] * self.gain / 2 + 0.5).clamp(0, 1)
                target = self.semantic.encode_images(hp_hr)
            cos = (self.semantic.encode_images(hp_sr) * target).sum(dim=-1)
            loss = loss + self.clip_weight * (1 - cos).mean()
        return loss


class HFPTerm(StudentLoss, key="hfp", config=HFPLossConfig):
    """SR's bands against the target's: HR, or the SR teacher's output (``losses.sr_teacher.hfp_target``)."""

    config: HFPLossConfig

    def __init__(self, config: HFPLossConfig, ctx: LossContext) -> None:
        super().__init__(config, ctx)
        judge = clip_judge(ctx, "losses.hfp.clip_weight") if config.clip_weight > 0 else None
        self.loss = HFPLoss(config.bands, config.levels, judge, config.clip_weight,
                            energy_weight=config.energy_weight, energy_window=config.energy_window)  # fmt: skip

    def terms(self, s: StudentStep) -> Terms:
        return {"hfp": (self.config.weight, self.loss(s.sr, s.target(self.key)))}
