"""Colour fixes: one-step students drift in colour, and the LR image knows the right colours.

Both fixes keep the student's detail and take the colour from the bicubic-upscaled input:
- AdaIN matches each channel's mean and standard deviation (cheap, global);
- wavelet swaps in the input's low-frequency band (local, so it also fixes regional casts).

Wavelet is the default: it is the one the embedded model is trained under, and on DRealSR it
keeps more fidelity than AdaIN for every model we measured (see MODEL_CARD.md).

The wavelet fix ends with an anti-ringing clamp. Sharpened bands on a blurrier low band overshoot
at edges, which people see as a light ring beside dark strokes (and, per channel, a coloured
fringe); no real edge goes beyond both its neighbours' values. Where the range comes from is the
model file's ``ring_clamp`` (``RING_CLAMPS``):
- ``"joint"`` (the default, and files without the field): each pixel stays within what the
  student's output and the input show together in its 3x3 neighbourhood. It keeps texture that a
  generative student draws where the input is blurred. On all 93 DRealSR images it took the
  embedded default from PSNR-Y 30.25 / HaarPSI 0.6015 / grid4 0.0227 to 30.32 / 0.6086 / 0.0197.
- ``"input"``: within what the input alone shows in its 5x5 neighbourhood, for students that
  sharpen and draw no texture (the embedded default): everything the student adds beyond the
  input's local range is overshoot or its decoder's 4 px grid. On the same images: 30.42 /
  0.6098 / grid4 0.014 (MODEL_CARD.md).

``apply_color_fix`` is pure (training backpropagates through it). Inference on whole photos uses
``color_fix_``, which works in place and in bands of rows: at 8000x6000 one float copy of the
image is 576 MB, and the pure form holds several at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["COLOR_FIXES", "DEFAULT_COLOR_FIX", "adain_color_fix", "apply_color_fix", "check_ring_clamp",
           "check_wavelet_levels", "color_fix_", "wavelet_color_fix"]  # fmt: skip

COLOR_FIXES = ("none", "adain", "wavelet")
DEFAULT_COLOR_FIX = "wavelet"
WAVELET_LEVELS = 5
MAX_WAVELET_LEVELS = 8  # the last blur reaches 128 px either side
BAND_ROWS = 256  # rows of the in-place wavelet fix at a time: 24 MB of float RGB at 8000 px wide
ADAIN_EPS = 1e-5
# The anti-ringing clamp's sources of range and their neighbourhoods (odd sides, in pixels): the nearest
# pixels either side of an edge for the joint range; two either side for the input's softer edges.
RING_CLAMPS = {"joint": 3, "input": 5}
RING_CLAMP = "joint"


def check_wavelet_levels(levels: object) -> int:
    """``levels`` if it is a level count the wavelet fix takes; a ValueError that says so otherwise."""
    if type(levels) is not int or not 1 <= levels <= MAX_WAVELET_LEVELS:
        raise ValueError(f"wavelet_levels must be a whole number from 1 to {MAX_WAVELET_LEVELS}, got {levels!r}")
    return levels


def check_ring_clamp(ring: object) -> str:
    """``ring`` if it names a range of the anti-ringing clamp; a ValueError that says so otherwise."""
    if ring not in RING_CLAMPS:
        raise ValueError(f"ring_clamp must be one of {tuple(RING_CLAMPS)}, got {ring!r}")
    return str(ring)


def _channel_stats(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of a BCHW batch, shaped to broadcast back onto it."""
    return image.mean((2, 3), keepdim=True), image.std((2, 3), keepdim=True)


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor, eps: float = ADAIN_EPS) -> torch.Tensor:
    """Give ``image`` the per-channel mean and std of ``reference`` (both BCHW, same size)."""
    (mean_i, std_i), (mean_r, std_r) = _channel_stats(image), _channel_stats(reference)
    return (image - mean_i) / (std_i + eps) * std_r + mean_r


def _wavelet_blur(image: torch.Tensor, dilation: int) -> torch.Tensor:
    """The a-trous 3x3 kernel ([1, 2, 1] / 4 each way, taps ``dilation`` apart), edges mirrored.

    Separable, as shifted adds along rows and then columns: the same values as the grouped 3x3
    convolution up to float rounding, many times faster on the CPU, where the colour fix runs.
    """
    d = dilation
    mode = "reflect" if min(image.shape[-2:]) > d else "replicate"
    rows = F.pad(image, (0, 0, d, d), mode=mode)
    cols = F.pad(rows[..., : -2 * d, :] + 2 * rows[..., d:-d, :] + rows[..., 2 * d :, :], (d, d, 0, 0), mode=mode)
    return (cols[..., : -2 * d] + 2 * cols[..., d:-d] + cols[..., 2 * d :]) / 16


def _low_frequency(image: torch.Tensor, levels: int) -> torch.Tensor:
    """The residual of an a-trous wavelet decomposition: what is left after ``levels`` blurs."""
    low = image
    for i in range(levels):
        low = _wavelet_blur(low, 2**i)
    return low


def _local_range(image: torch.Tensor, reference: torch.Tensor, ring: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel and channel, the least and greatest value in its ``RING_CLAMPS[ring]`` neighbourhood
    of both images (``"joint"``) or of ``reference`` alone (``"input"``); pooling pads with -inf, so
    borders use the pixels there are."""
    k = RING_CLAMPS[ring]
    least, most = (torch.minimum(image, reference), torch.maximum(image, reference)) if ring == "joint" else (reference, reference)
    return -F.max_pool2d(-least, k, 1, k // 2), F.max_pool2d(most, k, 1, k // 2)


def wavelet_color_fix(
    image: torch.Tensor, reference: torch.Tensor, levels: int = WAVELET_LEVELS, ring: str = RING_CLAMP
) -> torch.Tensor:
    """Keep ``image``'s high-frequency bands, take the lowest band from ``reference``, and clamp
    the result to the local range ``ring`` names (the anti-ringing clamp of the module docstring).

    The decomposition is linear (blurs and mirrored edges), so ``image - low(image) + low(reference)``
    is ``image + low(reference - image)``: one decomposition instead of two.
    """
    low, high = _local_range(image, reference, ring)
    return torch.minimum(torch.maximum(image + _low_frequency(reference - image, levels), low), high)


def _wavelet_fix_(image: torch.Tensor, reference: torch.Tensor, levels: int, ring: str, band: int) -> torch.Tensor:
    """``wavelet_color_fix`` in place, ``band`` rows at a time.

    Each blur reads ``2**i`` rows either side, so the low band of a row depends on the rows within
    ``2**levels - 1`` of it: a band computed with that halo is exact. At the image's own top and
    bottom the band's edge is the image's, mirrored the same way; a band with its halos has at least
    ``2**levels`` rows (or is the whole image), so each blur picks the same edge mode as the whole
    image's. Only ``image`` is written, so every halo reads unchanged rows of the difference.

    The clamp's range needs the unfixed image up to half its window beyond the band; the rows
    above were written by earlier bands, so their unfixed values are kept (``above``) from the
    unfixed copy each band takes before it is written.
    """
    diff = reference.sub_(image)
    halo, height, edge = 2**levels - 1, image.shape[2], RING_CLAMPS[ring] // 2
    above = None
    for top in range(0, height, band):
        bottom = min(height, top + band)
        start, stop = max(0, top - halo), min(height, bottom + halo)
        fixed = image[:, :, top:bottom] + _low_frequency(diff[:, :, start:stop], levels)[:, :, top - start : bottom - start]
        near = max(0, top - edge)
        raw = image[:, :, near : min(height, bottom + edge)].clone()
        if above is not None:
            raw[:, :, : top - near] = above
        low, high = _local_range(raw, raw + diff[:, :, near : near + raw.shape[2]], ring)
        above = raw[:, :, max(0, bottom - edge) - near : bottom - near]  # rows of earlier bands when band < edge
        rows = slice(top - near, top - near + bottom - top)
        image[:, :, top:bottom] = fixed.clamp_(min=low[:, :, rows]).clamp_(max=high[:, :, rows])
    return image


def color_fix_(
    image: torch.Tensor,
    reference: torch.Tensor,
    method: str,
    levels: int = WAVELET_LEVELS,
    ring: str = RING_CLAMP,
    band: int = BAND_ROWS,
) -> torch.Tensor:
    """``apply_color_fix`` in place and without autograd: ``image`` becomes the result and is returned.

    ``reference`` is used as scratch and left holding garbage, so pass one the caller is done with.
    Beyond the two images it needs a few bands of ``band`` rows, where the pure form needs several
    whole-image copies; results equal ``apply_color_fix``'s to float rounding.
    """
    if method == "none":
        return image
    if method == "adain":
        (mean_i, std_i), (mean_r, std_r) = _channel_stats(image), _channel_stats(reference)
        return image.sub_(mean_i).div_(std_i + ADAIN_EPS).mul_(std_r).add_(mean_r)
    if method == "wavelet":
        return _wavelet_fix_(image, reference, levels, ring, band)
    raise ValueError(f"color_fix must be one of {COLOR_FIXES}, got {method!r}")


def apply_color_fix(
    image: torch.Tensor, reference: torch.Tensor, method: str, levels: int = WAVELET_LEVELS, ring: str = RING_CLAMP
) -> torch.Tensor:
    """Differentiable colour fix (training backpropagates through it); ``levels`` and ``ring`` are the wavelet fix's."""
    if method == "none":
        return image
    if method == "adain":
        return adain_color_fix(image, reference)
    if method == "wavelet":
        return wavelet_color_fix(image, reference, levels, ring)
    raise ValueError(f"color_fix must be one of {COLOR_FIXES}, got {method!r}")
