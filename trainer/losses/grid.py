"""Grid loss: the p-pixel pattern a VAE decoder paints, penalised where it is made.

A decoder that upsamples by 2 three times can lock part of its output to a p = 4 pixel grid: the
embedded default's decoder darkens the first row of every 4x4 cell a little, in every image, which
``vpdsr.metrics.grid_p`` measures (0.023 on DRealSR, the HR's own 0.010). L1 and the band losses
barely see such a pattern: it is a small share of each pixel's error. This loss sees only it. It
takes the p x p phase pattern of the output's luma high band (``vpdsr.metrics.grid_pattern``, the
benchmark's own computation) minus the target's, so content that happens to line up with the grid
in a crop is not fought, and divides its RMS by the RMS of the target's high band, as ``grid_p``
does: the loss is the share of the band that is extra grid. Both are averaged over the batch
before the division, and the band has a floor of one 8-bit grey level: a flat crop (sky, a wall)
has almost no band, and a per-crop ratio there made a loss of 20 out of a rounding-sized pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vpdsr.metrics import grid_pattern

from .registry import LossConfig, LossContext, StudentLoss, StudentStep, Terms, at_least

__all__ = ["GridLoss", "GridLossConfig", "grid_loss"]

_BAND_FLOOR = 1 / 255  # in [0, 1] units: below one grey level there is no band to share out


@dataclass
class GridLossConfig(LossConfig):
    weight: float = 0.0
    period: int = at_least(2, 4)
    """The grid's period in output pixels: the VAE's factor (4 for the tiny backbones, 8 for SD)."""


def grid_loss(sr: torch.Tensor, target: torch.Tensor, period: int = 4) -> torch.Tensor:
    """The batch's mean RMS(pattern(sr) - pattern(target)) over its mean RMS of the target's high
    band (floored at one grey level), for images in [-1, 1] (the trainer's range), differentiable in ``sr``."""
    if sr.shape != target.shape:
        raise ValueError(f"sr and target must have the same shape, got {tuple(sr.shape)} and {tuple(target.shape)}")
    ours, _ = grid_pattern((sr.float() + 1) / 2, period)
    theirs, band = grid_pattern((target.float() + 1) / 2, period)
    extra = (ours - theirs).pow(2).mean(dim=(1, 2)).add(1e-12).sqrt()  # the epsilon keeps sqrt's gradient finite at 0
    return extra.mean() / band.mean().clamp_min(_BAND_FLOOR)


class GridLoss(nn.Module):
    def __init__(self, period: int = 4) -> None:
        super().__init__()
        self.period = period

    def forward(self, sr: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return grid_loss(sr, target, self.period)


class GridTerm(StudentLoss, key="grid", config=GridLossConfig):
    """The extra p-pixel grid of the output over its target's (HR unless a loss supplies another)."""

    config: GridLossConfig

    def __init__(self, config: GridLossConfig, ctx: LossContext) -> None:
        super().__init__(config, ctx)
        self.loss = GridLoss(config.period)

    def terms(self, s: StudentStep) -> Terms:
        return {"grid": (self.config.weight, self.loss(s.sr, s.target("grid")))}
