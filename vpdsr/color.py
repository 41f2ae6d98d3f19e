"""Colour fixes: one-step students drift in colour, and the LR image knows the right colours.

Both fixes keep the student's detail and take the colour from the bicubic-upscaled input:
- AdaIN matches each channel's mean and standard deviation (cheap, global);
- wavelet swaps in the input's low-frequency band (local, so it also fixes regional casts).

Wavelet is the default: it is the one the embedded model is trained under, and on DRealSR it
keeps more fidelity than AdaIN for every model we measured (see MODEL_CARD.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["COLOR_FIXES", "DEFAULT_COLOR_FIX", "adain_color_fix", "apply_color_fix", "wavelet_color_fix"]

COLOR_FIXES = ("none", "adain", "wavelet")
DEFAULT_COLOR_FIX = "wavelet"


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Give ``image`` the per-channel mean and std of ``reference`` (both BCHW, same size)."""
    dims = (2, 3)
    mean_i, std_i = image.mean(dims, keepdim=True), image.std(dims, keepdim=True)
    mean_r, std_r = reference.mean(dims, keepdim=True), reference.std(dims, keepdim=True)
    return (image - mean_i) / (std_i + eps) * std_r + mean_r


def _wavelet_blur(image: torch.Tensor, dilation: int) -> torch.Tensor:
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], device=image.device, dtype=image.dtype) / 16
    c = image.shape[1]
    kernel = kernel.expand(c, 1, 3, 3)
    pad = dilation
    mode = "reflect" if min(image.shape[-2:]) > pad else "replicate"
    padded = F.pad(image, (pad, pad, pad, pad), mode=mode)
    return F.conv2d(padded, kernel, groups=c, dilation=dilation)


def _low_frequency(image: torch.Tensor, levels: int) -> torch.Tensor:
    """The residual of an a-trous wavelet decomposition: what is left after ``levels`` blurs."""
    low = image
    for i in range(levels):
        low = _wavelet_blur(low, 2**i)
    return low


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Keep ``image``'s high-frequency bands and take the lowest band from ``reference``."""
    return image - _low_frequency(image, levels) + _low_frequency(reference, levels)


def apply_color_fix(image: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    if method == "none":
        return image
    if method == "adain":
        return adain_color_fix(image, reference)
    if method == "wavelet":
        return wavelet_color_fix(image, reference)
    raise ValueError(f"color_fix must be one of {COLOR_FIXES}, got {method!r}")
