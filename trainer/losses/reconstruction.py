"""Pixel reconstruction: the fidelity anchor every other loss of the student is balanced against."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ReconstructionLoss", "reconstruction_loss"]


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
