"""Small image helpers for training: LR upscaling, value ranges, grids, metrics."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from vpdsr.metrics import psnr_y, ssim_y

__all__ = ["bicubic_up", "psnr_ssim", "save_grid", "to_signed", "to_unit"]


def to_signed(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], the range the VAE works in."""
    return x * 2 - 1


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2).clamp(0, 1)


def bicubic_up(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The student's input: the LR image upscaled bicubically to the HR size, in [0, 1]."""
    return F.interpolate(lr, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


@torch.no_grad()
def psnr_ssim(sr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image PSNR-Y and SSIM-Y (the SR papers' convention) of [0, 1] batches, on the CPU."""
    sr, hr = sr.float().cpu().clamp(0, 1), hr.float().cpu().clamp(0, 1)
    return psnr_y(sr, hr), ssim_y(sr, hr)


def save_grid(rows: list[list[torch.Tensor]], path: Path) -> Path:
    """One row per sample of same-size (3, H, W) [0, 1] images, side by side, as a PNG."""
    if not rows:
        raise ValueError("save_grid needs at least one row")
    h, w = rows[0][0].shape[-2:]
    gap = 2
    sheet = Image.new("RGB", (len(rows[0]) * (w + gap) - gap, len(rows) * (h + gap) - gap), "white")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            arr = (img.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            sheet.paste(Image.fromarray(arr), (c * (w + gap), r * (h + gap)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path
