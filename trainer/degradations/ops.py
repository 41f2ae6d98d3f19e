"""The single degradation operations, each a deterministic function of its input and parameters.

Randomness enters only as arguments: per-sample tensors drawn elsewhere, and for noise a
``torch.Generator`` on the image's device (the pipeline seeds it from a logged integer). Images
are float BCHW in [0, 1]; per-sample parameters are (B,) tensors on any device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.enhance import jpeg_codec_differentiable
from kornia.filters import filter2d
from torch import Tensor

from .config import RESIZE_MODES

_LEVELS = 255.0


def check_image(x: Tensor, name: str = "image", channels: int | None = 3) -> None:
    """Fail early, with the expected and actual shape, instead of deep inside a convolution."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or (channels is not None and x.shape[1] != channels):
        c = "C" if channels is None else str(channels)
        raise ValueError(f"{name} must have shape (B, {c}, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor in [0, 1], got dtype {x.dtype}")


def _check_per_sample(x: Tensor, value: Tensor, name: str) -> None:
    if tuple(value.shape) != (x.shape[0],):
        raise ValueError(f"{name} must have shape ({x.shape[0]},), one value per image, got {tuple(value.shape)}")


def _per_sample(value: Tensor, x: Tensor) -> Tensor:
    return value.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def apply_blur(x: Tensor, kernels: Tensor) -> Tensor:
    """Filter each image with its own kernel, ``kernels`` of shape (B, k, k) or one shared (k, k).

    Borders are mirrored, as a camera's blur sees the scene beyond the frame; images too small to
    mirror a kernel's half-width (a few pixels after a strong downscale) replicate their edge.
    """
    check_image(x, channels=None)
    if kernels.ndim == 2:
        kernels = kernels.unsqueeze(0)
    if kernels.ndim != 3 or kernels.shape[0] not in (1, x.shape[0]) or kernels.shape[-1] != kernels.shape[-2]:
        raise ValueError(f"kernels must have shape ({x.shape[0]}, k, k) or (k, k), got {tuple(kernels.shape)}")
    half = kernels.shape[-1] // 2
    border = "reflect" if min(x.shape[-2:]) > half else "replicate"
    return filter2d(x, kernels.to(device=x.device, dtype=x.dtype), border_type=border)


def apply_resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """Resize without antialiasing: the aliasing of naive resamplers is part of the damage we model."""
    check_image(x, channels=None)
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"resize size must be (height, width) of at least 1 pixel, got {size}")
    align = False if mode in ("bilinear", "bicubic") else None
    return F.interpolate(x, size=tuple(int(s) for s in size), mode=mode, align_corners=align)


def split_apply(
    x: Tensor, mask: Tensor, on_true: Callable[[Tensor, Tensor], Tensor], on_false: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    """``on_true(images, idx)`` for the images where ``mask``, ``on_false`` for the others.

    ``idx`` (on ``mask``'s device) picks the images' per-image parameters. Each branch runs only
    on its own images: Poisson sampling, the slowest op of the pipeline on a CPU, is not wasted.
    """
    out = torch.empty_like(x)
    for branch, chosen in ((on_true, mask), (on_false, ~mask)):
        idx = chosen.nonzero().flatten()
        if idx.numel():
            on_x = idx.to(x.device)
            out[on_x] = branch(x[on_x], idx)
    return out


def add_gaussian_noise(x: Tensor, sigma: Tensor, gray: Tensor, generator: torch.Generator) -> Tensor:
    """Add N(0, sigma^2) noise, ``sigma`` in [0, 1] units per image; ``gray`` images get the same
    noise in every channel. Clipped to [0, 1] as a sensor would."""
    check_image(x, channels=None)
    _check_per_sample(x, sigma, "sigma")
    _check_per_sample(x, gray, "gray")

    def draw(part: Tensor, channels: int) -> Tensor:
        b, c, h, w = part.shape
        return torch.randn(b, channels, h, w, generator=generator, device=x.device, dtype=x.dtype).expand(b, c, h, w)

    noise = split_apply(x, gray, lambda part, _: draw(part, 1), lambda part, _: draw(part, part.shape[1]))
    return (x + noise * _per_sample(sigma, x)).clamp(0.0, 1.0)


def _shot_noise(x: Tensor, generator: torch.Generator) -> Tensor:
    return torch.poisson(x * _LEVELS, generator=generator) / _LEVELS - x


def add_poisson_noise(x: Tensor, scale: Tensor, gray: Tensor, generator: torch.Generator) -> Tensor:
    """Add shot noise: photon counts with one count per 8-bit level, the count's deviation times
    ``scale`` per image. ``gray`` images get noise drawn on their luminance, in all channels."""
    check_image(x)
    _check_per_sample(x, scale, "scale")
    _check_per_sample(x, gray, "gray")
    x = x.clamp(0.0, 1.0)
    noise = split_apply(
        x,
        gray,
        lambda part, _: _shot_noise(rgb_to_grayscale(part), generator).expand_as(part),
        lambda part, _: _shot_noise(part, generator),
    )
    return (x + noise * _per_sample(scale, x)).clamp(0.0, 1.0)


def apply_jpeg(x: Tensor, quality: Tensor) -> Tensor:
    """JPEG-compress and decode each image at its own quality (1..100).

    Uses kornia's differentiable codec: 4:2:0 chroma, standard tables, but a cubic soft rounding of
    the DCT coefficients, so block and ringing artifacts are there, slightly milder than libjpeg's.
    The input is clipped first, as out-of-range values make the codec's colour conversion ring.
    """
    check_image(x)
    _check_per_sample(x, quality, "quality")
    q = quality.to(device=x.device, dtype=torch.float32)
    return jpeg_codec_differentiable(x.clamp(0.0, 1.0), q).clamp(0.0, 1.0)


def quantize_8bit(x: Tensor) -> Tensor:
    """Clip and round to the 256 levels of an 8-bit file, as every real LR input has been."""
    return (x * _LEVELS).round().clamp(0.0, _LEVELS) / _LEVELS
