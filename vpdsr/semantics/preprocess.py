"""CLIP's image preprocessing as differentiable torch ops.

open_clip's own transform works on PIL images, so nothing can backpropagate through it; the
trainer's semantic (ESS) loss needs gradients to reach the super-resolved pixels. This mirrors
that transform on BCHW tensors: antialiased bicubic resize of the shorter side, centre crop,
per-channel normalisation.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def check_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Validate a BCHW float batch with 1 or 3 channels; grey images are repeated to RGB."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (BCHW in [0, 1]), got {type(images).__name__}.")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must be BCHW with 1 or 3 channels in [0, 1], got shape {tuple(images.shape)}.")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a float tensor in [0, 1], got {images.dtype}.")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(images.shape)}.")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic resize to ``size`` (H, W); a no-op when the size already matches.

    Antialiasing matters when shrinking: without it a 4x downscale aliases fine texture into
    patterns CLIP reads as content.
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)


def clip_preprocess(
    images: torch.Tensor,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """BCHW [0, 1] -> CLIP input: shorter side resized to cover ``size``, centre crop, normalised.

    This is the transform the checkpoints were trained with ("shortest" resize + centre crop),
    so scores match what open_clip's PIL pipeline gives up to resampling differences; anything
    outside the central crop of a non-square image is not seen, as in CLIP itself.
    """
    images = check_images(images)
    height, width = images.shape[-2:]
    target_h, target_w = size
    scale = max(target_h / height, target_w / width)
    covered = (max(target_h, round(height * scale)), max(target_w, round(width * scale)))
    images = resize_images(images, covered)
    top = (covered[0] - target_h) // 2
    left = (covered[1] - target_w) // 2
    images = images[..., top : top + target_h, left : left + target_w]
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


class ClipPreprocess(nn.Module):
    """Module form of :func:`clip_preprocess`, holding one model's size and normalisation."""

    def __init__(self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.size = tuple(size)
        self.mean = tuple(mean)
        self.std = tuple(std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return clip_preprocess(images, self.size, self.mean, self.std)
