"""Pixel reconstruction: the fidelity anchor every other loss of the student is balanced against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .lpips import load_lpips
from .registry import LossConfig, LossContext, StudentLoss, StudentStep, Terms

__all__ = ["ReconstructionLoss", "ReconstructionLossConfig", "ReconstructionTerm", "reconstruction_loss"]


@dataclass
class ReconstructionLossConfig(LossConfig):
    weight: float = 1.0
    kind: Literal["l1", "mse"] = "l1"
    lpips_weight: float = 0.0
    lpips_vgg_path: str | None = None
    """torchvision VGG16 weights file; LPIPS is never downloaded."""
    lpips_lin_path: str | None = None
    """LPIPS linear-layer weights (the ``vgg.pth`` of the lpips package, v0.1)."""


def reconstruction_loss(sr: torch.Tensor, hr: torch.Tensor, kind: Literal["l1", "mse"] = "l1") -> torch.Tensor:
    """Mean L1 or squared error between SR and HR images of the same shape."""
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr must have the same shape, got {tuple(sr.shape)} and {tuple(hr.shape)}")
    if kind == "l1":
        return F.l1_loss(sr, hr)
    if kind == "mse":
        return F.mse_loss(sr, hr)
    raise ValueError(f"kind must be 'l1' or 'mse', got {kind!r}")


class ReconstructionLoss(nn.Module):
    def __init__(self, kind: Literal["l1", "mse"] = "l1") -> None:
        super().__init__()
        self.kind = kind

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return reconstruction_loss(sr, hr, self.kind)


class ReconstructionTerm(StudentLoss, key="reconstruction", config=ReconstructionLossConfig):
    """Pixel L1 or MSE against HR, plus LPIPS when it has a weight."""

    config: ReconstructionLossConfig

    def __init__(self, config: ReconstructionLossConfig, ctx: LossContext) -> None:
        super().__init__(config, ctx)
        self.pixel = ReconstructionLoss(config.kind)
        self.lpips = None
        if config.lpips_weight > 0:
            self.lpips = load_lpips(config.lpips_vgg_path, config.lpips_lin_path).to(ctx.device)

    @classmethod
    def enabled(cls, config: ReconstructionLossConfig) -> bool:
        return True  # the fidelity anchor: "rec" is computed and logged at any weight

    def terms(self, s: StudentStep) -> Terms:
        terms = {"rec": (self.config.weight, self.pixel(s.sr, s.hr))}
        if self.lpips is not None:
            terms["lpips"] = (self.config.lpips_weight, self.lpips(s.sr, s.hr).mean())
        return terms
